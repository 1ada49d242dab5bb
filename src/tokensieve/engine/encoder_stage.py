"""The in-encoder stage: cut the hidden-state sequence between vision-encoder layers, with removable hooks only.

The encoder's own forward runs unchanged; forward hooks on its layers replace a layer's output by the rows an
:class:`~tokensieve.methods.base.EncoderMethod` keeps (optionally merged), so every later layer really runs on fewer
tokens. Signals come from the cut layer's own ``q_proj`` / ``k_proj`` / ``v_proj`` outputs (only the CLS query
row is turned into attention probabilities), so the encoder stays on SDPA.

Three things are tracked alongside the rows so a method never has to: ``positions`` (which original patch each row
is; reports stay in the original grid), ``sizes`` (how many original tokens a merged row stands for; they always
sum to the original count) and the per-layer sequence length (the trace FLOPs are computed from).

Hidden states are recorded by this stage itself, after the cut, rather than read from the model's
``hidden_states`` output: transformers records layer outputs with its own forward hooks, and whether those run
before or after ours depends on which was registered first. Once the last needed hidden state is recorded, the
rest of the encoder can be skipped (``stop_after``): the stage raises a private exception from that layer's hook
and catches it around the forward, which changes no output the LM reads.

A family adapter supplies the layers, how to read their attention, and a ``run(pixel_values)`` callable.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..methods.base import Layout, gather_tokens
from ..methods.encoder import EncoderCut, EncoderMethod, EncoderPlan, EncoderState
from .capture import AttentionParts, hook_projections
from .host import read_lists


class _StopEncoder(Exception):
    """Raised from a layer hook once every needed hidden state is recorded; never leaves this module."""


@dataclass
class StageResult:
    """What the stage recorded for a batch of images (rows aligned across ``hidden``, ``positions``, ``sizes``)."""

    hidden: dict[int, list[torch.Tensor]]
    """hidden_states index -> per image [T, d], CLS at row 0."""
    positions: list[torch.Tensor]
    """Per image [T] original patch index of each row of the last recorded state (CLS: -1)."""
    sizes: list[torch.Tensor]
    traces: list[list[int]]
    """Per image, per encoder layer, the sequence length entering it (0 for layers skipped)."""
    selection_s: float = 0.0
    groups: list[torch.Tensor | None] | None = None
    """Per image, when a cut merged (``EncoderCut.groups``): per original candidate (patch, or unit in unit mode),
    the final patch row it ended in (-1: dropped); ``None`` for images whose cuts only kept or dropped rows."""
    checks: list[tuple[torch.Tensor, str]] = field(default_factory=list)
    """Checks of the cuts' contents (device booleans, True = broken) and their messages, read once at the end."""

    def features(self, feature_layers: Sequence[int], rows: slice) -> torch.Tensor:
        """[B, k, d * len(feature_layers)]: the recorded ``rows`` of each feature layer, concatenated per image."""
        n = len(self.hidden[feature_layers[0]])
        return torch.stack([torch.cat([self.hidden[f][i][rows] for f in feature_layers], dim=-1) for i in range(n)])


def _heads(x: torch.Tensor, parts: AttentionParts) -> torch.Tensor:
    b, t, _ = x.shape
    return x.view(b, t, parts.num_heads, parts.head_dim).transpose(1, 2)


def _check_cut(cut: EncoderCut, b: int, t: int, d: int, layer: int, name: str, checks: list) -> None:
    """Shapes are checked at once (the host knows them); the contents' checks join ``checks`` and are read in one
    go when the encoder is done (:func:`_raise_broken`), so a cut costs no device round trip."""
    keep = cut.keep
    if keep.dim() != 2 or keep.shape[0] != b or not 1 <= keep.shape[1] <= t:
        raise ValueError(f"{name} at layer {layer}: keep has shape {tuple(keep.shape)}, expected [{b}, 1..{t}]")
    checks.append(((keep[:, 0] != 0).any(), f"{name} at layer {layer}: row 0 (CLS) must be kept first"))
    if keep.shape[1] > 1:
        checks.append(
            ((keep[:, 1:] <= keep[:, :-1]).any(), f"{name} at layer {layer}: kept rows must be strictly ascending")
        )
    k = keep.shape[1]
    if cut.hidden is not None and tuple(cut.hidden.shape) != (b, k, d):
        raise ValueError(f"{name} at layer {layer}: merged hidden {tuple(cut.hidden.shape)}, expected {(b, k, d)}")
    if cut.sizes is not None and tuple(cut.sizes.shape) != (b, k):
        raise ValueError(f"{name} at layer {layer}: sizes {tuple(cut.sizes.shape)}, expected {(b, k)}")


def run_encoder_stage(
    layers: Sequence[nn.Module],
    attention_parts: Callable[[nn.Module], AttentionParts],
    method: EncoderMethod,
    plan: EncoderPlan,
    layout: Layout,
    target: int,
    feature_layer: int,
    record: Sequence[int],
    run: Callable[[torch.Tensor], object],
    pixel_values: torch.Tensor,
    stop_after: int | None = None,
    cls_free: bool = False,
    units: torch.Tensor | None = None,
) -> StageResult:
    """Run ``run(pixel_values)`` with ``method`` cutting at ``plan.layers``; hooks are removed on exit, always.

    ``layout`` describes the patch grid (CLS is row 0 of every state). ``target``: patch rows left after the last
    planned layer. ``record``: hidden_states indices to return (0 = embeddings, i = output of layer i-1, after its
    cut). ``stop_after``: when set, no layer after the one producing ``hidden_states[stop_after]`` runs.
    When ``target`` equals the patch count nothing is cut and the method is never consulted.
    """
    num_layers = len(layers)
    record = sorted(set(record))
    planned = set(plan.layers) if target < layout.num_patches else set()
    if planned and max(planned) >= min(record):
        raise ValueError(
            f"{method.name}: cuts after layer {max(planned)} would change hidden_states[{min(record)}] after it is "
            "read; every cut must happen before the first feature layer"
        )
    groups = [slice(i, i + 1) for i in range(pixel_values.shape[0])] if plan.per_image else [slice(None)]
    out = StageResult(hidden={i: [] for i in record}, positions=[], sizes=[], traces=[], groups=[])
    for grp in groups:
        _run_group(
            layers,
            attention_parts,
            method,
            plan,
            planned,
            layout,
            target,
            feature_layer,
            record,
            run,
            pixel_values[grp],
            stop_after,
            num_layers,
            out,
            cls_free,
            units,
        )
    _raise_broken(out.checks)
    return out


def _raise_broken(checks: list[tuple[torch.Tensor, str]]) -> None:
    """One device read for every content check of every cut of the call; the first broken one is raised."""
    if not checks:
        return
    broken = read_lists([torch.stack([flag for flag, _ in checks])])[0]
    for bad, (_, message) in zip(broken, checks):
        if bad:
            raise ValueError(message)


def _run_group(
    layers,
    attention_parts,
    method,
    plan,
    planned,
    layout,
    target,
    feature_layer,
    record,
    run,
    pixel_values,
    stop_after,
    num_layers,
    out: StageResult,
    cls_free: bool = False,
    units: torch.Tensor | None = None,
) -> None:
    b = int(pixel_values.shape[0])
    device = pixel_values.device
    n0 = layout.num_patches
    st = dict(
        positions=torch.arange(-1, n0, device=device).expand(b, -1),
        sizes=torch.ones(b, n0 + 1, device=device),
        trace=[0] * num_layers,
        memory={},
        proj={},
        hidden={},
        last_planned=max(planned) if planned else -1,
        units=units,
        grouped=False,
        owner=torch.arange(n0, device=device).expand(b, -1).clone(),  # original candidate -> current patch row
        merged=False,
        checks=out.checks,
    )
    handles = []

    def note_input(mod, args, kwargs, _i):
        x = args[0] if args else kwargs["hidden_states"]
        st["trace"][_i] = int(x.shape[1])
        if _i == 0 and 0 in record:
            st["hidden"][0] = (x, st["grouped"])

    def after_layer(mod, args, output, _i):
        hs = output[0] if isinstance(output, (tuple, list)) else output
        new = hs
        if _i in planned:
            t0 = time.perf_counter()
            cut_fn = _apply_cut if units is None else _apply_unit_cut
            new = cut_fn(
                _i,
                hs,
                st,
                attention_parts(layers[_i]),
                method,
                plan,
                layout,
                target,
                feature_layer,
                num_layers,
                cls_free,
            )
            out.selection_s += time.perf_counter() - t0
        if _i + 1 in record:
            st["hidden"][_i + 1] = (new, st["grouped"])
        if stop_after is not None and _i + 1 >= stop_after:
            raise _StopEncoder
        if new is hs:
            return None
        return (new, *output[1:]) if isinstance(output, tuple) else new

    try:
        for i, layer in enumerate(layers):
            handles.append(
                layer.register_forward_pre_hook(lambda m, a, k, _i=i: note_input(m, a, k, _i), with_kwargs=True)
            )
            handles.append(layer.register_forward_hook(lambda m, a, o, _i=i: after_layer(m, a, o, _i)))
        for i in planned:
            wanted = {"k": plan.keys or plan.cls_attention, "q": plan.cls_attention, "v": plan.values}
            handles += hook_projections(
                attention_parts(layers[i]),
                {n for n, w in wanted.items() if w},
                lambda name, t, _i=i: st["proj"].__setitem__((name, _i), t),
                f"encoder layer {i} (needed by {method.name})",
            )
        try:
            run(pixel_values)
        except _StopEncoder:
            pass
    finally:
        for h in handles:
            h.remove()
    missing = [i for i in record if i not in st["hidden"]]
    if missing:
        raise RuntimeError(f"the encoder forward did not produce hidden_states {missing}")
    for i in record:
        x, grouped = st["hidden"][i]
        if units is not None and not grouped:  # recorded before any cut: put it in group order like the rest
            c = 0 if cls_free else 1
            x = x[:, torch.cat([torch.arange(c), units.flatten().cpu() + c]).to(x.device)]
        out.hidden[i].extend(x.unbind(0))
    out.positions.extend(st["positions"].unbind(0))
    out.groups.extend(st["owner"].cpu().unbind(0) if st["merged"] is True else [None] * b)
    out.sizes.extend(st["sizes"].unbind(0))
    out.traces.extend([list(st["trace"]) for _ in range(b)])


def _apply_unit_cut(
    layer, hs, st, parts, method, plan, layout, target, feature_layer, num_layers, cls_free: bool = False
) -> torch.Tensor:
    """:func:`_apply_cut` for candidates that are groups of patches (``st["units"]``)."""
    units = st["units"].to(hs.device)
    u = units.shape[1]
    c = 0 if cls_free else 1  # the real CLS row, kept in front and never grouped
    proj = {name: st["proj"].pop((name, layer)) for name in ("q", "k", "v") if (name, layer) in st["proj"]}
    if not st["grouped"]:  # raster patches -> group by group
        order = torch.cat([torch.arange(c, device=hs.device), units.flatten() + c])
        hs = hs[:, order]
        proj = {name: x[:, order] for name, x in proj.items()}
        st["grouped"] = True
    b, t, d = hs.shape
    n = (t - c) // u
    if n == target:
        return hs
    heads = lambda x: x.view(b, t, parts.num_heads, parts.head_dim).float()  # noqa: E731
    q, k, v = (heads(proj[x]) if x in proj else None for x in ("q", "k", "v"))
    last = layer == st["last_planned"]
    out, owners = [], []
    for j in range(b):
        mean_u = lambda x: x[c:].reshape(n, u, *x.shape[1:]).mean(1)  # noqa: E731
        att = None
        if plan.cls_attention:  # the CLS query's (or the mean query's) share per group, over the patch keys
            gq = q[j, :c].mean(0) if c else q[j].mean(0)
            att = (torch.einsum("hd,phd->hp", gq, k[j, c:]) * parts.scale).softmax(-1).view(-1, n, u).sum(-1)
        state = unit_state(
            plan,
            layer,
            num_layers,
            layout.grid,
            mean_u(hs[j].float()),
            att if att is not None else torch.zeros(1, n),
            mean_u(k[j]).transpose(0, 1) if k is not None else torch.zeros(1, n, 1),
            mean_u(v[j]).transpose(0, 1) if v is not None else torch.zeros(1, n, 1),
            st["sizes"][j, 1:].cpu(),
            st["positions"][j, 1:].cpu(),
            target,
            st["memory"].setdefault(j, {}),
        )
        state.feature_layer = feature_layer
        if c:  # a real CLS: its own hidden state, key and value instead of the means
            state.hidden[0, 0] = hs[j, 0].float()
            if state.keys is not None:
                state.keys[0, :, 0] = k[j, 0]
            if state.values is not None:
                state.values[0, :, 0] = v[j, 0]
        cut = method.cut(state)
        if cut is None:
            if last:
                raise ValueError(f"{method.name} made no cut at its last layer {layer}; {n} groups, target {target}")
            return hs
        check_unit_cut(cut, n, target, last, layer, method.name)
        owners.append(follow_cut(st["owner"][j : j + 1], cut.keep[:1], cut.groups, n)[0])
        note_merge(st, cut)
        rows, sizes = cut_units(hs[j, c:].reshape(n, u, d), st["sizes"][j, 1:].cpu(), cut, method.name)
        keep = cut.keep[0].to(st["positions"].device)
        out.append(
            (
                torch.cat([hs[j, :c], rows.reshape(-1, d)]),
                st["positions"][j][keep],
                torch.cat([st["sizes"][j, :1].cpu(), sizes]),
            )
        )
    if len({x[0].shape[0] for x in out}) != 1:
        raise ValueError(f"{method.name} kept different counts in images that run together at layer {layer}")
    st["positions"] = torch.stack([x[1] for x in out])
    st["sizes"] = torch.stack([x[2] for x in out]).to(st["sizes"].device)
    st["owner"] = torch.stack(owners)
    return torch.stack([x[0] for x in out]).contiguous()


def _virtual_cls(x: torch.Tensor) -> torch.Tensor:
    """Prepend the mean row: the stand-in CLS of a CLS-free tower, seen by methods only."""
    return torch.cat([x.mean(dim=1, keepdim=True), x], dim=1)


def _apply_cut(
    layer, hs, st, parts, method, plan, layout, target, feature_layer, num_layers, cls_free: bool = False
) -> torch.Tensor:
    real = hs
    proj = st["proj"]
    if cls_free:
        hs = _virtual_cls(hs)
        proj = {key: _virtual_cls(v) if key[1] == layer else v for key, v in proj.items()}
    b, t, d = hs.shape
    sig = {}
    if plan.cls_attention:
        k = _heads(proj[("k", layer)], parts).float()
        if cls_free:  # the mean query over the real rows attends to the real keys; the virtual row gets nothing
            q = _heads(proj[("q", layer)][:, 1:], parts).float().mean(dim=-2, keepdim=True)
            row = ((q @ k[:, :, 1:].transpose(-1, -2)).squeeze(-2) * parts.scale).softmax(dim=-1)
            sig["cls_attention"] = torch.cat([torch.zeros_like(row[..., :1]), row], dim=-1)
        else:
            q = _heads(proj[("q", layer)][:, :1], parts).float()
            sig["cls_attention"] = ((q @ k.transpose(-1, -2)).squeeze(-2) * parts.scale).softmax(dim=-1)
    if plan.keys:
        sig["keys"] = _heads(proj[("k", layer)], parts)
    if plan.values:
        sig["values"] = _heads(proj[("v", layer)], parts)
    for key in [k for k in st["proj"] if k[1] == layer]:
        del st["proj"][key]  # the projections of this layer are not needed any more
    state = EncoderState(
        layer=layer,
        num_layers=num_layers,
        feature_layer=feature_layer,
        layout=layout,
        hidden=hs,
        sizes=st["sizes"],
        positions=st["positions"],
        target=target,
        memory=st["memory"],
        **sig,
    )
    if t - 1 == target:
        return real  # already at the target: nothing left to score or cut
    cut = method.cut(state)
    if cut is None:
        if layer == st["last_planned"]:
            raise ValueError(f"{method.name} made no cut at its last layer {layer}; {t - 1} patches, target {target}")
        return real
    _check_cut(cut, b, t, d, layer, method.name, st["checks"])
    left = cut.keep.shape[1] - 1
    if left < target or (layer == st["last_planned"] and left != target):
        raise ValueError(f"{method.name} left {left} patches after layer {layer}; the target is {target}")
    keep = cut.keep
    st["owner"] = follow_cut(st["owner"], keep, cut.groups, t - 1)
    note_merge(st, cut)
    st["positions"] = torch.gather(st["positions"], 1, keep)
    st["sizes"] = cut.sizes.float() if cut.sizes is not None else torch.gather(st["sizes"], 1, keep)
    new = cut.hidden.to(hs.dtype) if cut.hidden is not None else gather_tokens(hs, keep)
    if cls_free:
        new = new[:, 1:]  # the virtual CLS never enters the encoder
    return new.contiguous()


def follow_cut(owner: torch.Tensor, keep: torch.Tensor, groups: torch.Tensor | None, n: int) -> torch.Tensor:
    """Compose one cut into ``owner`` [B, N0] (original candidate -> current patch row, -1 dropped).

    ``keep`` [B, 1 + k] are the kept rows (CLS first), ``groups`` [B, n] the merge map of the ``n`` current patch
    rows onto the k kept ones (``EncoderCut.groups``); without it a dropped row's candidates are dropped."""
    if groups is not None:
        slot = groups.to(device=owner.device, dtype=torch.long)
    else:
        rows = (keep[:, 1:] - 1).to(owner.device)
        slot = torch.full((owner.shape[0], n), -1, dtype=torch.long, device=owner.device)
        slot.scatter_(1, rows, torch.arange(rows.shape[1], device=owner.device).expand_as(rows).contiguous())
    return torch.where(owner >= 0, torch.gather(slot, 1, owner.clamp(min=0)), -1)


def note_merge(st: dict, cut: EncoderCut) -> None:
    """Record whether the cuts so far merged with a known map (groups reportable) or without one (not)."""
    if cut.groups is not None and st["merged"] is not None:
        st["merged"] = True
    elif cut.hidden is not None and cut.groups is None:
        st["merged"] = None  # merged rows, but where each went is unknown: no groups to report


def cut_units(rows: torch.Tensor, sizes: torch.Tensor, cut: EncoderCut, name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply a unit-level cut of one candidate set to its encoder rows, for families whose tokens are groups of
    ``u`` rows (Qwen's 2x2 merge units, Idefics3's pixel-shuffle groups).

    ``rows`` [n, u, d] are the set's current units, ``sizes`` [n] how many original units each stands for, and
    ``cut`` the method's answer for this set (batch of one, row 0 the virtual CLS). A merge is replayed row by row
    from ``cut.groups`` with the same size weights, so the unit means equal what the method computed. Returns the
    kept units' rows [k, u, d] and sizes [k].
    """
    kept = cut.keep[0, 1:] - 1
    if cut.hidden is None:
        return rows[kept.to(rows.device)], sizes[kept.cpu()]
    if cut.groups is None:
        raise ValueError(
            f"{name} merged tokens without saying which went where (EncoderCut.groups); a family whose tokens are "
            "groups of encoder rows needs that to merge whole groups"
        )
    slot = cut.groups[0].to(device=rows.device, dtype=torch.long)
    w = sizes.to(rows.device, torch.float32)
    mass = torch.zeros(kept.numel(), device=rows.device).scatter_add_(0, slot, w)
    total = torch.zeros(kept.numel(), *rows.shape[1:], device=rows.device)
    total.index_add_(0, slot, rows.float() * w[:, None, None])
    return (total / mass[:, None, None]).to(rows.dtype), mass.cpu()


def check_unit_cut(cut: EncoderCut, n: int, target: int, last: bool, layer: int, name: str) -> None:
    """The checks of :func:`_check_cut` for one unit-level candidate set."""
    keep = cut.keep[0]
    if int(keep[0]) != 0 or (keep.numel() > 2 and bool((keep[2:] <= keep[1:-1]).any())) or int(keep[-1]) > n:
        raise ValueError(f"{name} at layer {layer}: keep must start with row 0 (CLS) and ascend within 0..{n}")
    left = keep.numel() - 1
    if left < target or (last and left != target):
        raise ValueError(f"{name} left {left} units after layer {layer}; the target is {target}")


def unit_state(
    plan: EncoderPlan,
    layer: int,
    num_layers: int,
    grid: tuple[int, int],
    hidden: torch.Tensor,
    attention: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    sizes: torch.Tensor,
    units: torch.Tensor,
    target: int,
    memory: dict,
) -> EncoderState:
    """The state a method sees for one unit-level candidate set (batch of one), with the virtual CLS of a CLS-free
    tower in row 0. ``hidden`` [n, d], ``attention`` [H, n] (the mean query's share per unit), ``keys`` /
    ``values`` [H, n, hd] are unit means; ``units`` the set-local ids of the current units."""
    vcls = lambda x, dim: torch.cat([x.mean(dim, keepdim=True), x], dim)  # noqa: E731
    return EncoderState(
        layer=layer,
        num_layers=num_layers,
        feature_layer=num_layers,
        layout=Layout(grid, 1),
        hidden=vcls(hidden, 0)[None],
        sizes=torch.cat([torch.ones(1), sizes])[None],
        positions=torch.cat([torch.tensor([-1]), units])[None],
        target=target,
        memory=memory,
        cls_attention=torch.cat([torch.zeros(attention.shape[0], 1), attention], -1)[None]
        if plan.cls_attention
        else None,
        keys=vcls(keys, 1)[None] if plan.keys else None,
        values=vcls(values, 1)[None] if plan.values else None,
    )
