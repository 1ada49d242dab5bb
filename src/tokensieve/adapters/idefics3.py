"""Idefics3 and SmolVLM: a SigLIP-style tower, a pixel-shuffle connector, crops of an image as separate runs.

Choices:

* **Candidates are connector tokens.** Each is one pixel-shuffle group of ``scale_factor**2`` encoder patches, so
  both stages select on the same set: post-projector on the projected tokens, pre-projector on the shuffled
  (concatenated-group) vectors just before the connector's linear projection, which then projects only the kept
  groups. The group each token covers is read off the model by running its own ``pixel_shuffle`` on patch ids.
* **Crops.** The processor turns a large image into a grid of crops plus a global view; each crop is its own run of
  ``image_seq_len`` placeholders between text tokens. Every crop is one span here. Which crops form an image is read
  from ``input_ids``: an image's last crop is its global view, and the token before a global view's run is the same
  for every image (the last run of every sample is one), so runs preceded by that token close an image.
* **Budgets.** ``crop``: k per crop. ``image`` (default): k per image split equally over its crops; a ratio is the
  same ratio in every crop. ``global``: k per image, ranked across all its crops together (the crops side by side
  as one candidate set), so busy crops keep more and a crop may keep none.
* **Signals.** The tower has no CLS, so CLS attention is the documented CLS-free fallback: the mean attention each
  patch receives from the real (unpadded) queries of its crop. Hidden states, keys and received attention are
  averaged over each shuffle group. Padded patches (``pixel_attention_mask``) are excluded as queries and keys.
* Padding images in a batch (all-zero ``pixel_values`` added so samples have equal image counts) are dropped by the
  model itself; the kept crops follow the model's order.
"""

from __future__ import annotations

from typing import Any

import torch

from ..budget import Budget, Scope
from ..engine.attention import received_attention
from ..engine.capture import capture_encoder, rows_per_sequence
from ..engine.encoder_stage import run_encoder_stage
from ..engine.host import HostPrompt
from ..engine.placeholders import ImageSpan
from ..engine.select import select_each
from ..errors import BudgetError, NonFiniteFeaturesError, PlaceholderError, UnsupportedModelError
from ..methods.base import IN_ENCODER, IN_LLM, POST_PROJECTOR, PRE_PROJECTOR, Layout, Method, Selection, Signals
from ..methods.encoder import EncoderMethod
from ..report import ImageReport
from .base import Adapter, Encoded, now
from .towers import ClipTower


def _share_out(total: int, sizes: list[int]) -> list[int]:
    """Split ``total`` tokens over parts of ``sizes`` tokens in proportion (largest remainder), at least one per
    non-empty part, never more than a part holds."""
    whole = sum(sizes)
    shares = [total * n // whole for n in sizes]
    order = sorted(range(len(sizes)), key=lambda j: -(total * sizes[j] % whole))
    for j in order[: total - sum(shares)]:
        shares[j] += 1
    return [min(n, max(1, k)) if n else 0 for k, n in zip(shares, sizes)]


def _split_selection(sel: Selection, tokens: torch.Tensor, crops: int, per_crop: int):
    """Split one selection over ``crops`` side-by-side crops of ``per_crop`` candidates into one per crop.

    Yields ``(crop, Selection, tokens)``. A kept token belongs to its candidate's crop, a created one to its
    anchor's; one without an anchor (none on this CLS-free family today) goes to the last crop, the global view.
    Within a crop kept tokens stay first and in order, then created ones, as everywhere.
    """
    idx = sel.indices[0]
    if sel.tokens is None or idx.numel() == tokens.shape[0]:
        where = idx
    else:
        where = sel.anchors[0] if sel.anchors is not None else torch.full((tokens.shape[0],), -1)
    owner = torch.where(where >= 0, where // per_crop, crops - 1).to(torch.long).cpu()
    created = torch.arange(tokens.shape[0]) >= tokens.shape[0] - sel.num_merged
    local = torch.full((tokens.shape[0],), -1, dtype=torch.long)
    for c in range(crops):
        mine = owner == c
        local[mine] = torch.arange(int(mine.sum()))
    for c in range(crops):
        mine = owner == c
        kept = idx[(idx // per_crop) == c] - c * per_crop
        groups = None
        if sel.groups is not None:
            g = sel.groups[0, c * per_crop : (c + 1) * per_crop].cpu()
            groups = torch.where((g >= 0) & (owner[g.clamp(min=0)] == c), local[g.clamp(min=0)], -1)[None]
        part = Selection(
            indices=kept[None],
            tokens=tokens[mine.to(tokens.device)][None],
            num_merged=int((mine & created).sum()),
            groups=groups,
        )
        yield c, part, tokens[mine.to(tokens.device)]


class Idefics3Adapter(Adapter):
    family = "idefics3"
    model_classes = ("Idefics3ForConditionalGeneration", "SmolVLMForConditionalGeneration")
    model_types = ("idefics3", "smolvlm")
    display_names = ("Idefics3", "SmolVLM")
    scopes = (Scope.IMAGE, Scope.CROP, Scope.GLOBAL)
    stages = (PRE_PROJECTOR, POST_PROJECTOR, IN_ENCODER, IN_LLM)
    signal_kinds = ("hidden_states", "cls_attention", "keys", "cls_hidden", "attention_received")
    encoder_inputs = ("pixel_values", "pixel_attention_mask")

    def __init__(self, model) -> None:
        super().__init__(model)
        base = model.model
        vision = base.vision_model
        encoder = getattr(vision, "encoder", None)
        if encoder is None or not hasattr(encoder, "layers") or not hasattr(base.connector, "pixel_shuffle"):
            raise UnsupportedModelError(
                f"{type(model).__name__} is not supported: the idefics3 adapter needs vision_model.encoder.layers "
                "and a pixel-shuffle connector"
            )
        self.base = base
        self.layers = encoder.layers
        vc = model.config.vision_config
        side = vc.image_size // vc.patch_size
        scale = int(model.config.scale_factor)
        self.grid = (side // scale, side // scale)
        self.per_crop = self.grid[0] * self.grid[1]
        ids = torch.arange(side * side, dtype=torch.float64).view(1, -1, 1)
        # [G, scale^2]: encoder patches of each connector token, in the connector's own order
        self.groups = base.connector.pixel_shuffle(ids, scale).view(self.per_crop, -1).long()

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    def vision_modules(self) -> tuple:
        return self.base.vision_model, self.base.connector.modality_projection

    def meter_parts(self) -> tuple:
        return self.layers, [self.base.connector.modality_projection], None, rows_per_sequence

    # SigLIP attention exposes the same projections and head geometry as CLIP's
    _attention_parts = staticmethod(ClipTower._attention_parts)

    # -- layout ------------------------------------------------------------------------------------------------
    def _num_crops(self, encoder_kwargs: dict[str, Any]) -> int:
        pv = encoder_kwargs["pixel_values"]
        if pv.dim() != 5:
            raise PlaceholderError(
                f"{self.family} pixel_values must be [batch, crops, channels, height, width], got {tuple(pv.shape)}"
            )
        flat = pv.flatten(2)
        return int(((flat == 0).sum(-1) != flat.shape[-1]).sum())

    def tokens_per_image(self, encoder_kwargs: dict[str, Any]) -> list[int]:
        return [self.per_crop] * self._num_crops(encoder_kwargs)

    def find_spans(self, prompt, encoder_kwargs: dict[str, Any]) -> list[ImageSpan]:
        if isinstance(prompt, torch.Tensor):
            prompt = HostPrompt.of(prompt)
        spans = super().find_spans(prompt, encoder_kwargs)
        for span, image in zip(spans, self._group(prompt, spans)):
            span.group = image
        return spans

    @staticmethod
    def _group(prompt: HostPrompt, spans: list[ImageSpan]) -> list[int]:
        """Image index of every crop span, from the token that opens the global view's run."""
        before = [prompt.ids[s.sample][s.positions[0] - 1] if s.positions[0] > 0 else -1 for s in spans]
        last = {}
        for i, s in enumerate(spans):
            last[s.sample] = i
        closers = {before[i] for i in last.values()}
        if len(closers) != 1:
            raise PlaceholderError(
                "cannot tell which crops form an image: the last image runs of the samples are opened by different "
                f"tokens {sorted(closers)} (was the prompt built by this model's processor?)"
            )
        closer = closers.pop()
        image, out = 0, []
        for i, s in enumerate(spans):
            out.append(image)
            if before[i] == closer or i == last[s.sample]:
                image += 1
        return out

    @classmethod
    def limits_of(cls, config) -> dict[Scope, int]:
        vc = config.vision_config
        side = vc.image_size // vc.patch_size // int(config.scale_factor)
        return {Scope.CROP: side * side}  # an image's count depends on its crops

    def _shares(self, budget: Budget, images: list[int]) -> list[int]:
        """Tokens to keep per crop (``global`` ranks an image's crops together instead: no per-crop share)."""
        if budget.scope == Scope.GLOBAL:
            return [0] * len(images)
        if budget.is_ratio:
            return [budget.resolve(self.per_crop, what="each crop")] * len(images)
        if budget.scope == Scope.CROP:
            return [budget.resolve(self.per_crop, what="each crop")] * len(images)
        out = []
        for img in sorted(set(images)):
            crops = [i for i, g in enumerate(images) if g == img]
            total = budget.resolve(self.per_crop * len(crops), what="each image")
            c = len(crops)
            if budget.is_adaptive:  # mean, min and max shared over the crops, each crop adapting on its own
                out += [t.clamp(self.per_crop) for t in total.split(c)]
                continue
            if total < c:
                raise BudgetError(
                    f"a budget of {total} tokens cannot keep one token in each of the {c} crops of image {img}"
                )
            out += [total // c + (1 if j < total % c else 0) for j in range(c)]
        return out

    def llm_targets(self, budget: Budget, images: list) -> list[int]:
        """Entries are crops; an int per image (or ``global``) is that image's total, shared over its crops."""
        if budget.is_ratio or budget.scope == Scope.CROP:
            return super().llm_targets(budget, images)
        groups = [i if im.crop_of is None else im.crop_of for i, im in enumerate(images)]
        out = [0] * len(images)
        for g in sorted(set(groups)):
            idx = [i for i, x in enumerate(groups) if x == g]
            sizes = [images[i].tokens_out for i in idx]
            total = budget.resolve(sum(sizes), what=f"image {g} entering the LM")
            if total < len(idx):
                raise BudgetError(
                    f"a budget of {total} tokens cannot keep one token in each of the {len(idx)} crops of image {g}"
                )
            for i, k in zip(idx, _share_out(total, sizes)):
                out[i] = k
        return out

    # -- encode + select ---------------------------------------------------------------------------------------
    def _pool(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        """Average per-patch values over each shuffle group along ``dim``."""
        g = self.groups.to(x.device)
        picked = x.index_select(dim, g.flatten())
        shape = list(picked.shape)
        shape[dim : dim + 1] = [g.shape[0], g.shape[1]]
        return picked.view(shape).mean(dim=dim + 1)

    def _received(self, cap, layer: int, real: torch.Tensor) -> torch.Tensor:
        """[crops, H, P] mean attention each patch receives from the crop's real queries, padded keys masked."""
        q = cap.split_heads(cap.queries[layer], layer).float()
        k = cap.key_heads(layer).float()
        total = received_attention(
            q, k, cap.scale(layer), chunk=q.shape[-2], key_mask=real, query_mask=real.to(q.dtype)
        )  # one chunk: the whole crop
        return total / real.sum(-1).clamp(min=1)[:, None, None]

    def encode(self, method: Method, budget: Budget, encoder_kwargs: dict[str, Any], spans=None) -> Encoded:
        start = now()
        n = self._num_crops(encoder_kwargs)
        # which crops form an image: read off this call's prompt by find_spans
        images = [s.group for s in spans] if spans and all(s.group is not None for s in spans) else None
        if method.stage == IN_ENCODER:
            return self._encode_in_encoder(method, budget, encoder_kwargs, n, images, start)
        if images is None or len(images) != n:
            if budget.scope == Scope.GLOBAL or budget.scope == Scope.IMAGE and not budget.is_ratio:
                raise PlaceholderError(
                    f"a {budget} budget with scope {budget.scope.value!r} needs the prompt to tell which crops form "
                    "an image; call through the sieved model (or find_spans first), or use scope='crop'"
                )
            images = list(range(n))
        shares = self._shares(budget, images)
        fl = self.num_layers
        request = method.request(self.num_layers, fl)
        state: dict[str, Any] = {}

        def grab_mask(mod, args, kwargs):
            state["mask"] = kwargs.get("patch_attention_mask")

        def select(features: torch.Tensor) -> torch.Tensor:
            finite = torch.isfinite(features).flatten(1).all(dim=1)
            if not bool(finite.all()):
                bad = (~finite).nonzero().flatten().tolist()
                raise NonFiniteFeaturesError(
                    f"vision features of crop(s) {bad} contain NaN or Inf; check pixel_values and the model dtype"
                )
            t0 = now()
            mask = state.get("mask")
            real = (
                torch.ones(features.shape[0], len(self.groups.flatten()), dtype=torch.bool, device=features.device)
                if mask is None
                else mask.flatten(1).bool()
            )
            received = {
                i: self._received(cap, i, real) for i in set(request.cls_attention) | set(request.attention_received)
            }

            def signals_of(crops: list[int]) -> Signals:
                """One candidate set: these crops' tokens side by side (crops stacked as grid rows)."""
                cat = lambda x, dim: torch.cat([x[c : c + 1] for c in crops], dim=dim)  # noqa: E731
                return Signals(
                    features=cat(features, 1),
                    layout=Layout((self.grid[0] * len(crops), self.grid[1]), 0),
                    num_layers=self.num_layers,
                    feature_layer=fl,
                    hidden_states={i: self._pool(cat(cap.hidden_states[i], 1), 1) for i in request.hidden_states},
                    cls_attention={
                        i: torch.cat([self._pool(received[i][c : c + 1], 2) for c in crops], 2)
                        for i in request.cls_attention
                    },
                    keys={
                        i: torch.cat([self._pool(cap.key_heads(i)[c : c + 1], 2) for c in crops], 2)
                        for i in request.keys
                    },
                    attention_received={
                        i: torch.cat([self._pool(received[i][c : c + 1].mean(1), 1) for c in crops], 1)
                        for i in request.attention_received
                    },
                    cls_hidden=None,
                )

            out: list[torch.Tensor | None] = [None] * features.shape[0]
            sels: list[Selection | None] = [None] * features.shape[0]
            if budget.scope == Scope.GLOBAL:
                sets = [[c for c, g in enumerate(images) if g == img] for img in sorted(set(images))]
            else:
                sets = [[c] for c in range(features.shape[0])]
            for crops in sets:
                signals = signals_of(crops)
                k = (
                    shares[crops[0]]
                    if len(crops) == 1 and budget.scope != Scope.GLOBAL
                    else budget.resolve(signals.num_tokens, what=f"the {len(crops)} crops of an image together")
                )
                sel = select_each(method, signals, k)[0]
                tokens = sel.output(signals.features).to(features.dtype)[0]
                for c, part, tok in _split_selection(sel, tokens, len(crops), self.per_crop):
                    sels[crops[c]], out[crops[c]] = part, tok
            state["sels"], state["time"] = sels, now() - t0
            return out

        with capture_encoder(self.layers, request, self._attention_parts) as cap:
            h_mask = self.base.vision_model.register_forward_pre_hook(grab_mask, with_kwargs=True)
            try:
                if method.stage == POST_PROJECTOR:
                    res = self.base.get_image_features(
                        encoder_kwargs["pixel_values"], encoder_kwargs.get("pixel_attention_mask"), return_dict=True
                    )
                    pooled = torch.cat(list(res.pooler_output), dim=0).view(n, self.per_crop, -1)
                    features = select(pooled)
                else:
                    proj = self.base.connector.modality_projection
                    kept: dict[str, list] = {}

                    def pre(mod, args):
                        # crops may keep different counts: pad to the longest so the model's per-sample split of
                        # its [crops, tokens, d] output still holds, and trim the padding after projection
                        kept["f"] = select(args[0])
                        return (torch.nn.utils.rnn.pad_sequence(kept["f"], batch_first=True),)

                    h = proj.register_forward_pre_hook(pre)
                    try:
                        res = self.base.get_image_features(
                            encoder_kwargs["pixel_values"], encoder_kwargs.get("pixel_attention_mask"), return_dict=True
                        )
                    finally:
                        h.remove()
                    lens = [f.shape[0] for f in kept["f"]]
                    flat = torch.cat(list(res.pooler_output), dim=0).view(n, max(lens), -1)
                    features = [flat[c, :k] for c, k in enumerate(lens)]
            finally:
                h_mask.remove()
        sels = state["sels"]
        reports = []
        for c in range(n):
            sel = sels[c]
            reports.append(
                ImageReport(
                    sample=-1,
                    image=c,
                    tokens_in=self.per_crop,
                    tokens_out=int(features[c].shape[0]),
                    kept_indices=sel.indices[0].tolist(),
                    grid=self.grid,
                    merged=sel.num_merged,
                    selection_s=state["time"] / max(n, 1),
                    groups=None if sel.groups is None else sel.groups[0].tolist(),
                )
            )
        for r, image in zip(reports, images):
            r.crop_of = image
        side = self.grid[0] * int(self.model.config.scale_factor)
        trace = [side * side] * self.num_layers
        return Encoded(features, reports, encode_s=now() - start, selection_s=state["time"], encoder_layer_tokens=trace)

    # -- in-encoder ----------------------------------------------------------------------------------------------
    def _encode_in_encoder(
        self, method: EncoderMethod, budget: Budget, encoder_kwargs: dict[str, Any], n: int, images, start: float
    ) -> Encoded:
        """Cut inside SigLIP by whole pixel-shuffle groups, then let the model's own connector run on a full grid.

        Candidates are the connector's tokens, as for the other stages; a cut keeps or merges the scale_factor**2
        patches of a group together (with the stage's virtual CLS as the CLS-free signal). SigLIP's layers carry
        no positions (they are added to the embeddings), so the encoder stage's unit mode regroups the rows group by
        group at the first cut and later layers simply run on fewer rows. After the encoder the kept rows are scattered
        back onto the crop's grid (zeros elsewhere), the connector runs as usual, and only the kept groups' tokens are
        taken: the pixel shuffle and projection act per group, so the zeros never reach a kept token.
        """
        if budget.scope == Scope.GLOBAL:
            raise BudgetError(
                f"{method.name} cuts inside the encoder, where each crop runs on its own: scope 'global' (ranking "
                "across crops) is not possible there; use 'image' or 'crop'"
            )
        if images is None or len(images) != n:
            if budget.scope == Scope.IMAGE and not budget.is_ratio:
                raise PlaceholderError(
                    f"a {budget} budget with scope 'image' needs the prompt to tell which crops form an image; call "
                    "through the sieved model (or find_spans first), or use scope='crop'"
                )
            images = list(range(n))
        shares = self._shares(budget, images)
        pv = encoder_kwargs["pixel_values"].flatten(0, 1)
        real = pv.flatten(1).ne(0).any(1)  # the model drops all-zero padding images the same way
        crops = pv[real]
        pam = encoder_kwargs.get("pixel_attention_mask")
        if pam is not None and not bool(pam.flatten(0, 1)[real].all()):
            raise UnsupportedModelError(
                f"{method.name} cuts inside the encoder, which tokensieve does not do for crops with padded pixels "
                "(pixel_attention_mask) on idefics3 yet; use a pre- or post-projector method"
            )
        plan = method.plan(self.num_layers, self.num_layers)
        vision = self.base.vision_model
        features: list[torch.Tensor | None] = [None] * n
        reports: list[ImageReport | None] = [None] * n
        traces, selection_s = [], 0.0
        for target in sorted(set(shares)):  # crops that keep the same count run together
            run = [c for c in range(n) if shares[c] == target]
            res = run_encoder_stage(
                self.layers,
                self._attention_parts,
                method,
                plan,
                Layout(self.grid, 1),
                target,
                feature_layer=self.num_layers,
                record=[self.num_layers],
                run=lambda x: vision(pixel_values=x, return_dict=True),
                pixel_values=crops[run],
                cls_free=True,
                units=self.groups,
            )
            selection_s += res.selection_s
            traces += res.traces
            rows = vision.post_layernorm(torch.stack(res.hidden[self.num_layers]))  # kept groups' patches, in order
            d = rows.shape[-1]
            kept = [res.positions[j][1:].cpu() for j in range(len(run))]
            full = torch.zeros(len(run), self.groups.numel(), d, dtype=rows.dtype, device=rows.device)
            for j in range(len(run)):
                full[j, self.groups[kept[j]].flatten().to(rows.device)] = rows[j]
            tokens = self.base.connector(full)  # [crops, G, D]: pixel shuffle and projection act per group
            for j, c in enumerate(run):
                features[c] = tokens[j, kept[j].to(tokens.device)]
                reports[c] = ImageReport(
                    sample=-1,
                    image=c,
                    tokens_in=self.per_crop,
                    tokens_out=int(kept[j].numel()),
                    kept_indices=kept[j].tolist(),
                    grid=self.grid,
                    merged=int((res.sizes[j][1:] > 1).sum()),
                    selection_s=res.selection_s / len(run),
                    groups=None if res.groups[j] is None else res.groups[j].tolist(),
                )
        for r, image in zip(reports, images):
            if r is not None:
                r.crop_of = image
        trace = [round(sum(t[i] for t in traces) / max(len(traces), 1)) for i in range(self.num_layers)]
        return Encoded(features, reports, encode_s=now() - start, selection_s=selection_s, encoder_layer_tokens=trace)
