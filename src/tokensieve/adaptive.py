"""Adaptive budgets: a target *mean* of visual tokens per image, each image taking what it needs in [min, max].

``Sieve("evocut", budget=Adaptive(mean=64, min=16, max=192))`` keeps 64 tokens per image *on average*: a blank
wall may get 16, a crowded street 192. Any method that selects k of n candidates can run under it, because the
adaptive part only decides k per candidate set and then calls the method as usual.

**Criterion (per candidate set, deterministic).** ``coverage`` (default): how far the candidates are from being
covered by a few of themselves, in the candidates' own feature space (vision features before the projector,
projected tokens after it). A farthest-point sweep on cosine distance (start at the medoid, then always the
candidate farthest from those picked) gives, for every k, the mean distance of all candidates to their nearest
pick: a residual r(k) that falls as k grows. A flat image is covered by one or two tokens (r drops to ~0 at once);
a cluttered one keeps a large residual for many k. It needs no attention, so it works for every method, including
DivPrune and random. ``radius``: the same sweep, the *largest* distance instead of the mean (the worst-covered
candidate, e.g. a lone small object). ``scores``: the method's own ranking where it has one (FasterVLM, VisPruner,
VisionZip, EvoCut, HiPrune, VTC-CLS): r(k) = 1 - the share of the (non-negative part of the) score mass in the top
k, i.e. "how much importance is left out".

**Rule.** An image keeps ``k = min{k in [min, max] : r(k) <= threshold}`` (``max`` when none), one threshold for
all images. The count depends only on the image's own candidates, never on its batch-mates.

**Calibration, and what "mean" guarantees.** One threshold turns into different means on different data, so it is
fitted on a calibration set the user provides: ``sieve.calibrate(model, batches)`` runs the encoder (not the LM) on
those batches, collects every candidate set's residuals and picks the threshold at which the rule's counts average
``mean`` on them: water-filling, each token goes to the image whose residual is then largest, and the threshold is
the level where the total reaches ``mean`` x images. The mean is therefore exact on the calibration set (up to
residual ties) and holds *in expectation* on data drawn like it; on any one batch the mean varies (that is the
point: a batch of blank walls keeps fewer tokens). ``Calibration`` records the achieved calibration mean, and
every call's report records each image's count. There is no per-batch fit: it would make an image's count depend
on the other images in its batch. A threshold can be reused: ``Adaptive(mean=64, threshold=t)``, or in text
(CLI, lmms-eval's ``budget=``) ``adaptive:64@t``, which is what ``str()`` of a calibrated budget prints.

**Measurement behind the choice** (``python benchmarks/adaptive_criterion.py``, default model, 144 tokens per
image; ``benchmarks/results/adaptive_criterion.md``):

* The coverage residual reads the scene: on shapes, its value at k = mean rises with the number of objects
  (Spearman 0.73 at k = 18, 0.63 at 36; ``radius``, the largest instead of the mean distance, 0.85 / 0.73) in the
  vision features, much less in the projected tokens (0.29 / -0.46), so pre-projector methods read it before the
  projector, where they select.
* Calibrated on 256 images of a disjoint split, the mean on 600 test questions lands within 0.5 tokens of the
  target (DivPrune on easy-VQA: 37.7 for 36; its projected-token residuals shift more between splits).
* ``coverage`` is the default because it is never clearly worse than the alternatives and works for every method:
  ``scores`` (the method's own ranking) is worse on average (easy-VQA at 36: EvoCut 77.7% against 87.0%, FasterVLM
  80.2% against 88.0%) and does not exist for DivPrune; ``radius`` is within noise of ``coverage``.
* What it buys is data-dependent. On the full test sets (``tokensieve eval`` with ``adaptive:36`` / ``adaptive:18``,
  ``benchmarks/results/eval_*_adaptive``), against the fixed budget at the same mean: easy-VQA at 36 tokens gains
  for EvoCut (+0.5), FasterVLM (+1.9) and VisPruner (+1.6) and loses for DivPrune (-1.8); at 18 tokens only
  FasterVLM gains (+2.0, the others -1.3 to -3.2); shapes loses 0.2 to 4.0 points except EvoCut at 18 (+0.5, noise).
  The reason is measured too (600 questions per set): whether a question breaks at k tokens is not predictable from the
  image (AUC of the residual 0.49-0.58), although an oracle that knew each question's need would reach 69% at a
  mean of 18 where fixed budgets reach 38-51%. On these benchmarks the need depends on *what is asked*, which no
  image-only criterion can see; images of genuinely different complexity are where a per-image count pays.

Defaults: ``min = mean // 4`` (at least 1), ``max = 3 * mean`` capped at the token count (64 -> 16..192). An
explicit ``max`` above an image's token count, or ``mean`` outside [min, max], is an error. Multi-crop images under
scope ``image`` split mean, min and max over the crops like a fixed budget (each crop at least 1), and each crop
adapts on its own candidates. In-LLM methods take an adaptive *layer-averaged* budget: the criterion reads each
image's tokens as they enter the LM (they exist before the LM runs), and the method's own schedule reaches the
target or refuses it (:func:`llm_counts`). Methods that cut inside the encoder are refused: their cuts happen before
the features this criterion reads exist. One adaptive budget per sieve (one threshold is fitted).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

from .budget import CRITERIA, Adaptive, AdaptiveTarget  # noqa: F401 (the value types live with Budget)
from .errors import BudgetError


def coverage_residuals(features: torch.Tensor, hi: int, reduce: str = "mean") -> torch.Tensor:
    """[B, hi] float64: for k = 1..hi, mean cosine distance of every candidate to its nearest of k farthest-point picks.

    The first pick is the medoid (the candidate nearest to all others on average), then always the candidate
    farthest from the picks so far. Non-increasing in k.
    """
    import torch

    from .methods.divprune import cosine_distances

    b, n, _ = features.shape
    hi = max(1, min(hi, n))
    dist = cosine_distances(features).clamp_min(0.0)  # [B, n, n], float32
    rows = torch.arange(b, device=features.device)
    first = dist.double().mean(dim=-1).argmin(dim=-1)
    closest = dist[rows, first]
    agg = (lambda c: c.double().mean(dim=-1)) if reduce == "mean" else (lambda c: c.double().amax(dim=-1))
    out = torch.empty(b, hi, dtype=torch.float64, device=features.device)
    out[:, 0] = agg(closest)
    for step in range(1, hi):
        nxt = closest.argmax(dim=-1)
        closest = torch.minimum(closest, dist[rows, nxt])
        out[:, step] = agg(closest)
    return out


def score_residuals(scores: torch.Tensor, hi: int) -> torch.Tensor:
    """[B, hi] float64: 1 - share of the non-negative score mass in the top k, for k = 1..hi."""
    import torch

    p = scores.double().clamp_min(0.0)
    total = p.sum(dim=-1, keepdim=True)
    p = torch.where(total > 0, p / total.clamp_min(1e-300), torch.full_like(p, 1.0 / p.shape[-1]))
    mass = p.sort(dim=-1, descending=True).values.cumsum(dim=-1)[:, : max(1, hi)]
    return (1.0 - mass).clamp_min(0.0)


def residuals(target: AdaptiveTarget, method, signals) -> torch.Tensor:
    if target.criterion in ("coverage", "radius"):
        return coverage_residuals(signals.features, target.hi, "mean" if target.criterion == "coverage" else "max")
    sel = method.select(signals, target.mean)
    if sel.scores is None:
        raise BudgetError(
            f"{method.name} has no per-token scores, so Adaptive(criterion='scores') cannot rank its images; use "
            "criterion='coverage' (works for every method)"
        )
    return score_residuals(sel.scores, target.hi)


def counts_at(curves: torch.Tensor, lo: int, hi: int, threshold: float) -> list[int]:
    """The rule: per row, the smallest k in [lo, hi] with r(k) <= threshold (hi if none)."""
    window = curves[:, lo - 1 : hi - 1]  # r(k) for k = lo .. hi - 1
    return (lo + (window > threshold).sum(dim=-1)).tolist()


# -- calibration ---------------------------------------------------------------------------------------------------

_RECORDING: ContextVar[list | None] = ContextVar("tokensieve_adaptive_recording", default=None)


@contextmanager
def recording() -> Iterator[list]:
    """Collect ``(window residuals, lo, mean, hi)`` of every candidate set selected inside the block."""
    records: list = []
    token = _RECORDING.set(records)
    try:
        yield records
    finally:
        _RECORDING.reset(token)


@dataclass
class Calibration:
    """A fitted adaptive rule and what it does on the calibration set itself."""

    threshold: float
    sets: int
    """Candidate sets (images, or crops / frames where those are the unit) seen."""
    target_mean: float
    """Mean tokens per set that the budget asked for (lo, mean, hi resolved per set)."""
    achieved_mean: float
    """Mean tokens per set that the fitted rule keeps on the calibration sets."""
    counts: list[int] = field(default_factory=list)
    """Per calibration set, the count the rule gives."""

    def summary(self) -> str:
        lo, hi = (min(self.counts), max(self.counts)) if self.counts else (0, 0)
        return (
            f"adaptive threshold {self.threshold:.6g} from {self.sets} candidate set(s): mean {self.achieved_mean:.2f} "
            f"tokens (target {self.target_mean:.2f}), counts {lo}..{hi}"
        )


def fit(records: list) -> Calibration:
    """The threshold at which the rule's counts total the target on ``records`` (water-filling, see the docstring)."""
    import torch

    if not records:
        raise BudgetError("calibration saw no image: give at least one batch with images")
    windows = [r[0] for r in records]
    extra = sum(r[2] - r[1] for r in records)  # tokens to hand out above every set's floor
    entries = torch.cat(windows).sort(descending=True).values if windows else torch.zeros(0, dtype=torch.float64)
    if extra <= 0 or entries.numel() == 0:
        threshold = float(entries[0]) if entries.numel() else 0.0
    elif extra >= entries.numel():
        threshold = -1.0  # residuals are >= 0: every set takes its max
    else:
        threshold = float((entries[extra - 1] + entries[extra]) / 2)
    counts = [r[1] + int((r[0] > threshold).sum()) for r in records]
    return Calibration(
        threshold=threshold,
        sets=len(records),
        target_mean=sum(r[2] for r in records) / len(records),
        achieved_mean=sum(counts) / len(counts),
        counts=counts,
    )


# -- selection -----------------------------------------------------------------------------------------------------


def adaptive_counts(target: AdaptiveTarget, method, signals) -> list[int]:
    """Per candidate set, the count the adaptive rule gives (the mean while a calibration is recording)."""
    import torch

    if not target.lo <= target.mean <= target.hi:
        raise BudgetError(f"adaptive bounds {target.lo} <= {target.mean} <= {target.hi} do not hold")
    records = _RECORDING.get()
    if records is None and target.threshold is None and target.mean not in (target.lo, target.hi):
        raise BudgetError(
            "this Adaptive budget has no threshold yet: call sieve.calibrate(model, batches) on a few representative "
            "batches first (the mean is fitted there), or give an earlier calibration's threshold "
            "(Adaptive(..., threshold=t), or the text adaptive:MEAN@t)"
        )
    if target.mean in (target.lo, target.hi):  # every set gets the mean: nothing to rank
        curves = None
    else:
        curves = residuals(target, method, signals)
    if records is not None:
        for i in range(signals.batch):
            if curves is None:  # a fixed count in disguise
                records.append((torch.zeros(0, dtype=torch.float64), target.mean, target.mean, target.mean))
            else:
                records.append((curves[i, target.lo - 1 : target.hi - 1].cpu(), target.lo, target.mean, target.hi))
        return [target.mean] * signals.batch
    if curves is None:
        return [target.mean] * signals.batch
    return counts_at(curves, target.lo, target.hi, target.threshold)


def lm_input_features(kwargs: dict) -> list[torch.Tensor]:
    """Per report entry (images, then videos), the visual tokens an adapter hands the LM (``mm_encoder_outputs``)."""

    out: list[torch.Tensor] = []
    for key in ("image", "video"):
        entry = (kwargs.get("mm_encoder_outputs") or {}).get(key)
        if entry is not None:
            out += list(entry.pooler_output)
    return out


def llm_counts(budget, images: list, features: list[torch.Tensor]) -> list[int]:
    """Layer-averaged targets per report entry for an adaptive in-LLM budget.

    The criterion reads the entry's tokens as they enter the LM (its candidates there); the in-LLM method's own
    schedule then turns each target into boundaries, and refuses a target it cannot reach.
    """
    from .methods.base import Layout, Signals

    if budget.value.criterion == "scores":
        raise BudgetError(
            "in-LLM methods score inside the LM, after the count is planned: use criterion='coverage' "
            "or 'radius' for an adaptive in-LLM budget"
        )
    if len(features) != len(images):
        raise BudgetError(f"{len(images)} visual entries but {len(features)} feature sets entering the LM")
    out = []
    for i, (im, f) in enumerate(zip(images, features)):
        n = int(f.shape[0])
        if n == 0:
            out.append(0)
            continue
        target = budget.resolve(n, what=f"{'video' if im.frames else 'image'} {i} entering the LM")
        signals = Signals(features=f[None].float(), layout=Layout((1, n)), num_layers=0, feature_layer=0)
        out.append(adaptive_counts(target, None, signals)[0])
    return out
