"""The in-LLM stage: visual tokens leave the sequence between decoder layers, for the rest of prefill and decoding.

Instance-level forward pre-hooks on the LM's decoder layers (found by the adapter) run for one sieved call and are
removed in ``finally``. The decoder loop hands every layer full-length ``position_embeddings`` and a mask sized for
layer 0, so from a boundary on each layer's arguments are rewritten to the kept *slots*:

- hidden states are gathered at the boundary (each later layer receives the shorter output of the one before);
- cos/sin (and ``position_ids``) are gathered, so kept tokens keep their original RoPE phases;
- the prefill mask is the layer-0 mask gathered on rows and columns; while decoding, the prompt columns are
  replaced by the slots' validity and the new-token columns are kept, because the KV cache of a pruned layer
  holds only the kept slots;
- samples of a batch may keep different numbers of tokens: shorter ones get extra masked slots on the left, so
  the last slot is still each sample's last token and ``logits[:, -1]`` stays right.

Attention rows a method scores with are recomputed from the scoring layer's own norm and q/k projections with
RoPE, for the needed query rows only; the model keeps its SDPA (or eager) attention. Generation never reads the
KV-cache length of a pruned layer (positions and the mask come from layer 0), which is what makes this work with
``generate()``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import StageError
from ..methods.base import PRE_PROJECTOR, Method, Selection, Signals
from ..methods.llm import QUERY_LAST, QUERY_TEXT, LLMMethod, LLMSignals
from .attention import rotate
from .host import read_lists, to_device


class KeepAll(Method):
    """Pre-LLM stand-in when a sieve has only an in-LLM method: encode once, keep every token."""

    name = "keep-all"
    description = "keeps every visual token"
    stage = PRE_PROJECTOR

    def select(self, signals: Signals, k: int) -> Selection:
        idx = torch.arange(signals.num_tokens, device=signals.features.device)
        return Selection(indices=idx.expand(signals.batch, -1))


@dataclass(frozen=True)
class LLMParts:
    """What scoring needs from one decoder layer: its input norm, projections and head geometry."""

    norm: nn.Module
    q_proj: nn.Module
    k_proj: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float
    q_norm: nn.Module | None = None
    k_norm: nn.Module | None = None


@dataclass
class _Layout:
    """The slots a layer processes: per sample, original positions, validity, and which are visual (and of which
    image), on the device; and what the host knows of them without reading the device: the count of each image's
    visual slots, real tokens and alignment slots per sample, and (before the first boundary) every slot."""

    orig: torch.Tensor  # [B, N] positions in the prefill sequence (extra slots: 0)
    valid: torch.Tensor  # [B, N] real tokens (not padding, not extra)
    extra: torch.Tensor  # [B, N] slots added so samples line up
    image: torch.Tensor  # [B, N] image index within the sample, -1 for non-visual
    counts: list[list[int]]  # per sample, per image: its visual slots
    n_valid: list[int]  # per sample: real tokens
    n_extra: list[int]  # per sample: alignment slots
    host: list[tuple[list[int], list[bool], list[int]]] | None = None  # per sample (orig, valid, image) if known

    @property
    def visual(self) -> torch.Tensor:
        return self.image >= 0

    def gather(self, rel: torch.Tensor, extra: torch.Tensor, counts, n_valid, n_extra) -> _Layout:
        g = lambda t: t.gather(1, rel)  # noqa: E731
        extra = extra | g(self.extra)  # alignment slots of earlier boundaries stay alignment slots
        return _Layout(
            g(self.orig), g(self.valid) & ~extra, extra, g(self.image).masked_fill(extra, -1), counts, n_valid, n_extra
        )

    @property
    def trivial(self) -> bool:
        """Every slot is a real token (no padding, no alignment slot): known on the host."""
        width = self.orig.shape[1]
        return not any(self.n_extra) and all(n == width for n in self.n_valid)


def _allowed(mask: torch.Tensor) -> torch.Tensor:
    return mask if mask.dtype == torch.bool else mask > torch.finfo(mask.dtype).min / 2


def _format(allowed: torch.Tensor, like: torch.Tensor | None) -> torch.Tensor:
    if like is None or like.dtype == torch.bool:
        return allowed
    out = torch.zeros(allowed.shape, dtype=like.dtype, device=allowed.device)
    return out.masked_fill(~allowed, torch.finfo(like.dtype).min)


def _running(valid: list[bool]) -> list[int]:
    """Each slot's position among the real tokens before it (padding does not count)."""
    out, n = [], -1
    for v in valid:
        n += int(v)
        out.append(n)
    return out


@dataclass
class _Trace:
    tokens: list[list[int]] = field(default_factory=list)  # per layer, per sample
    visual: list[list[int]] = field(default_factory=list)
    per_image: list[list[list[int]]] = field(default_factory=list)  # per layer, per sample, per image


class LLMStage:
    """One in-LLM method armed for one call: the plan per image, and the hooks that carry it out.

    ``counts[b]`` are sample b's visual tokens per image as they enter the LM; ``targets[b]`` the layer-averaged
    tokens each may keep (``None`` for unbudgeted rules), already resolved by the adapter from the budget's scope.
    """

    def __init__(
        self,
        adapter,
        method: LLMMethod,
        targets: list[list[int]] | None,
        visual_index: torch.Tensor,
        attention_mask: torch.Tensor,
        counts: list[list[int]],
        host_image: list[list[int]] | None = None,
        host_mask: list[list[int]] | None = None,
    ) -> None:
        self.adapter = adapter
        self.method = method
        self.layers = adapter.decoder_layers()
        self.num_layers = len(self.layers)
        b, length = visual_index.shape
        self.length = length
        self.counts = counts
        if host_image is None or host_mask is None:  # a caller without the host's view of the prompt: read it once
            both = read_lists([visual_index, attention_mask])
            host_image = [both[0][s * length : (s + 1) * length] for s in range(b)]
            host_mask = [both[1][s * length : (s + 1) * length] for s in range(b)]
        self.host_valid = [[m != 0 for m in row] for row in host_mask]
        self.host_image = [[j if v else -1 for j, v in zip(img, val)] for img, val in zip(host_image, self.host_valid)]
        for s in range(b):
            have = [self.host_image[s].count(j) for j in range(len(counts[s]))]
            if have != list(counts[s]) or any(j >= len(counts[s]) for j in self.host_image[s]):
                raise StageError(f"sample {s} has visual slots {have} but its images account for {counts[s]}")
        self.base_image = visual_index.masked_fill(attention_mask == 0, -1).to(torch.long)
        self.base_valid = attention_mask != 0
        # plan: per sample, per image, [(layer, count)]; the boundaries are the union of all plans' layers
        self.plans = []
        for s in range(b):
            plans = []
            for j, n in enumerate(counts[s]):
                if n == 0:
                    plans.append([])
                    continue
                target = targets[s][j] if targets is not None and method.budgeted else None
                plans.append(method.schedule(n, self.num_layers, target))
            self.plans.append(plans)
        self.boundaries = sorted({layer for plans in self.plans for plan in plans for layer, _ in plan})
        for layer in self.boundaries:
            if not 1 <= layer < self.num_layers:
                raise StageError(
                    f"{method.name} planned a boundary at layer {layer}; the LM has {self.num_layers} layers"
                )
        self.capture_layers = set()
        if method.attention_from == "previous" and method.query is not None or method.needs_keys:
            self.capture_layers = {layer - 1 for layer in self.boundaries}
        self.handles: list = []
        self.trace: _Trace | None = None
        self.final: _Layout | None = None
        self.layouts: dict[int, _Layout] = {}  # layer -> layout it runs on (from the first boundary on)

    # -- install / remove ---------------------------------------------------------------------------------------
    def install(self) -> None:
        try:
            for i, layer in enumerate(self.layers):
                self.handles.append(
                    layer.register_forward_pre_hook(lambda m, a, k, _i=i: self._pre(_i, m, a, k), with_kwargs=True)
                )
        except BaseException:
            self.remove()
            raise

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    # -- the hook -------------------------------------------------------------------------------------------------
    def _pre(self, i: int, module, args, kwargs):
        hs = args[0] if args else kwargs["hidden_states"]
        if i == 0:
            pkv = kwargs.get("past_key_values")
            self._prefill = pkv is None or pkv.get_seq_length(0) == 0
            self._memo: dict = {}
            if self._prefill:
                self._start_prefill(hs)
        if self._prefill:
            hs, kwargs = self._prefill_layer(i, module, hs, kwargs)
        elif i in self.layouts:
            kwargs = dict(kwargs)
            kwargs["attention_mask"] = self._decode_mask(
                self.layouts[i], kwargs.get("attention_mask"), hs.shape[1], kwargs.get("past_key_values")
            )
        else:
            return None
        if args:
            return (hs,) + tuple(args[1:]), kwargs
        kwargs["hidden_states"] = hs
        return args, kwargs

    def _start_prefill(self, hs: torch.Tensor) -> None:
        b, length = hs.shape[:2]
        if length < self.length or b != self.base_valid.shape[0]:
            raise StageError(
                f"the LM received {b} x {length} tokens but the sieve prepared {tuple(self.base_valid.shape)}; an "
                "in-LLM stage can only run on the prompt it was prepared for"
            )
        ext = length - self.length  # a no-cache generate() re-runs the prompt plus the tokens generated so far
        dev = hs.device
        valid = torch.cat([self.base_valid, torch.ones(b, ext, dtype=torch.bool, device=dev)], 1)
        image = torch.cat([self.base_image, torch.full((b, ext), -1, dtype=torch.long, device=dev)], 1)
        orig = torch.arange(length, device=dev).expand(b, -1)
        host = []
        for s in range(b):
            v = self.host_valid[s] + [True] * ext
            host.append((list(range(length)), v, self.host_image[s] + [-1] * ext))
        self.host_real = [_running(v) for _, v, _ in host]  # each slot's position among its sample's real tokens
        self.cur = _Layout(
            orig,
            valid,
            torch.zeros_like(valid),
            image,
            [list(c) for c in self.counts],
            [sum(v) for _, v, _ in host],
            [0] * b,
            host,
        )
        self.base = self.cur
        self.full_length = length
        self.captured = None
        if self.trace is None:  # keep the first prefill's trace: the prompt's
            self._record = _Trace()
        else:
            self._record = None
        self.layouts = {}

    def _prefill_layer(self, i, module, hs, kwargs):
        kwargs = dict(kwargs)
        self._memo.setdefault("raw", dict(kwargs))  # every layer of one forward gets the same full-length arguments
        if self.cur is not self.base:
            kwargs = self._apply(self.cur, kwargs)
        if i in self.boundaries:
            new, rel = self._select(i, module, hs, kwargs)
            hs = hs.gather(1, rel.unsqueeze(-1).expand(-1, -1, hs.shape[-1]))
            self.cur = new
            kwargs = self._apply(new, self._memo["raw"])
        if self.cur is not self.base:
            self.layouts[i] = self.cur
        if i in self.capture_layers:
            cos, sin = kwargs["position_embeddings"]
            self.captured = (module, hs, cos, sin, self.cur)
        if self._record is not None:  # counts the host knows: no device read per layer
            lay = self.cur
            self._record.tokens.append(list(lay.n_valid))
            self._record.visual.append([sum(c) for c in lay.counts])
            self._record.per_image.append([list(c) for c in lay.counts])
            if i == self.num_layers - 1:
                self.trace, self.final = self._record, self.cur
        return hs, kwargs

    def _apply(self, lay: _Layout, kwargs: dict) -> dict:
        """Arguments of a layer that runs on ``lay``'s slots; computed once per layout and forward."""
        if "raw" not in self._memo:
            self._memo["raw"] = dict(kwargs)
        key = id(lay)
        if key in self._memo:
            return dict(kwargs, **self._memo[key])
        raw = self._memo["raw"]
        b, n = lay.orig.shape
        out = {}
        cos, sin = raw["position_embeddings"]
        if cos.shape[-2] != self.full_length:
            raise StageError(
                f"position embeddings of length {cos.shape[-2]} do not match the prompt ({self.full_length})"
            )
        idx = lay.orig.unsqueeze(-1).expand(-1, -1, cos.shape[-1])
        out["position_embeddings"] = (cos.expand(b, -1, -1).gather(1, idx), sin.expand(b, -1, -1).gather(1, idx))
        pid = raw.get("position_ids")
        if isinstance(pid, torch.Tensor) and pid.dim() == 2 and pid.shape[-1] == self.full_length:
            out["position_ids"] = pid.expand(b, -1).gather(1, lay.orig)
        out["attention_mask"] = self._prefill_mask(lay, raw.get("attention_mask"))
        self._memo[key] = out
        return dict(kwargs, **out)

    @staticmethod
    def _check_mask(mask) -> None:
        if mask is not None and not (isinstance(mask, torch.Tensor) and mask.dim() == 4):
            raise StageError(
                "in-LLM stages need the LM on 'sdpa' or 'eager' attention (a 4-D mask or none); got a "
                f"{type(mask).__name__} mask of shape {getattr(mask, 'shape', None)}"
            )

    def _prefill_mask(self, lay: _Layout, mask):
        self._check_mask(mask)
        b, n = lay.orig.shape
        if mask is None:
            if not any(lay.n_extra):
                return None  # causal over an order-preserving slice is still causal: SDPA's is_causal holds
            allowed = torch.ones(n, n, dtype=torch.bool, device=lay.orig.device).tril().expand(b, 1, n, n)
        else:
            full = _allowed(mask).expand(b, 1, -1, -1)
            rows = full.gather(2, lay.orig[:, None, :, None].expand(-1, 1, -1, full.shape[-1]))
            allowed = rows.gather(3, lay.orig[:, None, None, :].expand(-1, 1, n, -1))
        allowed = allowed & ~lay.extra[:, None, None, :]
        # an extra slot sees only itself, so its (never used) output stays finite
        allowed = allowed | (torch.diag_embed(lay.extra)[:, None])
        return _format(allowed, mask)

    def _decode_mask(self, lay: _Layout, mask, q: int, past_key_values):
        self._check_mask(mask)
        key = ("decode", id(lay))
        if key in self._memo:
            return self._memo[key]
        if mask is None and lay.trivial:
            out = None
        else:
            b, n = lay.orig.shape
            prompt = lay.valid[:, None, None, :].expand(b, 1, q, n)
            if mask is None:  # q == 1 and no padding: every cached new token is visible
                new = past_key_values.get_seq_length(0) - self.full_length  # layer 0 already holds this step
                new_cols = torch.ones(b, 1, q, new, dtype=torch.bool, device=prompt.device)
            else:
                new_cols = _allowed(mask).expand(b, 1, q, -1)[..., self.full_length :]
            out = _format(torch.cat([prompt, new_cols], dim=-1), mask)
        self._memo[key] = out
        return out

    # -- selection ------------------------------------------------------------------------------------------------
    def _select(self, i: int, module, hs: torch.Tensor, kwargs: dict):
        """One boundary for the whole batch: signals per sample, the method's choice for all samples at once, and
        the gather to the kept slots. Every count is known on the host (the plans, the kept tensors' shapes), so no
        value is read back here; a method reads what its own rule needs (``select_llm_batch``)."""
        lay = self.cur
        method = self.method
        if method.attention_from == "previous":
            src = self.captured
        else:
            cos, sin = kwargs["position_embeddings"]
            src = (module, hs, cos, sin, lay)
        b, width = lay.orig.shape
        dev = hs.device
        all_signals, all_ks, all_slots = [], [], []
        for s in range(b):
            segments = list(lay.counts[s])
            slots, positions = self._visual_slots(lay, s, sum(segments))
            ks = []
            for j, plan in enumerate(self.plans[s]):
                k = segments[j]
                for layer, kept in plan:
                    if layer == i:
                        k = min(k, kept) if kept is not None else None
                ks.append(k)
            signals = LLMSignals(
                hidden=hs[s, slots], segments=segments, layer=i, num_layers=self.num_layers, positions=positions
            )
            if sum(segments):
                self._signals(signals, s, slots, src, hs)
                if method.final_norm:
                    self._final_norm(signals)
            all_signals.append(signals)
            all_ks.append(ks)
            all_slots.append(slots)
        active = [s for s in range(b) if sum(lay.counts[s])]
        chosen = dict(
            zip(active, method.select_llm_batch([all_signals[s] for s in active], [all_ks[s] for s in active]))
        )
        orders, counts, n_valid, sizes = [], [], [], []
        positions = torch.arange(width, device=dev)
        for s in range(b):
            segments = lay.counts[s]
            kept = chosen.get(s, [torch.empty(0, dtype=torch.long, device=dev) for _ in segments])
            kept_counts = [int(k.numel()) for k in kept]
            keep = torch.ones(width, dtype=torch.bool, device=dev)
            if sum(segments):
                offsets = [sum(segments[:j]) for j in range(len(segments))]
                picked = torch.cat([k.to(device=dev, dtype=torch.long) + o for k, o in zip(kept, offsets)])
                keep[all_slots[s]] = False
                keep[all_slots[s][picked]] = True
            dropped = sum(segments) - sum(kept_counts)
            size = width - dropped
            orders.append(torch.where(keep, positions, width).sort().values[:size])  # the kept slots, in order
            sizes.append(size)
            counts.append(kept_counts)
            n_valid.append(lay.n_valid[s] - dropped)
        n_new = max(sizes)
        pads = [n_new - size for size in sizes]
        rel = torch.stack([torch.cat([order.new_zeros(pad), order]) for order, pad in zip(orders, pads)])
        extra = to_device([[True] * pad + [False] * (n_new - pad) for pad in pads], dev, torch.bool)
        n_extra = [e + pad for e, pad in zip(lay.n_extra, pads)]
        return lay.gather(rel, extra, counts, n_valid, n_extra), rel

    def _visual_slots(self, lay: _Layout, s: int, n_vis: int):
        """Sample ``s``'s valid visual slots, grouped by image (report order) and in sequence order within one, and
        their positions among the sample's real tokens: host lists before the first boundary, device work after
        it (``n_vis`` is known either way)."""
        dev = lay.orig.device
        if lay.host is not None:
            orig, valid, image = lay.host[s]
            order = sorted((image[t], t) for t in range(len(orig)) if valid[t] and image[t] >= 0)
            slots = [t for _, t in order]
            return to_device(slots, dev), [self.host_real[s][orig[t]] for t in slots]
        width = lay.orig.shape[1]
        vis = lay.visual[s] & lay.valid[s]
        key = torch.where(vis, lay.image[s] * width + torch.arange(width, device=dev), (len(lay.counts[s]) + 1) * width)
        slots = key.argsort()[:n_vis]
        real = self.base.valid[s].cumsum(0) - 1
        return slots, real[lay.orig[s, slots]]

    def _text_slots(self, lay: _Layout, s: int):
        """Sample ``s``'s valid non-visual slots in order, and their positions among its real tokens."""
        dev = lay.orig.device
        if lay.host is not None:
            orig, valid, image = lay.host[s]
            slots = [t for t in range(len(orig)) if valid[t] and image[t] < 0]
            return to_device(slots, dev), [self.host_real[s][orig[t]] for t in slots]
        width = lay.orig.shape[1]
        text = lay.valid[s] & ~lay.visual[s]
        count = lay.n_valid[s] - sum(lay.counts[s])
        slots = torch.where(text, torch.arange(width, device=dev), width).sort().values[:count]
        real = self.base.valid[s].cumsum(0) - 1
        return slots, real[lay.orig[s, slots]]

    def _signals(self, signals: LLMSignals, s: int, slots: torch.Tensor, src, hs_now: torch.Tensor) -> None:
        method = self.method
        if method.query is None and not method.needs_keys:
            return  # a selector that reads only hidden states
        module, h, cos, sin, lay = src
        if lay is not self.cur:  # boundaries are never on adjacent layers, so the scoring layer ran on these slots
            raise StageError(f"{method.name}: boundaries on adjacent layers are not supported")
        parts: LLMParts = self.adapter.llm_parts(module)
        valid = lay.valid[s]
        cos, sin = cos[s if cos.shape[0] > 1 else 0], sin[s if sin.shape[0] > 1 else 0]  # [N, hd]
        with torch.no_grad():
            x = parts.norm(h[s : s + 1])[0]  # [N, d]
            k = parts.k_proj(x).view(x.shape[0], parts.num_kv_heads, parts.head_dim)
            if parts.k_norm is not None:
                k = parts.k_norm(k)
            k = rotate(k.transpose(0, 1), cos, sin)  # [Hkv, N, hd]
            if method.needs_keys:
                flat = k.transpose(0, 1).reshape(x.shape[0], -1)
                text, text_positions = self._text_slots(lay, s)
                signals.keys = flat[slots]
                signals.text_keys = flat[text]
                signals.text_hidden = hs_now[s][text]  # entering the boundary layer, like ``hidden``
                signals.text_positions = text_positions
            if method.query is None:
                return
            rows = self._query_rows(lay, s)
            if rows.numel() == 0:
                signals.attention = torch.zeros(parts.num_heads, 0, slots.numel(), device=x.device)
                return
            q = parts.q_proj(x[rows]).view(rows.numel(), parts.num_heads, parts.head_dim)
            if parts.q_norm is not None:
                q = parts.q_norm(q)
            q = rotate(q.transpose(0, 1), cos[rows], sin[rows])  # [H, r, hd]
            kk = k.repeat_interleave(parts.num_heads // parts.num_kv_heads, dim=0)
            logits = (q.float() @ kk.float().transpose(-1, -2)) * parts.scaling  # [H, r, N]
            orig = lay.orig[s]
            visible = valid[None, :] & (orig[None, :] <= orig[rows][:, None])
            probs = logits.masked_fill(~visible, float("-inf")).softmax(-1)
            signals.attention = probs[:, :, slots]

    def _final_norm(self, signals: LLMSignals) -> None:
        """Hidden states as the LM's final norm would see them (DART's cosine space), computed on the few rows read."""
        norm = self.adapter.final_norm()
        with torch.no_grad():
            signals.hidden = norm(signals.hidden[None])[0]
            if signals.text_hidden is not None and signals.text_hidden.shape[0]:
                signals.text_hidden = norm(signals.text_hidden[None])[0]

    def _query_rows(self, lay: _Layout, s: int) -> torch.Tensor:
        """The query slots a method scores with, found on the host where the layout is known there; after a
        boundary the last real slot is found on the device (``QUERY_TEXT`` reads its rows there: only ToDRE's
        relevance rule asks for it, and its checks come before any other boundary)."""
        dev = lay.orig.device
        if lay.host is not None:
            orig, valid, image = lay.host[s]
            real = [t for t in range(len(orig)) if valid[t]]
            if self.method.query == QUERY_LAST:
                return to_device(real[-1:], dev)
            if self.method.query == QUERY_TEXT:
                vis = [t for t in real if image[t] >= 0]
                if not vis:
                    return to_device([], dev)
                return to_device([t for t in real if image[t] < 0 and orig[t] > orig[vis[0]]], dev)
        else:
            valid = lay.valid[s]
            if self.method.query == QUERY_LAST:
                width = valid.shape[0]
                return (valid.long() * torch.arange(1, width + 1, device=dev)).argmax().view(1)
            if self.method.query == QUERY_TEXT:
                vis = (lay.visual[s] & valid).nonzero().flatten()
                if vis.numel() == 0:
                    return vis
                first = lay.orig[s, vis[0]]
                return (valid & ~lay.visual[s] & (lay.orig[s] > first)).nonzero().flatten()
        raise StageError(f"{self.method.name}: unknown query kind {self.method.query!r}")

    # -- results --------------------------------------------------------------------------------------------------
    def fill(self, report) -> None:
        """Per-layer token counts (the prompt's prefill) and the slots after the last boundary."""
        if self.trace is None:
            return
        report.llm_layer_tokens = [list(x) for x in zip(*self.trace.tokens)]
        report.llm_layer_visual_tokens = [list(x) for x in zip(*self.trace.visual)]
        per_sample_images: dict[int, list] = {}
        for im in report.images:
            per_sample_images.setdefault(im.sample, []).append(im)
        for s, ims in per_sample_images.items():
            for j, im in enumerate(ims):
                im.llm_layer_tokens = [layer[s][j] for layer in self.trace.per_image]
        lay = self.final
        report.llm_kept_positions = [torch.where(lay.extra[s], -1, lay.orig[s]) for s in range(lay.orig.shape[0])]
