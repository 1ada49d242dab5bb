"""Where adapters call a method, and the LLaVA-1.5 single-grid flow that two hosts share.

:func:`select_each` is the one place a pre-LLM method is called (fixed and adaptive counts alike). The grid
functions are the select-and-project flow of a CLIP tower whose every image is one grid (LLaVA-1.5): the
transformers adapter (``adapters/llava.py``) and the vLLM plugin (``tokensieve_vllm/llava.py``) run their own
towers, capture the same signals with :mod:`~tokensieve.engine.capture` and then hand them here, so a method keeps
the same patches under both.

Torch-only (no transformers import): the vLLM environment installs core without its transformers pin.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..adaptive import adaptive_counts
from ..budget import AdaptiveTarget
from ..methods.base import Layout, Method, Request, Selection
from ..methods.encoder import EncoderMethod, check_patch_target
from .capture import AttentionParts, Captured, check_finite, grid_signals
from .encoder_stage import StageResult, run_encoder_stage
from .host import read_lists


def select_each(method: Method, signals, k) -> list[Selection]:
    """One :class:`~tokensieve.methods.base.Selection` per candidate set (row) of ``signals``, each a batch of one.

    ``k`` is an int (one batched call) or an :class:`~tokensieve.budget.AdaptiveTarget` (counts from the rule, then
    one call per set).
    """
    if not isinstance(k, AdaptiveTarget):
        sel = method.select(signals, k)
        return [sel.row(i) for i in range(signals.batch)]
    return [method.select(signals.row(i), c) for i, c in enumerate(adaptive_counts(k, method, signals))]


def feature_layer_indices(spec: int | Sequence[int], num_layers: int) -> tuple[int, ...]:
    """A ``vision_feature_layer`` setting (one index or several, negative from the end) as non-negative
    ``hidden_states`` indices of an encoder with ``num_layers`` layers (``hidden_states`` has ``num_layers + 1``)."""
    return tuple(int(i) % (num_layers + 1) for i in ([spec] if isinstance(spec, int) else spec))


def candidate_rows(num_prefix: int) -> slice:
    """The encoder rows that are candidates: the patches, plus CLS under LLaVA's ``full`` strategy."""
    return slice(1 - num_prefix, None)


def grid_select(
    method: Method,
    k,
    cap: Captured,
    request: Request,
    features: torch.Tensor,
    *,
    grid: tuple[int, int],
    num_prefix: int,
    num_layers: int,
    feature_layers: Sequence[int],
) -> list[Selection]:
    """Select on a batch of single-grid images whose encoder run ``cap`` captured: one selection per image.

    ``features`` [B, N, d] are the candidates (vision features before the projector, its output after); ``k`` an int
    or an adaptive target.
    """
    check_finite(features)
    layout = Layout(grid, num_prefix)
    rows = candidate_rows(num_prefix)
    signals = grid_signals(cap, request, features, layout, num_layers, feature_layers[-1], feature_layers, rows)
    return select_each(method, signals, k)


def grid_outputs(selections: list[Selection], features: torch.Tensor) -> list[torch.Tensor]:
    """Each image's kept (or created) tokens, in the features' dtype (methods compute in float32)."""
    return [sel.output(features[i : i + 1])[0].to(features.dtype) for i, sel in enumerate(selections)]


def selection_lists(selections: list[Selection], num_prefix: int) -> tuple[list[list[int]], list[list[int] | None]]:
    """For reports, every image's kept grid indices and merge groups (``None`` where a method does not merge),
    read from the device in one transfer for the whole batch (a per-image read would stall a GPU per image)."""
    tensors = [sel.indices[0] for sel in selections] + [sel.groups[0] for sel in selections if sel.groups is not None]
    values = read_lists(tensors)
    n = len(selections)
    kept = [[i - num_prefix for i in row if i >= num_prefix] for row in values[:n]]
    rest = iter(values[n:])
    groups = [None if sel.groups is None else next(rest)[num_prefix:] for sel in selections]
    return kept, groups


def grid_cut(
    method: EncoderMethod,
    k: int,
    *,
    layers: Sequence[nn.Module],
    attention_parts: Callable[[nn.Module], AttentionParts],
    grid: tuple[int, int],
    num_prefix: int,
    num_layers: int,
    feature_layers: Sequence[int],
    run: Callable,
    pixel_values: torch.Tensor,
    stop_after: int | None,
) -> tuple[StageResult, torch.Tensor]:
    """Cut inside a single-grid CLIP tower down to ``k`` candidates: ``(stage result, kept features [B, k, d])``.

    Inside the encoder CLS is always row 0 and always kept; it is a candidate only under the ``full`` strategy, so
    the cut's target is ``k - num_prefix`` patches. The features are the stage's own records of the feature layers
    after the cuts, ready for the projector.
    """
    target = check_patch_target(method.name, k, num_prefix)
    cut_before = min(feature_layers)
    res = run_encoder_stage(
        layers,
        attention_parts,
        method,
        method.plan(num_layers, cut_before),
        Layout(grid, 1),
        target,
        feature_layer=cut_before,
        record=list(feature_layers),
        run=run,
        pixel_values=pixel_values,
        stop_after=stop_after,
    )
    selected = res.features(list(feature_layers), candidate_rows(num_prefix))
    check_finite(selected)
    return res, selected
