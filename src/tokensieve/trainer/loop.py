"""The seeded training loop: schedule, resumable state, and the saved model folder.

Everything is seeded: the same config gives the same weights on the same torch build, and a run resumed from its
state ends with the weights of one never interrupted.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import torch

from .batches import Mixture, make_batch
from .config import TrainConfig
from .model import build_model, warm_start
from .supervision import AttentionGuide, PatchProbe, Teacher


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine down to ``min_lr``: a function of the step alone, so a resumed run (or one whose
    ``steps`` were fitted inside warm-up) follows the schedule of a run started that way."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


STATE_FILE = "state.pt"
_RESUME_FREE = ("notes", "threads", "log_every", "steps")
"""Config fields a resumed run may differ in (``steps``: the saved value wins, it may have been fitted)."""


def _load_state(path: Path, cfg: TrainConfig) -> dict:
    state = torch.load(path, weights_only=False)
    # A field added after the state was saved counts as its default (the saved run had that behaviour).
    saved = {**asdict(TrainConfig()), **state["config"]}
    diff = [
        f"{k}: saved {saved.get(k)!r}, now {v!r}"
        for k, v in asdict(cfg).items()
        if k not in _RESUME_FREE and saved.get(k) != v
    ]
    if diff:
        raise ValueError(
            f"{path} was saved by a run with another config ({'; '.join(diff)}); "
            "use the same options or another --state-dir"
        )
    return state


def train(
    cfg: TrainConfig,
    log: Callable[[str], None] = print,
    stop_after_s: float | None = None,
    checkpoint: Callable[[int, object, object], None] | None = None,
    checkpoint_every: int = 0,
    fit_s: float | None = None,
    state_dir: str | Path | None = None,
    state_every: int = 200,
    stop_at_step: int | None = None,
):
    """Train from scratch (or from ``cfg.init_from``); returns ``(model, processor, history)``.

    ``stop_after_s`` ends early (the schedule is not stretched); ``checkpoint(step, model, processor)`` is called
    every ``checkpoint_every`` steps so a long run can be inspected while it goes. ``fit_s`` shortens
    ``cfg.steps`` once, at step 40 (inside warm-up, so the schedule equals that of a run started with the shorter
    ``steps``), to what the measured speed fits into ``fit_s`` seconds; ``cfg.steps`` then records it.

    ``state_dir`` makes the run resumable: every ``state_every`` steps, and when it stops early, the weights, probe,
    optimizer, data stream, history and elapsed time go to ``state_dir/state.pt``; a run started with a
    ``state_dir`` that holds one continues from it, and ends with the same weights as a run never interrupted
    (same torch build and thread count). ``stop_at_step`` stops (and saves) before that step, for tests.
    ``history[i]["elapsed_s"]`` counts training time across every resumed part.
    """
    torch.set_num_threads(cfg.threads)
    state_path = Path(state_dir) / STATE_FILE if state_dir is not None else None
    resume = _load_state(state_path, cfg) if state_path is not None and state_path.is_file() else None
    if resume is not None:
        cfg.steps = resume["config"]["steps"]
    model, processor = build_model(cfg)
    if cfg.init_from and resume is None:
        resized = warm_start(model, cfg.init_from)
        log(f"started from {cfg.init_from}" + (f" (resized: {', '.join(resized)})" if resized else ""))
    model.train()
    probe = PatchProbe(model, cfg, processor.tokenizer) if cfg.aux_weight > 0 else None
    if cfg.aux_attention > 0 and cfg.text_heads < 4:
        raise ValueError(
            f"aux_attention needs an LM with at least 4 heads (it supervises heads 0-3), not {cfg.text_heads}"
        )
    guide = (
        AttentionGuide(model, processor.tokenizer, cfg.attention_at, cfg.attention_layer)
        if cfg.aux_attention > 0
        else None
    )
    if cfg.aux_words > 0 and probe is None:
        raise ValueError("aux_words needs the probe (aux_weight > 0): its hook reads the projector")
    params = list(model.named_parameters()) + (list(probe.named_parameters()) if probe is not None else [])
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
    )
    data = Mixture(cfg)
    history = []
    running = None
    step = 0
    before = 0.0  # training seconds of earlier parts of a resumed run
    if resume is not None:
        model.load_state_dict(resume["model"])
        if probe is not None:
            probe.load_state_dict(resume["probe"])
        opt.load_state_dict(resume["opt"])
        data.load_state(resume["data"])
        history, running, step, before = resume["history"], resume["running"], resume["step"], resume["elapsed_s"]
        torch.set_rng_state(resume["torch_rng"])
        log(f"resumed from {state_path} at step {step} ({before:.0f} s trained before)")
    t0 = time.perf_counter()

    def save_state(next_step: int) -> None:
        state = {
            "step": next_step,
            "config": asdict(cfg),
            "model": model.state_dict(),
            "probe": probe.state_dict() if probe is not None else None,
            "opt": opt.state_dict(),
            "data": data.state(),
            "history": history,
            "running": running,
            "elapsed_s": before + time.perf_counter() - t0,
            "torch_rng": torch.get_rng_state(),
        }
        state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = state_path.with_suffix(".tmp")
        torch.save(state, tmp)
        tmp.replace(state_path)  # atomic: a run killed while saving keeps the previous state

    def sheet_loss(n: int) -> torch.Tensor:  # the vision tower alone on n sheets; the probe hook reads them
        images, sheet_t = data.draw_sheets(n)
        model.model.vision_tower(processor.image_processor(images, return_tensors="pt")["pixel_values"])
        return probe.loss(sheet_t)

    teacher = Teacher(cfg.distill_from, model) if cfg.distill_from else None
    if teacher is not None and probe is None:
        raise ValueError("distill_from needs the probe (aux_weight > 0): its hook reads the feature layer")

    def vision_loss(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The vision tower alone on n sheets (on n training images when distilling), with their targets; the
        probe hook reads the states."""
        if teacher is None:
            images, vision_t = data.draw_sheets(n)
        else:
            images, _, _, vision_t = data.draw_with_targets(n)
        model.model.vision_tower(processor.image_processor(images, return_tensors="pt")["pixel_values"])
        loss = probe.loss(vision_t)
        if teacher is not None:
            loss = loss + cfg.distill_weight * teacher.loss(images, probe.states)
        return loss, vision_t

    # global steps: cfg.vision_steps on sheets alone, then cfg.steps of the full model
    t10 = None
    try:
        while step < cfg.vision_steps + cfg.steps:
            if stop_at_step is not None and step >= stop_at_step:
                if state_path is not None:
                    save_state(step)
                break
            main = step - cfg.vision_steps  # the step of the main schedule (negative in the vision phase)
            if main == 10:
                t10 = time.perf_counter()
            if fit_s is not None and main == 40 and t10 is not None:
                rate = (time.perf_counter() - t10) / 30  # seconds per main step
                fitted = max(41, 40 + int((fit_s - (before + time.perf_counter() - t0)) / rate))
                if fitted < cfg.steps:
                    log(
                        f"{rate:.2f} s/step: shortening the run from {cfg.steps} to {fitted} steps to fit {fit_s:.0f} s"
                    )
                    cfg.steps = fitted
            lr = cfg.lr * min(1.0, (step + 1) / cfg.warmup) if main < 0 else lr_at(main, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            if main < 0:  # vision phase: the probe's targets on sheets, a fraction of a full step's compute
                loss, targets = vision_loss(cfg.batch_size)
                aux = loss
                opt.zero_grad(set_to_none=True)
                aux.backward()
            else:
                # curriculum: single-shape easy-VQA images first, where colour and shape fill a third of the
                # picture, so the vision-to-answer path forms before the cluttered scenes are mixed in
                warm = main < cfg.curriculum_steps
                *drawn, targets = data.draw_with_targets(cfg.batch_size, 1.0 if warm else None)
                batch = make_batch(processor, *drawn)
                sheet_aux = sheet_loss(cfg.sheets) if cfg.sheets and probe is not None else None
                loss = model(**batch).loss  # the answer loss; logged and smoothed on its own
                aux = probe.loss(targets) if probe is not None else None
                words = probe.word_loss(targets) if cfg.aux_words > 0 else None
                guided = guide.loss(batch, targets) if guide is not None else None
                if teacher is not None:
                    aux = aux + cfg.distill_weight * teacher.loss(drawn[0], probe.states)
                if sheet_aux is not None:
                    aux = (aux + sheet_aux) / 2
                opt.zero_grad(set_to_none=True)
                total = loss + cfg.aux_weight * aux if aux is not None else loss
                if words is not None:
                    total = total + cfg.aux_words * words
                if guided is not None:
                    total = total + cfg.aux_attention * guided
                total.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            if main >= 0:
                running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if (main if main >= 0 else step) % cfg.log_every == 0 or main == cfg.steps - 1:
                elapsed = before + time.perf_counter() - t0
                record = {
                    "step": main,
                    "loss": round(loss.item(), 4),
                    "smoothed": round(running or 0.0, 4),
                    "lr": lr,
                    "elapsed_s": round(elapsed, 1),
                    "load": round(os.getloadavg()[0], 2),
                }  # the machine's, to read the times by
                if main < 0:
                    record.update(phase="vision", step=step, probe_acc=probe.accuracy(targets))
                elif aux is not None:
                    record["aux_loss"] = round(aux.item(), 4)
                    if words is not None:
                        record["word_loss"] = round(words.item(), 4)
                if main >= 0 and guide is not None:
                    record["attention_mass"] = round(guide.last_mass, 3)
                    if cfg.aux_balance:
                        record["probe_acc"] = probe.accuracy(targets)  # the scenes: the last forward
                history.append(record)
                log(
                    ("vision " if main < 0 else "")
                    + f"step {record['step']:5d}  loss {loss.item():.4f}  "
                    + (f"smoothed {running:.4f}  " if main >= 0 else "")
                    + (f"aux {aux.item():.4f}  " if aux is not None and main >= 0 else "")
                    + (f"words {words.item():.4f}  " if main >= 0 and words is not None else "")
                    + (f"mass {record['attention_mass']}  " if "attention_mass" in record else "")
                    + (f"probe {record['probe_acc']}  " if "probe_acc" in record else "")
                    + f"lr {lr:.2e}  {elapsed:7.1f} s"
                )
            if checkpoint is not None and checkpoint_every and main > 0 and main % checkpoint_every == 0:
                model.eval()
                checkpoint(main, model, processor)
                model.train()
            step += 1
            if (
                state_path is not None
                and state_every
                and step % state_every == 0
                and step < cfg.vision_steps + cfg.steps
            ):
                save_state(step)
            if stop_after_s is not None and time.perf_counter() - t0 > stop_after_s:
                log(f"stopping early at step {step} after {time.perf_counter() - t0:.0f} s")
                if state_path is not None:
                    save_state(step)
                break
    finally:
        if probe is not None:
            probe.remove()
        if guide is not None:
            guide.remove()
    model.eval()
    return model, processor, history


def save(model, processor, out_dir: str | Path, cfg: TrainConfig, history: list, card: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "history": history}, indent=1))
    (out / "README.md").write_text(card)
