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
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from ..data import easyvqa, shapes
from ..models.tiny import _WORDS, CHAT_TEMPLATE, QUESTION_FIRST_TEMPLATE, SPECIALS, build_processor, build_tokenizer

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
    rope_theta: float = 10000.0
    """The LM's RoPE base. With 32-dim heads only a few rotary pairs turn slowly enough to match content across the
    ~150 positions between a question and the visual tokens; a larger base keeps more of them stable."""
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
    aux_balance: int = 0
    """1: each probe head's loss is the mean over patches that show something plus the mean over those that show
    nothing, so a digit on 3 of 144 patches weighs as much as the background (plain mean: ~2% of the loss)."""
    aux_pooled: int = 0
    """1: the probe also answers per object and per digit: its per-patch logits averaged over the instance's patches
    (colour, shape, digit), the way an LM reads an object by attending to all its patches. A patch inside a square
    cannot tell it from a circle; the object's patches together can."""
    aux_mask: int = 0
    """1: a probe head says which sub-cells of each patch are drawn (any object or digit, whatever its colour): the
    colour-free outline a patch shows, which is what tells a circle's edge from a square's."""
    aux_quadrant: int = 0
    """1: a fourth probe head names each patch's quadrant, so the feature layer states where it is in words the LM
    can read."""
    question_first: int = 0
    """1: the chat template puts the question before the image (:data:`tiny.QUESTION_FIRST_TEMPLATE`), so each
    visual token can compare what it shows with what is asked (causal attention reads earlier tokens only) instead of
    the answer position having to find the asked-for patches. Measured: it helps where-only pilots (about 50%
    against chance) but a whole run with it scored below final144 (training/runs/pilots-2026-12-02.md); off by
    default."""
    aux_words: float = 0.0
    """Weight of a word-alignment loss: each patch's projector output, scored against the LM's own (tied) embeddings
    of the colour, shape, row ("top" / "bottom") and column ("left" / "right") words, names what the patch shows and
    where it is, so a question's colour word and the patches of that colour start out alike in the LM's space.
    Measured: where-only pilots go from chance to about 65% with it, but it did not lift relations in a whole run
    (training/runs/pilots-2026-12-02.md)."""
    aux_attention: float = 0.0
    """Weight of :class:`AttentionGuide`'s loss (0: off): question-driven attention supervised onto what the
    question names."""
    attention_at: str = "word"
    """Where :class:`AttentionGuide` supervises: ``word``, ``answer``, ``route``, comma-separated. Measured
    (training/runs/pilots-2026-12-02.md): ``word`` alone lifts easy-VQA's yes/no but not where-questions, because
    the answer position never reads the word that found the object; ``word,route`` adds that second hop and is the
    one that moved where / relation / existence."""
    attention_layer: int = 2
    """The LM layer whose heads ``answer`` / ``route`` supervise (after layer 1, where the quadrant words look)."""
    lead_families: str = ""
    """Comma-separated shapes families (and ``where``): each shapes conversation then opens with a question drawn
    from them, its other turns following. Only the first turn has the evaluation prompt's layout (with
    ``question_first``, the only one whose visual tokens read the question), so this is where the families that
    need the question's words at the visual tokens are trained."""
    where_questions: int = 0
    """1: shapes conversations also ask "where is the <colour> shape?" for every object (training-only)."""
    extra_relations: int = 0
    extra_exists: int = 0
    """More relation / existence questions per shapes conversation (other pairs), after the one per family."""
    sheets: int = 0
    vision_steps: int = 0
    """Steps before the main schedule that train the vision tower and the probe alone, on ``batch_size`` sheets each
    (about a fifth of a full step's compute): the tower learns to see digits and shapes before the LM reads it."""
    """Training sheets (many digits and shapes, :func:`shapes.sheet`) per step, seen by the vision tower and the probe
    only: ten times the digits per image that a scene has, for a few percent of a step's compute."""
    max_positions: int = 512
    init_from: str = ""
    """A saved model to start from instead of random weights: tensors of equal shape are copied; CLIP's position
    table and patch kernel are resized when the image or patch size differ (see :func:`warm_start`)."""
    distill_from: str = ""
    """A trained model whose feature layer the vision tower learns to reproduce (its grid resized to this one's,
    [CLS] to [CLS]), on every image the tower sees; with ``init_from`` the same model, its projector and LM then
    read the new tower from the first step. Needs the probe (``aux_weight`` > 0), whose hook reads the states."""
    distill_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    notes: dict = field(default_factory=dict)


def vocabulary() -> list[str]:
    """Every word the data uses plus the demo's, fixed in order so the same config gives the same tokenizer."""
    words = set(shapes.WORDS) | set(shapes.TRAINING_WORDS) | easyvqa.words() | set(_WORDS) | set(CHAT_WORDS)
    return sorted(words - set(SPECIALS))


def build_model(cfg: TrainConfig):
    """Fresh ``(model, processor)`` for ``cfg``, seeded."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    tokenizer = build_tokenizer(vocabulary())
    processor = build_processor(
        tokenizer,
        cfg.image_size,
        cfg.patch_size,
        chat_template=QUESTION_FIRST_TEMPLATE if cfg.question_first else CHAT_TEMPLATE,
    )
    vision = CLIPVisionConfig(
        hidden_size=cfg.vision_width,
        intermediate_size=cfg.vision_mlp,
        num_hidden_layers=cfg.vision_layers,
        num_attention_heads=cfg.vision_heads,
        image_size=cfg.image_size,
        patch_size=cfg.patch_size,
    )
    text = LlamaConfig(
        hidden_size=cfg.text_width,
        intermediate_size=cfg.text_mlp,
        num_hidden_layers=cfg.text_layers,
        num_attention_heads=cfg.text_heads,
        num_key_value_heads=cfg.text_kv_heads,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        max_position_embeddings=cfg.max_positions,
        tie_word_embeddings=True,
        rope_parameters={"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
    )
    config = LlavaConfig(
        vision_config=vision,
        text_config=text,
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
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
    ys, xs = torch.meshgrid(
        torch.arange(side, dtype=torch.float32), torch.arange(side, dtype=torch.float32), indexing="ij"
    )
    parts = []
    for coord in (xs.flatten(), ys.flatten()):
        angle = coord[:, None] * freq[None]
        parts += [angle.sin(), angle.cos()]
    table = torch.cat(parts, 1)
    with torch.no_grad():
        emb[1:, : table.shape[1]] = 0.5 * table
        emb[1:, table.shape[1] :] = 0.0


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


AUX_COLOURS = tuple(sorted(set(shapes.COLOURS) | easyvqa.COLOURS))
AUX_SHAPES = tuple(sorted(set(shapes.SHAPES) | {"rectangle"}))
AUX_HEADS = {"colour": len(AUX_COLOURS) + 1, "shape": len(AUX_SHAPES) + 1, "digit": 11, "quadrant": 5}
"""Per-patch training targets for the vision tower; class 0 of each is "nothing of that kind here" (quadrant: the
patch's own quadrant 1-4, in :data:`shapes.QUADRANTS` order, and only with ``aux_quadrant``)."""
TARGET_ROWS = {"colour": 0, "shape": 1, "digit": 2, "object": 3, "digit_instance": 4, "quadrant": 5, "mask": 6}
"""Rows of a target tensor: the heads' classes, which object (1..) and which digit (1..) each patch belongs to
(0: none, for the pooled loss), the patch's quadrant, then from row 6 on the patch's drawn-pixel mask, one row per
sub-cell (:func:`mask_side`)."""
POOLED = {"colour": "object", "shape": "object", "digit": "digit_instance"}
"""Heads the pooled loss reads per instance, and the row that says which patches make one instance."""
IGNORE = -100
WORD_TARGETS = {"colour": AUX_COLOURS, "shape": AUX_SHAPES, "row": ("top", "bottom"), "column": ("left", "right")}
"""The words :meth:`PatchProbe.word_loss` scores patches against, in target-class order (``aux_words``)."""


def aux_heads(cfg: TrainConfig) -> dict[str, int]:
    """The probe heads a config trains, in target-row order (``mask``: one binary logit per sub-cell)."""
    heads = {k: n for k, n in AUX_HEADS.items() if k != "quadrant" or cfg.aux_quadrant}
    if cfg.aux_mask:
        heads["mask"] = mask_side(cfg.patch_size, cfg.image_size) ** 2
    return heads


def mask_side(patch: int, size: int) -> int:
    """Sub-cells per patch side for the mask target: cells of about 2 x 2 pixels of the 96-px scene, at most
    ``patch // 2`` (4 x 4 per 8-px patch at 96 px, 2 x 2 per 14-px patch at 336 px)."""
    return max(1, min(patch // 2, round(patch * shapes.IMAGE_SIZE / size / 2)))


def _mask_rows(drawn: np.ndarray, patch: int, size: int) -> torch.Tensor:
    """``[side * side, patches]``: 1 where at least half of a sub-cell's pixels are drawn (``drawn``: ``[size,
    size]``)."""
    m = mask_side(patch, size)
    cells = _per_patch(drawn, patch).reshape(-1, patch, patch)[:, : patch // m * m, : patch // m * m]
    blocks = cells.reshape(len(cells), m, patch // m, m, patch // m).mean((2, 4))
    return torch.from_numpy((blocks >= 0.5).reshape(len(cells), m * m).T.astype(np.int64))


def _per_patch(pixels: np.ndarray, patch: int) -> np.ndarray:
    """``[H, W, ...]`` to ``[patches, patch * patch, ...]`` in the vision tower's row-major patch order."""
    side = pixels.shape[0] // patch
    rest = pixels.shape[2:]
    cut = pixels[: side * patch, : side * patch].reshape(side, patch, side, patch, *rest)
    return cut.swapaxes(1, 2).reshape(side * side, patch * patch, *rest)


def _min_pixels(per_8px_patch: int, patch: int) -> int:
    """A pixel threshold given for 8-px patches, kept as the same share of a ``patch``-px patch."""
    return max(1, round(per_8px_patch * patch * patch / 64))


def scene_targets(scene, patch: int, size: int = shapes.IMAGE_SIZE, min_pixels: int | None = None) -> torch.Tensor:
    """``[rows, patches]`` colour / shape / digit class of what each patch mostly shows (shapes scenes), which
    object and which digit it belongs to, its quadrant and drawn-pixel mask (:data:`TARGET_ROWS`).

    A patch takes the object (or digit) with the most pixels in it if it covers at least ``min_pixels`` (default:
    4 of an 8-px patch's 64, the same share for other patch sizes), so the 7 px shapes still label the patches they
    sit in (their shape is ignored: nobody asks it). ``size`` is the side the processor resizes images to.
    """
    return _targets(shapes.label_map(scene), scene.objects, {shapes.DIGIT_LABEL: scene.digit}, patch, size, min_pixels)


def sheet_targets(sheet, patch: int, size: int = shapes.IMAGE_SIZE, min_pixels: int | None = None) -> torch.Tensor:
    """As :func:`scene_targets`, for a training sheet of many digits and shapes (:func:`shapes.sheet`)."""
    digits = {shapes.SHEET_DIGIT + j: d for j, (d, _, _) in enumerate(sheet.digits)}
    return _targets(shapes.sheet_labels(sheet), sheet.objects, digits, patch, size, min_pixels)


def _targets(
    labels: np.ndarray, objects, digits: dict[int, int], patch: int, size: int, min_pixels: int | None
) -> torch.Tensor:
    """Per-patch targets from a label map: object ``k`` is label ``k + 1``, ``digits`` maps labels to digits."""
    min_pixels = _min_pixels(4, patch) if min_pixels is None else min_pixels
    if size != labels.shape[0]:
        labels = np.asarray(Image.fromarray(labels).resize((size, size), Image.NEAREST))
    cells = _per_patch(labels, patch)
    out = torch.zeros(5, cells.shape[0], dtype=torch.long)
    extra = [quadrant_targets(size // patch)[None], _mask_rows(labels > 0, patch, size)]
    ink = np.zeros(cells.shape[0], dtype=np.int64)  # the most pixels any one digit has in each patch
    for j, (label, d) in enumerate(digits.items()):
        count = (cells == label).sum(1)
        more = torch.from_numpy((count >= min_pixels) & (count > ink))
        out[2, more] = d + 1
        out[4, more] = j + 1
        ink = np.maximum(ink, count)
    best = np.zeros(cells.shape[0], dtype=np.int64)
    for k, o in enumerate(objects):
        count = (cells == k + 1).sum(1)
        mine = torch.from_numpy((count >= min_pixels) & (count >= ink) & (count > best))
        out[0, mine] = AUX_COLOURS.index(o.colour) + 1
        # no question asks the shape of a tiny (7-9 px) object, and at that size a circle is nearly a square
        out[1, mine] = AUX_SHAPES.index(o.shape) + 1 if o.size >= shapes.SHAPE_MIN else IGNORE
        out[3, mine] = k + 1
        best = np.maximum(best, count)
    return torch.cat([out, *extra])


def quadrant_targets(side: int) -> torch.Tensor:
    """``[side * side]``: each patch's quadrant, 1-4 in :data:`shapes.QUADRANTS` order (row-major patches).

    Shapes objects never cross the midlines, and with an even grid no patch does either, so for an object's patches
    this is also the object's quadrant.
    """
    rows = torch.arange(side)[:, None].expand(side, side)
    cols = torch.arange(side)[None, :].expand(side, side)
    return (1 + (cols >= side // 2).long() + 2 * (rows >= side // 2).long()).flatten()


def easyvqa_targets(
    image, colour: str | None, shape: str | None, size: int, patch: int, min_pixels: int | None = None
) -> torch.Tensor:
    """``[rows, patches]`` (:data:`TARGET_ROWS`) for an easy-VQA image: one shape on a plain background (the
    border's commonest colour).

    Patches the shape covers (default: 8 pixels of an 8-px patch, the same share for other sizes) take its colour /
    shape class when the image's own questions name them (unknown: ignored); easy-VQA has no digits, so that head
    learns "none" there.
    """
    min_pixels = _min_pixels(8, patch) if min_pixels is None else min_pixels
    pixels = np.asarray(image.convert("RGB").resize((size, size), Image.NEAREST)).astype(np.int32)
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    colours, counts = np.unique(border, axis=0, return_counts=True)
    fg = np.abs(pixels - colours[counts.argmax()]).sum(-1) > 60
    on = torch.from_numpy(_per_patch(fg, patch).sum(1) >= min_pixels)
    out = torch.zeros(5, on.numel(), dtype=torch.long)
    for row, value, names in ((0, colour, AUX_COLOURS), (1, shape, AUX_SHAPES)):
        out[row, on] = names.index(value) + 1 if value is not None else IGNORE
    out[3, on] = 1  # one object
    return torch.cat([out, quadrant_targets(size // patch)[None], _mask_rows(fg, patch, size)])


class PatchProbe(nn.Module):
    """A linear read-out of the feature layer's patch states, used only while training (never saved).

    It gives the vision tower a per-patch loss (what colour / shape / digit is here, and with ``aux_quadrant``
    where) on top of the answer loss. The shipped model is the stock LLaVA class alone; the probe is dropped after
    training. With ``aux_balance`` each head weighs the patches that show something as much as the background.
    """

    def __init__(self, model, cfg: TrainConfig, tokenizer=None):
        super().__init__()
        self.heads = aux_heads(cfg)
        self.balance = bool(cfg.aux_balance)
        self.pooled = bool(cfg.aux_pooled)
        with torch.random.fork_rng():  # seeded like the model: the same config gives the same run
            torch.manual_seed(cfg.seed + 1)
            self.head = nn.Linear(model.config.vision_config.hidden_size, sum(self.heads.values()))
        layers = model.model.vision_tower.encoder.layers
        index = len(layers) + model.config.vision_feature_layer  # hidden_states[-2] is the output of layer L-2
        self.states = None
        self.handle = layers[index].register_forward_hook(self._grab)
        self.words = None
        self.projected = None
        self.word_handle = None
        if cfg.aux_words > 0:
            if tokenizer is None:
                raise ValueError("aux_words needs the tokenizer (the words' embeddings are the classifier)")
            self._embeddings = [model.get_input_embeddings()]  # a list: the LM's table is not the probe's parameter
            self.words = {
                name: torch.tensor(tokenizer.convert_tokens_to_ids(list(words))) for name, words in WORD_TARGETS.items()
            }
            self.word_handle = model.model.multi_modal_projector.register_forward_hook(self._grab_projected)

    def _grab_projected(self, module, args, output):
        self.projected = output

    def _grab(self, module, args, output):
        self.states = output[0] if isinstance(output, tuple) else output

    def _parts(self):
        logits = self.head(self.states[:, 1:])  # drop CLS
        start = 0
        for name, n in self.heads.items():
            yield name, n, logits[..., start : start + n]
            start += n

    @staticmethod
    def _instances(part: torch.Tensor, labels: torch.Tensor, which: torch.Tensor):
        """Logits averaged over each instance's patches ``[B, K, n]`` and each instance's label ``[B, K]``."""
        k = int(which.max())
        member = nn.functional.one_hot(which, k + 1)[..., 1:]  # [B, P, K]
        count = member.sum(1)  # [B, K]
        logits = torch.einsum("bpk,bpn->bkn", member.to(part.dtype), part) / count.clamp(min=1)[..., None]
        label = (member * labels[..., None]).sum(1) // count.clamp(min=1)  # one label per instance
        return logits, torch.where(count > 0, label, IGNORE)

    def loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy of the heads on the last forward's patches (``targets`` [B, rows, P], see
        :data:`TARGET_ROWS`), and with ``aux_pooled`` of the colour / shape / digit heads per instance."""
        terms = []
        for name, n, part in self._parts():
            if name == "mask":
                terms.append(self._mask_loss(part, targets))
                continue
            t = targets[:, TARGET_ROWS[name]].reshape(-1)
            if self.balance:
                ce = nn.functional.cross_entropy(part.reshape(-1, n), t, ignore_index=IGNORE, reduction="none")
                groups = [m for m in (t > 0, t == 0) if m.any()]
                terms.append(sum(ce[m].mean() for m in groups) / max(1, len(groups)))
            else:
                terms.append(nn.functional.cross_entropy(part.reshape(-1, n), t, ignore_index=IGNORE))
            if self.pooled and name in POOLED and targets[:, TARGET_ROWS[POOLED[name]]].any():
                logits, label = self._instances(
                    part, targets[:, TARGET_ROWS[name]], targets[:, TARGET_ROWS[POOLED[name]]]
                )
                if (label != IGNORE).any():
                    terms.append(
                        nn.functional.cross_entropy(logits.reshape(-1, n), label.reshape(-1), ignore_index=IGNORE)
                    )
        return sum(terms) / len(terms)

    def word_loss(self, targets: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of the last projector output's patches read through the LM's word embeddings: colour and
        shape words where a patch shows an object (``targets`` as in :meth:`loss`), row and column words
        everywhere."""
        feats = self.projected.reshape(targets.shape[0], targets.shape[-1], -1)  # [B, P, D]
        table = self._embeddings[0].weight
        quadrant = targets[:, TARGET_ROWS["quadrant"]] - 1  # 0-3 in shapes.QUADRANTS order
        labels = {
            "colour": targets[:, TARGET_ROWS["colour"]] - 1,
            "shape": targets[:, TARGET_ROWS["shape"]] - 1,
            "row": quadrant // 2,
            "column": quadrant % 2,
        }
        terms = []
        for name, ids in self.words.items():
            label = labels[name]
            on = label >= 0  # colour / shape: patches that show an object whose colour / shape is known
            if on.any():
                terms.append(nn.functional.cross_entropy(feats[on] @ table[ids].T, label[on]))
        return sum(terms) / len(terms)

    @staticmethod
    def _mask_parts(part: torch.Tensor, targets: torch.Tensor):
        t = targets[:, TARGET_ROWS["mask"] : TARGET_ROWS["mask"] + part.shape[-1]].transpose(1, 2).float()
        return part, t, t.amax(-1) > 0  # logits and targets [B, P, cells]; patches with anything drawn

    def _mask_loss(self, part: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Binary cross-entropy per sub-cell; patches with something drawn weigh as much as the rest together."""
        logits, t, drawn = self._mask_parts(part, targets)
        bce = nn.functional.binary_cross_entropy_with_logits(logits, t, reduction="none").mean(-1)
        groups = [m for m in (drawn, ~drawn) if m.any()]
        return sum(bce[m].mean() for m in groups) / len(groups)

    @torch.no_grad()
    def accuracy(self, targets: torch.Tensor) -> dict[str, float]:
        """Per head, the share of patches that show something (target > 0) whose class the probe gets right; for the
        pooled heads also the share of instances (``digit@instance``, ...)."""
        out = {}
        for name, _n, part in self._parts():
            if name == "mask":  # sub-cells right, on patches with something drawn
                logits, t, drawn = self._mask_parts(part, targets)
                if drawn.any():
                    out[name] = round(((logits[drawn] > 0) == (t[drawn] > 0)).float().mean().item(), 3)
                continue
            t = targets[:, TARGET_ROWS[name]]
            on = t > 0
            if on.any():
                out[name] = round((part.argmax(-1)[on] == t[on]).float().mean().item(), 3)
            which = targets[:, TARGET_ROWS[POOLED[name]]] if name in POOLED else None
            if which is not None and which.any() and name != "colour":
                logits, label = self._instances(part, t, which)
                known = label > 0
                if known.any():
                    out[f"{name}@instance"] = round((logits.argmax(-1)[known] == label[known]).float().mean().item(), 3)
        return out

    def remove(self) -> None:
        self.handle.remove()
        if self.word_handle is not None:
            self.word_handle.remove()


class AttentionGuide:
    """Training-only: teaches a few LM heads to look where a question points (``aux_attention``).

    Run final144 reads digits and counts but answers "where is the red shape?" at chance: its LM never learned to
    attend to the patches a question picks out, although its feature layer names every patch's colour and quadrant
    (training/runs/pilots-2026-12-02.md). The answer loss alone teaches that look-up slowly, so this loss supervises
    it directly. Placements (``attention_at``, comma-separated):

    - ``word``: in layer 0 a colour word's head 0, a shape word's head 1 and the word "digit"'s head 2 attend to the
      patches showing that colour / shape / the digit; in layer 1 the second word of a quadrant ("top left"), head
      0, attends to the object in that quadrant (by layer 1 it has read the word before it).
    - ``answer``: every position that predicts an answer word, in layer ``attention_layer``, head 0 attends to the
      patches of the first thing the question names (the object in its quadrant, else its first colour, else the
      digit, else its shape) and head 1 to the second (a relation's second colour, an existence question's shape).
    - ``route``: the same positions, in layer ``attention_layer``, heads 2 and 3 attend to the question's words for
      those two things instead. With ``word`` these words have already read their object, so this is the second
      hop of a two-step look-up (answer -> word -> patches).

    The loss is ``-log`` of the attention mass on the named keys (any spread over them is fine); words that name
    nothing in the image (a colour the scene lacks) are skipped. Only the rows and heads it needs are computed, from
    the layer's own q / k projections and rotary embeddings, so the model keeps SDPA.
    """

    PLACEMENTS = ("word", "answer", "route")

    def __init__(self, model, tokenizer, at: str = "word", layer: int = 2):
        self.at = {a.strip() for a in at.split(",") if a.strip()}
        if not self.at or self.at - set(self.PLACEMENTS):
            raise ValueError(f"attention_at must list some of {self.PLACEMENTS}, not {at!r}")
        lm = model.model.language_model
        self.answer_layer = layer
        layers = sorted(({0, 1} if "word" in self.at else set()) | ({layer} if self.at - {"word"} else set()))
        if max(layers) >= len(lm.layers):
            raise ValueError(f"attention guide needs LM layer {max(layers)}; the model has {len(lm.layers)}")
        self.image_id = model.config.image_token_id
        self.attn = {i: lm.layers[i].self_attn for i in layers}
        self.inputs: dict[int, tuple] = {}
        self.handles = [self.attn[i].register_forward_hook(self._grabber(i), with_kwargs=True) for i in layers]
        ids = tokenizer.convert_tokens_to_ids
        self.colours = {ids(w): k + 1 for k, w in enumerate(AUX_COLOURS)}
        self.shapes = {ids(w): k + 1 for k, w in enumerate(AUX_SHAPES)}
        self.digit = ids("digit")
        self.eos = tokenizer.eos_token_id
        self.rows = {ids("top"): 0, ids("bottom"): 1}
        self.columns = {ids("left"): 0, ids("right"): 1}
        self.last_mass = float("nan")

    def _grabber(self, layer: int):
        def grab(module, args, kwargs, output):
            hidden = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
            self.inputs[layer] = (hidden, kwargs["position_embeddings"])

        return grab

    def items(
        self, input_ids: torch.Tensor, labels: torch.Tensor, attention_mask: torch.Tensor, targets: torch.Tensor
    ) -> list[tuple[int, int, int, int, torch.Tensor]]:
        """``(row, position, layer, head, keys)`` for every supervised query; ``keys`` are the sequence positions
        it should attend to (``targets`` as in :meth:`PatchProbe.loss`)."""
        out = []
        colour, shape = targets[:, TARGET_ROWS["colour"]], targets[:, TARGET_ROWS["shape"]]
        digit, obj = targets[:, TARGET_ROWS["digit_instance"]], targets[:, TARGET_ROWS["object"]]
        quadrant = targets[:, TARGET_ROWS["quadrant"]]
        # plain lists: this walks every token of the batch on each training step
        asked = ((labels == IGNORE) & attention_mask.bool() & (input_ids != self.image_id)).tolist()
        answered = (labels != IGNORE).tolist()
        tokens = input_ids.tolist()
        length = input_ids.shape[1]
        for b in range(len(input_ids)):
            image_pos = (input_ids[b] == self.image_id).nonzero().flatten()
            named: list[tuple[str, torch.Tensor, int]] = []  # what the current question names, in order
            ids, ask, ans = tokens[b], asked[b], answered[b]
            for pos in range(length):
                if pos and ask[pos] and ans[pos - 1]:
                    named = []  # a new question starts
                if pos + 1 < length and ans[pos + 1] and ids[pos + 1] != self.eos:
                    # every position that predicts an answer word ("top" and "left" of "top left"), not the EOS
                    for h, entry in enumerate(self._answer_targets(named)):
                        if entry is None:
                            continue
                        if "answer" in self.at and entry[1].any():
                            out.append((b, pos, self.answer_layer, h, image_pos[entry[1]]))
                        if "route" in self.at and entry[1].any():
                            out.append((b, pos, self.answer_layer, 2 + h, torch.tensor([entry[2]])))
                if not ask[pos]:
                    continue
                t = ids[pos]
                item = None
                if t in self.colours:
                    item, kind = (0, 0, colour[b] == self.colours[t]), "colour"
                elif t in self.shapes:
                    item, kind = (0, 1, shape[b] == self.shapes[t]), "shape"
                elif t == self.digit:
                    item, kind = (0, 2, digit[b] > 0), "digit"
                elif t in self.columns and pos > 0 and ids[pos - 1] in self.rows:
                    q = 1 + self.columns[t] + 2 * self.rows[ids[pos - 1]]
                    item, kind = (1, 0, (obj[b] > 0) & (quadrant[b] == q)), "quadrant"
                if item is not None:
                    named.append((kind, item[2], pos))
                    if "word" in self.at and item[2].any():
                        out.append((b, pos, item[0], item[1], image_pos[item[2]]))
        return out

    @staticmethod
    def _answer_targets(named: list[tuple]) -> list:
        """Head 0's and head 1's entries for a question that named ``named`` ((kind, patches, position), in
        order)."""
        kinds = [n[0] for n in named]
        pick = lambda kind, nth=0: [n for n in named if n[0] == kind][nth]  # noqa: E731
        if "quadrant" in kinds:
            first = pick("quadrant")
        elif "colour" in kinds:
            first = pick("colour")
        elif "digit" in kinds:
            first = pick("digit")
        elif "shape" in kinds:
            return [pick("shape"), None]
        else:
            return []
        if kinds.count("colour") >= 2:
            second = pick("colour", 1)
        elif "shape" in kinds and "quadrant" not in kinds:
            second = pick("shape")
        else:
            second = None
        return [first, second]

    def loss(self, batch: dict, targets: torch.Tensor) -> torch.Tensor | None:
        """Mean ``-log`` attention mass on the named keys over the last forward's supervised queries (None if
        the batch has none)."""
        from transformers.models.llama.modeling_llama import rotate_half  # the LM's own rotary helper

        input_ids, mask = batch["input_ids"], batch["attention_mask"]
        items = self.items(input_ids, batch["labels"], mask, targets)
        if not items:
            return None
        terms, masses = [], []
        length = input_ids.shape[1]
        for layer in self.attn:
            group = [it for it in items if it[2] == layer]
            if not group:
                continue
            attn = self.attn[layer]
            hidden, (cos, sin) = self.inputs[layer]
            cos, sin = (t.expand(hidden.shape[0], *t.shape[1:]) for t in (cos, sin))  # [1, L, d] when shared
            rows = torch.tensor([it[0] for it in group])
            pos = torch.tensor([it[1] for it in group])
            heads = torch.tensor([it[3] for it in group])
            d = attn.head_dim
            q = attn.q_proj(hidden[rows, pos]).view(len(group), -1, d)[torch.arange(len(group)), heads]
            q = q * cos[rows, pos] + rotate_half(q) * sin[rows, pos]
            k = attn.k_proj(hidden).view(*hidden.shape[:2], -1, d)
            kv = heads // attn.num_key_value_groups
            k = k[rows, :, kv]  # [n, L, d]
            k = k * cos[rows] + rotate_half(k) * sin[rows]
            scores = torch.einsum("nd,nld->nl", q, k) * attn.scaling
            valid = mask[rows].bool() & (torch.arange(length)[None] <= pos[:, None])
            logp = scores.masked_fill(~valid, float("-inf")).log_softmax(-1)
            named = torch.zeros(len(group), length, dtype=torch.bool)
            for i, it in enumerate(group):
                named[i, it[4]] = True
            mass = logp.masked_fill(~named, float("-inf")).logsumexp(-1)
            terms.append(-mass)
            masses.append(mass.detach().exp())
        self.last_mass = torch.cat(masses).mean().item()
        return torch.cat(terms).mean()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def warm_start(model, source: str | Path) -> list[str]:
    """Copy a saved model's weights into ``model``; returns the names that had to be resized.

    Tensors of equal shape are copied as they are. CLIP's position table is resampled as a grid (bicubic, [CLS]
    row kept) and the patch kernel resized (bilinear, scaled by the area ratio and shifted so a flat colour gives
    the same embedding) when the image or patch size differ, as when a ViT is moved to a higher resolution. Any
    other shape mismatch is an error.
    """
    from transformers import AutoModelForImageTextToText

    src = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).state_dict()
    dst = model.state_dict()
    resized, problems = [], []
    with torch.no_grad():
        for name, value in dst.items():
            if name not in src:
                problems.append(f"{name} missing in {source}")
                continue
            old = src[name]
            if old.shape == value.shape:
                value.copy_(old)
            elif name.endswith("position_embedding.weight") and old.shape[1] == value.shape[1]:
                side_old, side_new = math.isqrt(old.shape[0] - 1), math.isqrt(value.shape[0] - 1)
                grid = old[1:].T.reshape(1, -1, side_old, side_old)
                grid = nn.functional.interpolate(grid, size=(side_new, side_new), mode="bicubic", align_corners=False)
                value[0] = old[0]
                value[1:] = grid.reshape(-1, side_new * side_new).T
                resized.append(name)
            elif name.endswith("patch_embedding.weight") and old.shape[:2] == value.shape[:2]:
                area = value.shape[2] * value.shape[3]
                kernel = nn.functional.interpolate(old, size=value.shape[2:], mode="bilinear", align_corners=False)
                kernel = kernel * (old.shape[2] * old.shape[3]) / area
                # an even shift per (out, in) channel makes the sums equal: a flat colour embeds exactly as before
                kernel += (old.sum((2, 3), keepdim=True) - kernel.sum((2, 3), keepdim=True)) / area
                value.copy_(kernel)
                resized.append(name)
            else:
                problems.append(f"{name}: {tuple(old.shape)} in {source}, {tuple(value.shape)} here")
    if problems:
        raise ValueError("cannot start from " + str(source) + ": " + "; ".join(problems))
    return resized


class Teacher:
    """A trained model's feature layer as a regression target for a new tower (``distill_from``), frozen.

    The teacher sees each image through its own processor; its patch grid is resized (nearest) to the student's,
    so at 576 tokens each of the 144-token teacher's features stands for a 2 x 2 block. The loss is the mean squared
    error over the teacher's overall variance, [CLS] included.
    """

    def __init__(self, source: str | Path, student):
        from transformers import AutoModelForImageTextToText, AutoProcessor

        self.model = AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()
        self.processor = AutoProcessor.from_pretrained(source)
        self.layer = self.model.config.vision_feature_layer
        self.side = student.config.vision_config.image_size // student.config.vision_config.patch_size
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def features(self, images) -> torch.Tensor:
        pixels = self.processor.image_processor(images, return_tensors="pt")["pixel_values"]
        states = self.model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[self.layer]
        cls, grid = states[:, :1], states[:, 1:]
        side = math.isqrt(grid.shape[1])
        grid = grid.transpose(1, 2).reshape(len(grid), -1, side, side)
        grid = nn.functional.interpolate(grid, size=(self.side, self.side), mode="nearest")
        return torch.cat([cls, grid.flatten(2).transpose(1, 2)], 1)

    def loss(self, images, states: torch.Tensor) -> torch.Tensor:
        target = self.features(images)
        return ((states - target) ** 2).mean() / target.var().clamp(min=1e-6)


def lr_at(step: int, cfg: TrainConfig) -> float:
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
