"""FLOPs of one call, computed from the model config and the per-layer token trace of that call.

Why a trace and not a formula in the keep ratio: in-encoder and in-LLM methods change the token count from layer to
layer, and papers disagree on what they count. Summing a per-matmul formula over the layers with the token count each
layer really processed (``SieveReport.encoder_layer_tokens``, ``llm_layer_tokens``) gives one number that is right
for every stage, and the same trace yields the paper conventions for comparison.

What is counted ("true FLOPs"): every matrix multiplication, 2 FLOPs per multiply-accumulate, as
``torch.utils.flop_counter`` counts them:

* vision encoder: patch embedding, per layer q/k/v/o projections, QKᵀ and AV, the MLP, with that layer's length;
* projector: its linear layers on the tokens actually projected (pre-projector methods project only kept tokens);
* LM prefill, per decoder layer with its real token count: q/o at full width, k/v at the grouped-query width,
  QKᵀ and AV, a gated (3-matrix) or plain (2-matrix) MLP; the LM head on ``logits_tokens`` rows per sample
  (1 under ``generate``);
* decoding: per new token after the first, the same layer with one query against the KV cache of that layer.

Attention is counted dense (n x n per head), as the kernels' shapes and the paper formulas do; a causal kernel may
skip up to half of it. Element-wise work (norms, activations, softmax, rotary) is not counted; it is a few percent.
Padding is not counted: the trace holds real tokens only.

Conventions for comparing with papers (LM prefill only, in multiply-accumulates as the papers write them, see the
module tests for their exact relationships):

* ``fastv_eq5``: sum over layers of ``4nd² + 2n²d + 2ndm`` (FastV Eq. 5, multi-head attention, 2-matrix MLP);
* ``pdrop``: ``4nd² + 2n²d + 3ndm`` (PyramidDrop / SparseVLM correction for gated MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UnsupportedModelError

# decoder families whose MLP has no gate (two matrices); everything else is counted as gated
_PLAIN_MLP = {"gpt2", "opt", "gpt_neox", "gptj", "phi", "bloom", "falcon", "mpt", "starcoder2"}


@dataclass(frozen=True)
class VisionDims:
    hidden: int
    intermediate: int
    layers: int
    patch: int
    channels: int
    grid: tuple[int, int]
    has_cls: bool = True

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]


@dataclass(frozen=True)
class LMDims:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    gated: bool


@dataclass(frozen=True)
class Dims:
    """The shapes FLOPs depend on, read once from a config (weights are never needed)."""

    vision: VisionDims
    projector: tuple[tuple[int, int], ...]
    """(in, out) of each projector linear layer, in order."""
    lm: LMDims
    image_tokens: int
    """Placeholders one image occupies in an uncompressed prompt."""


def dims_from_config(config) -> Dims:
    """Dims of a LLaVA-1.5-layout config (``LlavaConfig`` or a model's ``.config``)."""
    if getattr(config, "model_type", None) != "llava":
        raise UnsupportedModelError(
            f"FLOPs are implemented for the LLaVA-1.5 layout (model_type 'llava'), got "
            f"{getattr(config, 'model_type', type(config).__name__)!r}"
        )
    vc = config.vision_config
    tc = config.get_text_config()
    side = vc.image_size // vc.patch_size
    vision = VisionDims(vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers, vc.patch_size,
                        getattr(vc, "num_channels", 3), (side, side))
    layers = config.vision_feature_layer
    n_feat = 1 if isinstance(layers, int) else len(layers)
    projector = ((vc.hidden_size * n_feat, tc.hidden_size), (tc.hidden_size, tc.hidden_size))
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    lm = LMDims(tc.hidden_size, tc.intermediate_size, tc.num_hidden_layers, heads, kv, head_dim, tc.vocab_size,
                gated=tc.model_type not in _PLAIN_MLP)
    image_tokens = side * side + (0 if config.vision_feature_select_strategy == "default" else 1)
    return Dims(vision, projector, lm, image_tokens)


@dataclass
class TokenTrace:
    """How many tokens each part of one call processed; the only input FLOPs need besides :class:`Dims`."""

    encoder_layer_tokens: list[int]
    """Per encoder layer, one image's sequence length entering it (CLS included)."""
    num_images: int
    """Encoder passes: images, or the crops and frames of anyres images and videos."""
    projected_tokens: int
    """Tokens that went through the projector, all images together."""
    llm_layer_tokens: list[list[int]]
    """Per sample, per decoder layer, real tokens processed in prefill (= that layer's KV-cache length after it)."""
    llm_layer_visual_tokens: list[list[int]]
    new_tokens: int = 1
    """Tokens generated per sample; the first comes out of the prefill, the others cost one decoding step each."""
    logits_tokens: int = 1
    """Rows per sample the LM head computes in prefill: 1 under ``generate``, the whole sequence for ``forward``."""

    def to_dict(self) -> dict:
        return dict(vars(self))


def trace_from_report(report, new_tokens: int = 1, logits_tokens: int = 1, sample: int | None = None) -> TokenTrace:
    """The trace of a sieved call, from its :class:`~tokensieve.report.SieveReport`.

    Post-projector methods project every candidate; every other stage projects what enters the LM, which is the
    visual tokens at decoder layer 0. ``sample`` restricts the trace to one sample of the batch (its images and
    its decoder-layer counts), so per-question costs add up to the batch's.
    """
    from .methods.base import POST_PROJECTOR

    images = report.images if sample is None else [im for im in report.images if im.sample == sample]
    rows = range(len(report.llm_layer_tokens)) if sample is None else [sample]
    layers = [list(report.llm_layer_tokens[i]) for i in rows]
    visual = [list(report.llm_layer_visual_tokens[i]) for i in rows]
    if report.stage == POST_PROJECTOR:
        projected = sum(im.tokens_in for im in images)
    else:
        projected = sum(v[0] for v in visual if v)
    return TokenTrace(
        encoder_layer_tokens=list(report.encoder_layer_tokens),
        # the encoder runs once per crop (anyres) or frame (video), each at the trace's per-pass lengths
        num_images=sum(im.frames or im.crops for im in images),
        projected_tokens=int(projected),
        llm_layer_tokens=layers,
        llm_layer_visual_tokens=visual,
        new_tokens=new_tokens,
        logits_tokens=logits_tokens,
    )


def vanilla_trace(config, input_ids, attention_mask=None, new_tokens: int = 1, logits_tokens: int = 1) -> TokenTrace:
    """The trace an uncompressed call on this batch has: every layer sees every token."""
    dims = dims_from_config(config)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    real = ids.new_ones(ids.shape, dtype=bool) if attention_mask is None else attention_mask.bool()
    visual = ((ids == config.image_token_id) & real).sum(dim=1).tolist()
    lengths = real.sum(dim=1).tolist()
    n_visual = sum(visual)
    if n_visual % dims.image_tokens:
        raise ValueError(
            f"{n_visual} image placeholders are not a whole number of images of {dims.image_tokens} tokens each"
        )
    return _uniform_trace(dims, [int(n) for n in lengths], [int(v) for v in visual], n_visual // dims.image_tokens,
                          projected=n_visual, new_tokens=new_tokens, logits_tokens=logits_tokens)


def analytic_trace(config, *, text_tokens: int, visual_tokens: int, projected_tokens: int | None = None,
                   num_images: int = 1, new_tokens: int = 1) -> TokenTrace:
    """A one-sample trace without running anything: a pre- or post-projector method keeping ``visual_tokens``.

    This is what config-only analysis (a 7B model on a machine that cannot hold it) can say exactly; in-encoder and
    in-LLM methods need a real run for their trace.
    """
    dims = dims_from_config(config)
    projected = visual_tokens if projected_tokens is None else projected_tokens
    return _uniform_trace(dims, [text_tokens + visual_tokens], [visual_tokens], num_images, projected, new_tokens, 1)


def _uniform_trace(dims: Dims, lengths, visual, num_images, projected, new_tokens, logits_tokens) -> TokenTrace:
    v = dims.vision
    enc = [v.num_patches + int(v.has_cls)] * v.layers if num_images else []
    lm_layers = dims.lm.layers
    return TokenTrace(enc, num_images, projected, [[n] * lm_layers for n in lengths],
                      [[n] * lm_layers for n in visual], new_tokens, logits_tokens)


# -- per-part formulas (FLOPs = 2 x MACs) ----------------------------------------------------------------------

def vision_layer_flops(v: VisionDims, n: int) -> int:
    d, m = v.hidden, v.intermediate
    return 2 * (4 * n * d * d + 2 * n * n * d + 2 * n * d * m)


def patch_embed_flops(v: VisionDims) -> int:
    return 2 * v.num_patches * v.channels * v.patch * v.patch * v.hidden


def lm_layer_flops(lm: LMDims, n_query: int, n_key: int | None = None) -> int:
    """One decoder layer: ``n_query`` tokens attending to ``n_key`` keys (prefill: both n; decoding: 1 and cache)."""
    n_key = n_query if n_key is None else n_key
    d, q_width, kv_width = lm.hidden, lm.heads * lm.head_dim, lm.kv_heads * lm.head_dim
    proj = n_query * d * (2 * q_width + 2 * kv_width)  # q, o at full width; k, v at the grouped-query width
    attn = 2 * n_query * n_key * q_width  # QKᵀ and AV, per query head
    mlp = (3 if lm.gated else 2) * n_query * d * lm.intermediate
    return 2 * (proj + attn + mlp)


def fastv_eq5_macs(lm: LMDims, n: int) -> int:
    d, m = lm.hidden, lm.intermediate
    return 4 * n * d * d + 2 * n * n * d + 2 * n * d * m


def pdrop_macs(lm: LMDims, n: int) -> int:
    d, m = lm.hidden, lm.intermediate
    return 4 * n * d * d + 2 * n * n * d + 3 * n * d * m


@dataclass
class Flops:
    """FLOPs of one call by part; ``to_first_token`` is what time to first token pays for."""

    vision: int
    projector: int
    prefill_layers: list[int]
    """Per decoder layer, summed over samples."""
    lm_head_prefill: int
    decode: int
    fastv_eq5_macs: int
    pdrop_macs: int
    trace: TokenTrace = field(repr=False, default=None)

    @property
    def prefill(self) -> int:
        return sum(self.prefill_layers) + self.lm_head_prefill

    @property
    def to_first_token(self) -> int:
        return self.vision + self.projector + self.prefill

    @property
    def total(self) -> int:
        return self.to_first_token + self.decode

    @property
    def macs(self) -> int:
        return self.total // 2

    @property
    def decode_per_token(self) -> float | None:
        """Mean decoding FLOPs per generated token after the first, per sample."""
        steps = len(self.trace.llm_layer_tokens) * (self.trace.new_tokens - 1) if self.trace else 0
        return self.decode / steps if steps else None

    def to_dict(self) -> dict:
        return dict(decode_per_token=self.decode_per_token, vision=self.vision, projector=self.projector, prefill=self.prefill,
                    prefill_layers=list(self.prefill_layers), lm_head_prefill=self.lm_head_prefill,
                    decode=self.decode, to_first_token=self.to_first_token, total=self.total, macs=self.macs,
                    fastv_eq5_macs=self.fastv_eq5_macs, pdrop_macs=self.pdrop_macs)


def count_flops(dims_or_config, trace: TokenTrace) -> Flops:
    """FLOPs of the call that produced ``trace`` (see the module docstring for what is counted)."""
    dims = dims_or_config if isinstance(dims_or_config, Dims) else dims_from_config(dims_or_config)
    v, lm = dims.vision, dims.lm
    if trace.num_images and len(trace.encoder_layer_tokens) != v.layers:
        raise ValueError(f"trace has {len(trace.encoder_layer_tokens)} encoder layers, the config {v.layers}")
    vision = trace.num_images * (patch_embed_flops(v) + sum(vision_layer_flops(v, n) for n in trace.encoder_layer_tokens))
    projector = sum(2 * trace.projected_tokens * i * o for i, o in dims.projector)
    prefill_layers = [0] * lm.layers
    decode = fastv = pdrop = 0
    head = 2 * lm.hidden * lm.vocab
    for per_layer in trace.llm_layer_tokens:
        if len(per_layer) != lm.layers:
            raise ValueError(f"trace has {len(per_layer)} decoder layers, the config {lm.layers}")
        for i, n in enumerate(per_layer):
            prefill_layers[i] += lm_layer_flops(lm, n)
            fastv += fastv_eq5_macs(lm, n)
            pdrop += pdrop_macs(lm, n)
            # step j (1-based) feeds generated token j, attending to the prefill cache plus j tokens
            decode += sum(lm_layer_flops(lm, 1, n + j) for j in range(1, trace.new_tokens))
        decode += (trace.new_tokens - 1) * head if trace.new_tokens > 1 else 0
    lm_head_prefill = len(trace.llm_layer_tokens) * trace.logits_tokens * head
    return Flops(vision, projector, prefill_layers, lm_head_prefill, decode, fastv, pdrop, trace)
