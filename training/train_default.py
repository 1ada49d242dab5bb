"""Train tokensieve's embedded default model (seeded; CPU by default).

    python training/train_default.py --out out/default_model --state-dir out/runs/default

Trains, saves safetensors + config + tokenizer + processor, then measures the full-token model on the shapes test
set and the easy-VQA test split and writes the model card. ``--card-only`` re-measures a saved model. The default
``--out`` is ``out/default_model`` (git-ignored): a reproduction never overwrites the packaged model; use the result
with ``--model out/default_model``.

With ``--state-dir`` the run saves a resumable state every ``--state-every`` steps; run the same command again
after an interruption and it continues from there to the same weights as an uninterrupted run.
"""

from __future__ import annotations

import argparse
import os
import sys
from dataclasses import fields
from pathlib import Path

import torch

from tokensieve.trainer import TrainConfig, save, train


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/default_model", help="model folder to write (default: %(default)s)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--max-minutes", type=float, default=None, help="stop early after this long (safety)")
    parser.add_argument(
        "--fit-minutes",
        type=float,
        default=None,
        help="shorten --steps at step 40 to what fits this long; the card records the steps run",
    )
    parser.add_argument("--checkpoint-every", type=int, default=0)
    parser.add_argument("--checkpoint-dir", default=None)
    parser.add_argument("--state-dir", default=None, help="save a resumable state here; resume from it if present")
    parser.add_argument("--state-every", type=int, default=200)
    parser.add_argument("--card-only", action="store_true", help="skip training; re-measure --out and rewrite its card")
    parser.add_argument("--no-card", action="store_true", help="save without measuring (pilots: quick_accuracy.py)")
    parser.add_argument("--eval-batch-size", type=int, default=64)
    parser.add_argument("--name", default="default model", help="the model's name in its card")
    for f in fields(TrainConfig):
        if f.type in ("int", "float", "str", int, float, str):
            parser.add_argument(f"--{f.name.replace('_', '-')}", type=type(f.default), default=f.default)
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{f.name: getattr(args, f.name) for f in fields(TrainConfig) if hasattr(args, f.name)})
    out = Path(args.out)
    if not args.card_only:

        def ckpt(step, model, processor):
            if args.checkpoint_dir:
                model.save_pretrained(Path(args.checkpoint_dir) / f"step{step}")
                processor.save_pretrained(Path(args.checkpoint_dir) / f"step{step}")

        model, processor, history = train(
            cfg,
            log=lambda m: print(m, flush=True),
            stop_after_s=None if args.max_minutes is None else args.max_minutes * 60,
            checkpoint=ckpt,
            checkpoint_every=args.checkpoint_every,
            fit_s=None if args.fit_minutes is None else args.fit_minutes * 60,
            state_dir=args.state_dir,
            state_every=args.state_every,
        )
        steps_done = history[-1]["step"] + 1
        if steps_done < cfg.steps:
            print(
                f"stopped at step {steps_done} of {cfg.steps}; run the same command again to continue"
                + ("" if args.state_dir else " (with --state-dir to keep the progress)"),
                flush=True,
            )
            if args.state_dir:
                return 0
        minutes = history[-1]["elapsed_s"] / 60  # training time over every resumed part
        loads = [h["load"] for h in history if "load" in h]
        cfg.notes = {
            "train_minutes": round(minutes, 1),
            "threads": cfg.threads,
            "device": args.device,
            "torch": torch.__version__,
            "steps_done": steps_done,
            "mean_load": round(sum(loads) / max(1, len(loads)), 1),
            "cores": os.cpu_count(),
            "command": "python training/train_default.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        }
        save(model, processor, out, cfg, history, "(card pending measurement)\n")
        print(f"saved to {out} after {minutes:.1f} min of training", flush=True)
        if args.no_card:
            return 0
    from tokensieve.trainer.card import write_model_card

    card = write_model_card(out, batch_size=args.eval_batch_size, name=args.name)
    print(card)
    return 0


if __name__ == "__main__":
    sys.exit(main())
