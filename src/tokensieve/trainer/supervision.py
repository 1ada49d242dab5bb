"""Training-only signals beside the answer loss: hooks and heads attached for a run and removed after it.

The answer loss alone teaches a small model to see and to look up slowly; these losses supervise the vision tower
(:class:`PatchProbe`, :class:`Teacher`) and the LM's attention (:class:`AttentionGuide`) directly. None of them is
saved: the shipped model is the stock LLaVA class alone.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from .config import TrainConfig
from .targets import AUX_COLOURS, AUX_HEADS, AUX_SHAPES, IGNORE, POOLED, TARGET_ROWS, WORD_TARGETS, mask_side


def aux_heads(cfg: TrainConfig) -> dict[str, int]:
    """The probe heads a config trains, in target-row order (``mask``: one binary logit per sub-cell)."""
    heads = {k: n for k, n in AUX_HEADS.items() if k != "quadrant" or cfg.aux_quadrant}
    if cfg.aux_mask:
        heads["mask"] = mask_side(cfg.patch_size, cfg.image_size) ** 2
    return heads


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
