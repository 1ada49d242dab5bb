"""EvoCut: keep the patches whose layer-to-layer movement does not follow the crowd.

Lu et al., "EvoCut: multi-layer evolution-aware visual token compression", arXiv 2606.01756 (2026). No code was
released; this follows the paper's text and Algorithm 1.

Choices where the paper is silent or ambiguous (see the reference notes, section 1.6):

* Transitions run over ``hidden_states[l0 - 1] -> [l0]`` ... ``[end - 1] -> [end]`` with ``end`` defaulting to
  the *final* encoder layer (13 transitions for CLIP-L with l0 = 12), even though LLaVA feeds ``hidden_states[-2]``
  to the projector; the kept tokens are still taken from the features the LM consumes. ``end_layer`` makes the
  other reading (stop at the feature layer) one argument away.
* K-means is spherical (cosine assignment, renormalised member sums as centres) with a deterministic init: the
  moves of ``M`` evenly strided tokens (token ``floor(j * N / M)``). A cluster that loses all its members, or whose
  members cancel out, keeps its previous centre.
* A zero move (token did not change) becomes the zero vector, so it aligns with nothing and scores deviation 1.
* The deviation uses the best of *all* final centres, as written, not only the assigned one.
* Kept indices are returned in raster order.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import MissingSignalError
from .base import PRE_PROJECTOR, Request, ScoreMethod, Signals
from .registry import register


def _group_directions(moves: torch.Tensor, inv_norm: torch.Tensor, num_groups: int, iterations: int, eps: float):
    """Spherical K-means centres [B, M, d] of the unit moves ``moves * inv_norm``.

    The moves are never normalised as a whole array: the argmax over centres does not change when a row is scaled
    by a positive number, and the member sums take the scale as one-hot weights. On CPU that saves a full pass
    over [B, N, d] per transition, which is most of the cost beyond the subtraction itself.

    The init is fixed (evenly strided tokens) so that scores are reproducible across runs and devices, which a
    random k-means++ seed would not give without carrying RNG state through the pipeline.
    """
    b, n, _ = moves.shape
    m = min(num_groups, n)
    seeds = torch.tensor([(j * n) // m for j in range(m)], device=moves.device)
    centres = moves[:, seeds, :] * inv_norm[:, seeds, None]
    for _ in range(iterations):
        assign = torch.bmm(moves, centres.transpose(1, 2)).argmax(dim=-1)  # [B, N]
        # one_hot would check the labels' range on the host (a device read per iteration); a scatter does not
        onehot = torch.zeros(*assign.shape, m, dtype=moves.dtype, device=moves.device).scatter_(
            -1, assign[..., None], 1
        )
        weights = onehot * inv_norm.unsqueeze(-1)  # [B, N, M]
        sums = torch.bmm(weights.transpose(1, 2), moves)  # [B, M, d] sums of unit moves
        norms = sums.norm(dim=-1, keepdim=True)
        # a centre without members (or whose members cancel) has no direction to move to: keep the old one
        usable = norms > eps
        centres = torch.where(usable, sums / norms.clamp_min(eps), centres)
    return centres


def evocut_scores(
    hidden_states: Sequence[torch.Tensor],
    num_groups: int = 8,
    iterations: int = 2,
    alpha: float = 0.95,
    eps: float = 1e-6,
) -> torch.Tensor:
    """EMA of per-transition direction deviation, [B, N], each value in [0, 2].

    ``hidden_states`` are consecutive encoder states [B, N, d] (or [N, d] for one image); ``len - 1`` transitions
    are scored. Kept as a free function so the scoring can be checked on synthetic tensors without any model.
    A move is scaled by ``1 / max(norm, eps)``: genuine moves become unit vectors, a (near-)zero move stays
    (near-)zero, aligns with nothing and scores deviation 1.
    """
    if len(hidden_states) < 2:
        raise ValueError(f"hidden_states: need at least 2 consecutive states, got {len(hidden_states)}")
    states = [h.float() for h in hidden_states]
    squeeze = states[0].dim() == 2
    if squeeze:
        states = [h.unsqueeze(0) for h in states]
    shape = states[0].shape
    for i, h in enumerate(states):
        if h.dim() != 3 or h.shape != shape:
            raise ValueError(f"hidden_states[{i}]: expected shape {tuple(shape)}, got {tuple(h.shape)}")
    score = torch.zeros(shape[:2], dtype=torch.float32, device=states[0].device)
    for prev, cur in zip(states[:-1], states[1:]):
        moves = cur - prev
        inv_norm = 1.0 / moves.norm(dim=-1).clamp_min(eps)  # [B, N]
        centres = _group_directions(moves, inv_norm, num_groups, iterations, eps)
        alignment = torch.bmm(moves, centres.transpose(1, 2)).amax(dim=-1) * inv_norm
        # rounding can push a cosine a hair outside [-1, 1]; the deviation is defined on [0, 2]
        deviation = (1.0 - alignment).clamp(0.0, 2.0)
        score = alpha * score + (1.0 - alpha) * deviation
    return score.squeeze(0) if squeeze else score


def _check_int(name: str, value, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


@register
class EvoCut(ScoreMethod):
    name = "evocut"
    description = (
        "Keep patches whose hidden-state movement deviates from the shared group directions (EMA over layers)."
    )
    stage = PRE_PROJECTOR
    signals = ("hidden states (start_layer-1 .. end_layer)",)
    param_help = {
        "start_layer": "first hidden state whose move is scored (hidden_states index); None: half the encoder depth",
        "end_layer": "last hidden state scored; None: the final encoder layer (the paper's reading)",
        "num_groups": "M, spherical K-means groups of move directions per transition",
        "iterations": "K-means iterations per transition",
        "alpha": "EMA factor of the deviation over transitions, in [0, 1)",
        "eps": "moves shorter than this count as no move (deviation 1)",
    }

    def __init__(
        self,
        start_layer: int | None = None,
        end_layer: int | None = None,
        num_groups: int = 8,
        iterations: int = 2,
        alpha: float = 0.95,
        eps: float = 1e-6,
    ):
        _check_int("start_layer", start_layer, 1, allow_none=True)
        _check_int("end_layer", end_layer, 1, allow_none=True)
        if start_layer is not None and end_layer is not None and start_layer > end_layer:
            raise ValueError(f"start_layer ({start_layer}) must not exceed end_layer ({end_layer})")
        _check_int("num_groups", num_groups, 1)
        _check_int("iterations", iterations, 0)
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 <= float(alpha) < 1.0:
            # alpha = 1 would freeze the score at its initial zero and make every ranking a tie
            raise ValueError(f"alpha must be a float in [0, 1), got {alpha!r}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not float(eps) > 0.0:
            raise ValueError(f"eps must be a positive float, got {eps!r}")
        self.start_layer = start_layer
        self.end_layer = end_layer
        self.num_groups = num_groups
        self.iterations = iterations
        self.alpha = float(alpha)
        self.eps = float(eps)

    def _layers(self, num_layers: int) -> tuple[int, int]:
        start = self.start_layer if self.start_layer is not None else num_layers // 2
        end = self.end_layer if self.end_layer is not None else num_layers
        if not 1 <= start <= end <= num_layers:
            given = lambda v: "" if v is not None else " (default)"  # noqa: E731
            raise ValueError(
                f"evocut needs 1 <= start_layer <= end_layer <= {num_layers} (the encoder's depth), got "
                f"start_layer={start}{given(self.start_layer)}, end_layer={end}{given(self.end_layer)}"
            )
        return start, end

    def request(self, num_layers: int, feature_layer: int) -> Request:
        start, end = self._layers(num_layers)
        return Request(hidden_states=tuple(range(start - 1, end + 1)))

    def scores(self, signals: Signals) -> torch.Tensor:
        n = signals.num_tokens
        start, end = self._layers(signals.num_layers)
        needed = range(start - 1, end + 1)
        missing = [i for i in needed if i not in signals.hidden_states]
        if missing:
            raise MissingSignalError(f"evocut needs hidden_states {list(needed)}; missing {missing}")
        states = [signals.hidden_states[i] for i in needed]
        if tuple(states[0].shape[:2]) != (signals.batch, n):
            raise ValueError(
                f"hidden_states rows {tuple(states[0].shape[:2])} do not match the candidates ({signals.batch}, {n})"
            )
        return evocut_scores(states, self.num_groups, self.iterations, self.alpha, self.eps)
