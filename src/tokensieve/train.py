"""Training the embedded default model: a small LLaVA-1.5-layout VLM learned from scratch on CPU.

Stock classes only (``LlavaForConditionalGeneration``, CLIP vision tower with its CLS token, Llama LM,
``vision_feature_layer=-2``), so what the methods see is what they would see in LLaVA-1.5, just smaller. Each
sample is one question with a one-word answer; the loss covers the answer token and end-of-sequence only, so
answers come from ``generate()``. Training mixes fresh procedural scenes (never repeated) with the easy-VQA
train split. Everything is seeded: the same config gives the same weights on the same torch build.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torch import nn

from .data import easyvqa, shapes
from .tiny import CHAT_TEMPLATE, SPECIALS, _WORDS, build_processor, build_tokenizer

CHAT_WORDS = ["user", "assistant", ":"]


@dataclass
class TrainConfig:
    image_size: int = 96
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 8
    vision_heads: int = 4
    vision_mlp: int = 192
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_mlp: int = 256
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 150
    weight_decay: float = 0.05
    easyvqa_share: float = 0.3
    describe_share: float = 0.25
    sincos_positions: int = 1
    turns: int = 6
    curriculum_steps: int = 0
    aux_weight: float = 0.0
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    notes: dict = field(default_factory=dict)


def vocabulary() -> list[str]:
    """Every word the data uses plus the demo's, fixed in order so the same config gives the same tokenizer."""
    words = set(shapes.WORDS) | easyvqa.words() | set(_WORDS) | set(CHAT_WORDS)
    return sorted(words - set(SPECIALS))


def build_model(cfg: TrainConfig):
    """Fresh ``(model, processor)`` for ``cfg``, seeded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer(vocabulary())
    processor = build_processor(tokenizer, cfg.image_size, cfg.patch_size)
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width, intermediate_size=cfg.vision_mlp, num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads, image_size=cfg.image_size, patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_width, intermediate_size=cfg.text_mlp, num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads, num_key_value_heads=cfg.text_kv_heads, vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, max_position_embeddings=512, tie_word_embeddings=True,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu",
    )
    config._attn_implementation = "sdpa"
    with torch.random.fork_rng():
        torch.manual_seed(cfg.seed)
        model = LlavaForConditionalGeneration(config)
    if cfg.sincos_positions:
        _sincos_position_init(model, cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.max_new_tokens = 4
    return model, processor


def _sincos_position_init(model, cfg: TrainConfig) -> None:
    """Start CLIP's learned position table from a 2-D sine-cosine grid instead of small noise.

    Only the initial values change (the table stays learned, the class stays stock CLIP). With a 0.02-std table the
    patches barely know where they are, and questions about quadrants and relations stall until it is learned.
    """
    emb = model.model.vision_tower.embeddings.position_embedding.weight
    side = cfg.image_size // cfg.patch_size
    dim = emb.shape[1]
    quarter = dim // 4
    freq = 1.0 / (100.0 ** (torch.arange(quarter, dtype=torch.float32) / quarter))
    ys, xs = torch.meshgrid(torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32),
                            indexing="ij")
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, 1)
    with torch.no_grad():
        emb[1:, : table.shape[1]] = 0.5 * table
        emb[1:, table.shape[1]:] = 0.0


def prompt_text(processor, question: str) -> str:
    """The chat-formatted prompt for one image and one question (falls back to LLaVA's plain form)."""
    if getattr(processor, "chat_template", None):
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return f"{processor.image_token}\n{question}"


def make_batch(processor, images, questions, answers) -> dict[str, torch.Tensor]:
    """One row per image: the eval prompt and its answer, then any further turns; labels on answers and EOS only.

    ``questions[i]``/``answers[i]`` are a string (one turn) or a list of strings (a conversation about the image).
    The first turn is byte-for-byte the evaluation prompt; later turns follow the chat template's
    ``user : ... assistant :`` form. Rows are left-padded, like the processor pads prompts.
    """
    tok = processor.tokenizer
    questions = [[q] if isinstance(q, str) else list(q) for q in questions]
    answers = [[a] if isinstance(a, str) else list(a) for a in answers]
    inputs = processor(images=list(images), text=[prompt_text(processor, q[0]) for q in questions],
                       return_tensors="pt", padding=True)
    rows, labels_rows = [], []
    for ids, mask, qs, ans in zip(inputs["input_ids"], inputs["attention_mask"], questions, answers):
        if len(qs) != len(ans):
            raise ValueError(f"{len(qs)} questions but {len(ans)} answers for one image")
        row = ids[mask.bool()].tolist()
        lab = [-100] * len(row)
        for turn, (q, a) in enumerate(zip(qs, ans)):
            if turn:
                follow = tok(f"user : {q} assistant :", add_special_tokens=False)["input_ids"]
                row += follow
                lab += [-100] * len(follow)
            a_ids = tok(a, add_special_tokens=False)["input_ids"]
            if not a_ids or tok.unk_token_id in a_ids:
                raise ValueError(f"answer {a!r} has words this tokenizer does not know")
            row += a_ids + [tok.eos_token_id]
            lab += a_ids + [tok.eos_token_id]
        rows.append(row)
        labels_rows.append(lab)
    width = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    labels = torch.full_like(input_ids, -100)
    for i, (r, lab) in enumerate(zip(rows, labels_rows)):
        input_ids[i, width - len(r):] = torch.tensor(r)
        attention_mask[i, width - len(r):] = 1
        labels[i, width - len(r):] = torch.tensor(lab)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "pixel_values": inputs["pixel_values"],
            "labels": labels}


class Mixture:
    """Endless seeded batches of conversations: fresh ``shapes`` train scenes mixed with easy-VQA train images.

    With ``turns > 1`` each image carries up to that many of its questions (shapes: one per family; easy-VQA: the
    image's own questions), shuffled; with probability ``describe_share`` a description turn closes it.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.next_scene = 0
        self.evqa = easyvqa.by_image("train")
        self.evqa_ids = sorted(self.evqa)
        self.evqa_images: dict[int, object] = {}
        self.evqa_descriptions = easyvqa.descriptions("train")
        self.evqa_attributes = easyvqa.attributes("train")

    def _pick(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.gen).tolist()

    def draw(self, n: int, easyvqa_share: float | None = None):
        """``(images, questions, answers)`` for ``n`` images."""
        return self.draw_with_targets(n, easyvqa_share)[:3]

    def draw_with_targets(self, n: int, easyvqa_share: float | None = None):
        """As :meth:`draw`, plus per-patch targets ``[n, 3, patches]`` for the vision tower (see ``PatchProbe``)."""
        images, questions, answers, targets = [], [], [], []
        share = self.cfg.easyvqa_share if easyvqa_share is None else easyvqa_share
        use_evqa = (torch.rand(n, generator=self.gen) < share).tolist()
        describe = (torch.rand(n, generator=self.gen) < self.cfg.describe_share).tolist()
        size, patch = self.cfg.image_size, self.cfg.patch_size
        for flag, desc in zip(use_evqa, describe):
            if flag:
                image_id = self.evqa_ids[int(torch.randint(len(self.evqa_ids), (1,), generator=self.gen))]
                pairs = self.evqa[image_id]
                turns = [pairs[k] for k in self._pick(len(pairs))[: self.cfg.turns]]
                if desc and image_id in self.evqa_descriptions:
                    turns.append((shapes.DESCRIBE, self.evqa_descriptions[image_id]))
                if image_id not in self.evqa_images:
                    image = easyvqa.load_image("train", image_id)
                    colour, shape = self.evqa_attributes.get(image_id, (None, None))
                    self.evqa_images[image_id] = (image, easyvqa_targets(image, colour, shape, size, patch))
                image, target = self.evqa_images[image_id]
            else:
                image, turns, scene = shapes.conversation("train", self.next_scene, describe=bool(desc),
                                                          with_scene=True)
                target = scene_targets(scene, patch, size)
                self.next_scene += 1
                if len(turns) - desc > self.cfg.turns:
                    turns = turns[: self.cfg.turns] + (turns[-1:] if desc else [])
            images.append(image)
            questions.append([q for q, _ in turns])
            answers.append([a for _, a in turns])
            targets.append(target)
        return images, questions, answers, torch.stack(targets)


AUX_COLOURS = tuple(sorted(set(shapes.COLOURS) | easyvqa.COLOURS))
AUX_SHAPES = tuple(sorted(set(shapes.SHAPES) | {"rectangle"}))
AUX_HEADS = {"colour": len(AUX_COLOURS) + 1, "shape": len(AUX_SHAPES) + 1, "digit": 11}
"""Per-patch training targets for the vision tower; class 0 of each is "nothing of that kind here"."""
IGNORE = -100


def _per_patch(pixels: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, ...]`` to ``[patches, patch * patch, ...]`` in the vision tower's row-major patch order."""
    side = pixels.shape[0] // patch
    rest = pixels.shape[2:]
    cut = pixels[: side * patch, : side * patch].reshape(side, patch, side, patch, *rest)
    return cut.swapaxes(1, 2).reshape(side * side, patch * patch, *rest)


def scene_targets(scene, patch: int, size: int = shapes.IMAGE_SIZE, min_pixels: int = 4) -> torch.Tensor:
    """``[3, patches]`` colour / shape / digit class of what each patch mostly shows (shapes scenes).

    A patch takes the object (or digit) with the most pixels in it if it has at least ``min_pixels``, so the 7 px
    shapes still label the patches they sit in. ``size`` is the side the processor resizes images to.
    """
    labels = shapes.label_map(scene)
    if size != labels.shape[0]:
        labels = np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))
    cells = _per_patch(labels, patch)
    out = torch.zeros(3, cells.shape[0], dtype=torch.long)
    for k, o in enumerate(scene.objects):
        count = (cells == k + 1).sum(1)
        mine = (count >= min_pixels) & (count >= (cells == shapes.DIGIT_LABEL).sum(1))
        out[0, torch.from_numpy(mine)] = AUX_COLOURS.index(o.colour) + 1
        out[1, torch.from_numpy(mine)] = AUX_SHAPES.index(o.shape) + 1
    digit = (cells == shapes.DIGIT_LABEL).sum(1) >= min_pixels
    out[2, torch.from_numpy(digit)] = scene.digit + 1
    return out


def easyvqa_targets(image, colour: str | None, shape: str | None, size: int, patch: int,
                    min_pixels: int = 8) -> torch.Tensor:
    """``[3, patches]`` for an easy-VQA image: one shape on a plain background (the border's commonest colour).

    Patches the shape covers take its colour / shape class when the image's own questions name them (unknown:
    ignored); easy-VQA has no digits, so that head learns "none" there.
    """
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.NEAREST)).astype(np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    fg = np.abs(pixels - colours[counts.argmax()]).sum(-1) > 60
    on = torch.from_numpy(_per_patch(fg, patch).sum(1) >= min_pixels)
    out = torch.zeros(3, on.numel(), dtype=torch.long)
    for row, value, names in ((0, colour, AUX_COLOURS), (1, shape, AUX_SHAPES)):
        out[row, on] = names.index(value) + 1 if value is not None else IGNORE
    return out


class PatchProbe(nn.Module):
    """A linear read-out of the feature layer's patch states, used only while training (never saved).

    It gives the vision tower a per-patch loss (what colour / shape / digit is here) on top of the answer loss.
    The shipped model is the stock LLaVA class alone; the probe is dropped after training.
    """

    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.head = nn.Linear(cfg.vision_width, sum(AUX_HEADS.values()))
        layers = model.model.vision_tower.encoder.layers
        index = len(layers) + model.config.vision_feature_layer  # hidden_states[-2] is the output of layer L-2
        self.states = None
        self.handle = layers[index].register_forward_hook(self._grab)

    def _grab(self, module, args, output):
        self.states = output[0] if isinstance(output, tuple) else output

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the three heads on the last forward's patches (``targets`` [B, 3, P])."""
        logits = self.head(self.states[:, 1:])  # drop CLS
        total, start = 0.0, 0
        for k, n in enumerate(AUX_HEADS.values()):
            part = logits[..., start : start + n]
            total = total + nn.functional.cross_entropy(part.reshape(-1, n), targets[:, k].reshape(-1),
                                                        ignore_index=IGNORE)
            start += n
        return total / len(AUX_HEADS)

    def remove(self) -> None:
        self.handle.remove()


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    t = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


def train(cfg: TrainConfig, log: Callable[[str], None] = print, stop_after_s: float | None = None,
          checkpoint: Callable[[int, object, object], None] | None = None, checkpoint_every: int = 0,
          fit_s: float | None = None):
    """Train from scratch; returns ``(model, processor, history)``.

    ``stop_after_s`` ends early (the schedule is not stretched); ``checkpoint(step, model, processor)`` is called
    every ``checkpoint_every`` steps so a long run can be inspected while it goes. ``fit_s`` shortens
    ``cfg.steps`` once, at step 40 (inside warm-up, so the schedule equals that of a run started with the shorter
    ``steps``), to what the measured speed fits into ``fit_s`` seconds; ``cfg.steps`` then records it.
    """
    torch.set_num_threads(cfg.threads)
    model, processor = build_model(cfg)
    model.train()
    probe = PatchProbe(model, cfg) if cfg.aux_weight > 0 else None
    params = list(model.named_parameters()) + (list(probe.named_parameters()) if probe is not None else [])
    decay = [p for n, p in params if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in params if not (p.ndim >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.98))
    data = Mixture(cfg)
    history = []
    t0 = time.perf_counter()
    running = None
    step = 0
    t10 = None
    try:
        while step < cfg.steps:
            if step == 10:
                t10 = time.perf_counter()
            if fit_s is not None and step == 40 and t10 is not None:
                rate = (time.perf_counter() - t10) / 30
                fitted = max(41, 40 + int((fit_s - (time.perf_counter() - t0)) / rate))
                if fitted < cfg.steps:
                    log(f"{rate:.2f} s/step: shortening the run from {cfg.steps} to {fitted} steps to fit {fit_s:.0f} s")
                    cfg.steps = fitted
            for g in opt.param_groups:
                g["lr"] = lr_at(step, cfg)
            # curriculum: single-shape easy-VQA images first, where colour and shape fill a third of the picture, so
            # the vision-to-answer path forms before the cluttered scenes are mixed in
            warm = step < cfg.curriculum_steps
            *drawn, targets = data.draw_with_targets(cfg.batch_size, 1.0 if warm else None)
            batch = make_batch(processor, *drawn)
            loss = model(**batch).loss  # the answer loss; logged and smoothed on its own
            aux = probe.loss(targets) if probe is not None else None
            opt.zero_grad(set_to_none=True)
            (loss + cfg.aux_weight * aux if aux is not None else loss).backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in params], 1.0)
            opt.step()
            running = loss.item() if running is None else 0.9 * running + 0.1 * loss.item()
            if step % cfg.log_every == 0 or step == cfg.steps - 1:
                elapsed = time.perf_counter() - t0
                record = {"step": step, "loss": round(loss.item(), 4), "smoothed": round(running, 4),
                          "lr": lr_at(step, cfg), "elapsed_s": round(elapsed, 1)}
                if aux is not None:
                    record["aux_loss"] = round(aux.item(), 4)
                history.append(record)
                log(f"step {step:5d}  loss {loss.item():.4f}  smoothed {running:.4f}  "
                    + (f"aux {aux.item():.4f}  " if aux is not None else "") + f"lr {lr_at(step, cfg):.2e}  {elapsed:7.1f} s")
            if checkpoint is not None and checkpoint_every and step and step % checkpoint_every == 0:
                model.eval()
                checkpoint(step, model, processor)
                model.train()
            if stop_after_s is not None and time.perf_counter() - t0 > stop_after_s:
                log(f"stopping early at step {step} after {time.perf_counter() - t0:.0f} s")
                break
            step += 1
    finally:
        if probe is not None:
            probe.remove()
    model.eval()
    return model, processor, history


def save(model, processor, out_dir: str | Path, cfg: TrainConfig, history: list, card: str) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    (out / "training.json").write_text(json.dumps({"config": asdict(cfg), "history": history}, indent=1))
    (out / "README.md").write_text(card)
