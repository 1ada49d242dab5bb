"""What one training step reads: conversations about images, tokenized so the loss sees only the answers.

Each sample is one question with a one-word answer; the loss covers the answer token and end-of-sequence only, so
answers come from ``generate()``. Training mixes fresh procedural scenes (never repeated) with the easy-VQA train
split, from one seeded stream whose state a resumed run restores.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data import easyvqa, shapes
from ..data.prompts import prompt_text
from .config import TrainConfig
from .targets import easyvqa_targets, scene_targets, sheet_targets


def make_batch(processor, images, questions, answers) -> dict[str, torch.Tensor]:
    """One row per image: the eval prompt and its answer, then any further turns; labels on answers and EOS only.

    ``questions[i]``/``answers[i]`` are a string (one turn) or a list of strings (a conversation about the image).
    The first turn is byte-for-byte the evaluation prompt; later turns follow the chat template's
    ``user : ... assistant :`` form. Rows are left-padded, like the processor pads prompts.
    """
    tok = processor.tokenizer
    questions = [[q] if isinstance(q, str) else list(q) for q in questions]
    answers = [[a] if isinstance(a, str) else list(a) for a in answers]
    inputs = processor(
        images=list(images), text=[prompt_text(processor, q[0]) for q in questions], return_tensors="pt", padding=True
    )
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
        input_ids[i, width - len(r) :] = torch.tensor(r)
        attention_mask[i, width - len(r) :] = 1
        labels[i, width - len(r) :] = torch.tensor(lab)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "pixel_values": inputs["pixel_values"],
        "labels": labels,
    }


class Mixture:
    """Endless seeded batches of conversations: fresh ``shapes`` train scenes mixed with easy-VQA train images.

    With ``turns > 1`` each image carries up to that many of its questions (shapes: one per family; easy-VQA: the
    image's own questions), shuffled; then any training-only drill turns (:func:`shapes.drill`); with probability
    ``describe_share`` a description turn closes it.
    """

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.next_scene = 0
        self.next_sheet = 0
        self.evqa = easyvqa.by_image("train")
        self.evqa_ids = sorted(self.evqa)
        self.evqa_images: dict[int, object] = {}
        self.evqa_descriptions = easyvqa.descriptions("train")
        self.evqa_attributes = easyvqa.attributes("train")

    def state(self) -> dict:
        """What :meth:`load_state` needs to continue the same stream of batches (for resuming a run)."""
        return {"gen": self.gen.get_state(), "next_scene": self.next_scene, "next_sheet": self.next_sheet}

    def load_state(self, state: dict) -> None:
        self.gen.set_state(state["gen"])
        self.next_scene = state["next_scene"]
        self.next_sheet = state.get("next_sheet", 0)

    def draw_sheets(self, n: int):
        """``(images, targets)`` for the next ``n`` training sheets (probe targets only; nobody asks about them)."""
        images, targets = [], []
        for _ in range(n):
            sheet = shapes.sheet("train", self.next_sheet)
            self.next_sheet += 1
            target = sheet_targets(sheet, self.cfg.patch_size, self.cfg.image_size)
            images.append(sheet.image)
            targets.append(target)
        return images, torch.stack(targets)

    def _lead(self, index: int, scene) -> list[tuple[str, str]]:
        """The opening turn for ``lead_families`` (none when no listed family fits a one-shape scene): a family
        picked by the data stream, asked from its own seeded stream (so the conversation after it, and the test
        set, are unchanged)."""
        fams = [
            f for f in self.cfg.lead_families.split(",") if f and (len(scene.objects) >= 2 or f not in shapes.NEEDS_TWO)
        ]
        if not fams:
            return []
        fam = fams[int(torch.randint(len(fams), (1,), generator=self.gen))]
        rng = np.random.default_rng([shapes.SPLIT_SEEDS["train"], index, 2718281])
        if fam == "where":
            return [shapes.where_turn(scene.objects[int(rng.integers(len(scene.objects)))])]
        return [shapes.ask(scene, fam, rng)]

    def _pick(self, n: int) -> list[int]:
        return torch.randperm(n, generator=self.gen).tolist()

    def draw(self, n: int, easyvqa_share: float | None = None):
        """``(images, questions, answers)`` for ``n`` images."""
        return self.draw_with_targets(n, easyvqa_share)[:3]

    def draw_with_targets(self, n: int, easyvqa_share: float | None = None):
        """As :meth:`draw`, plus per-patch targets ``[n, heads, patches]`` for the vision tower (see ``PatchProbe``)."""
        images, questions, answers, targets = [], [], [], []
        cfg = self.cfg
        share = cfg.easyvqa_share if easyvqa_share is None else easyvqa_share
        use_evqa = (torch.rand(n, generator=self.gen) < share).tolist()
        describe = (torch.rand(n, generator=self.gen) < cfg.describe_share).tolist()
        size, patch = cfg.image_size, cfg.patch_size
        for flag, desc in zip(use_evqa, describe):
            if flag:
                image_id = self.evqa_ids[int(torch.randint(len(self.evqa_ids), (1,), generator=self.gen))]
                pairs = self.evqa[image_id]
                turns = [pairs[k] for k in self._pick(len(pairs))[: cfg.turns]]
                if desc and image_id in self.evqa_descriptions:
                    turns.append((shapes.DESCRIBE, self.evqa_descriptions[image_id]))
                if image_id not in self.evqa_images:
                    image = easyvqa.load_image("train", image_id)
                    colour, shape = self.evqa_attributes.get(image_id, (None, None))
                    self.evqa_images[image_id] = (image, easyvqa_targets(image, colour, shape, size, patch))
                image, target = self.evqa_images[image_id]
            else:
                index = self.next_scene
                image, turns, scene = shapes.conversation("train", index, describe=bool(desc), with_scene=True)
                target = scene_targets(scene, patch, size)
                self.next_scene += 1
                described = turns[-1:] if desc else []
                turns = turns[: len(turns) - len(described)]
                if cfg.lead_families:
                    turns = self._lead(index, scene) + turns
                turns = turns[: cfg.turns]
                turns += (
                    shapes.drill(
                        "train",
                        index,
                        scene,
                        where=bool(cfg.where_questions),
                        relations=cfg.extra_relations,
                        exists=cfg.extra_exists,
                    )
                    + described
                )
            images.append(image)
            questions.append([q for q, _ in turns])
            answers.append([a for _, a in turns])
            targets.append(target)
        return images, questions, answers, torch.stack(targets)
