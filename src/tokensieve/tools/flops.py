"""FLOPs of one call, computed from the model config and the per-layer token trace of that call.

Why a trace and not a formula in the keep ratio: in-encoder and in-LLM methods change the token count from layer to
layer, and papers disagree on what they count. Summing a per-matmul formula over the layers with the token count each
layer really processed (``SieveReport.encoder_layer_tokens``, ``llm_layer_tokens``) gives one number that is right
for every stage, and the same trace yields the paper conventions for comparison.

What is counted ("true FLOPs"): every matrix multiplication, 2 FLOPs per multiply-accumulate, as
``torch.utils.flop_counter`` counts them:

* vision encoder: patch embedding, per layer q/k/v/o projections and the MLP on every row that layer ran, QKᵀ and
  AV within each attention segment it ran on (an image, an anyres crop, a video frame; Qwen2.5-VL's windows), and
  SigLIP's attention-pooling head where the tower has one;
* projector: its linear layers on the rows actually projected (pre-projector methods project only kept tokens):
  LLaVA-family patches or pooled frame tokens, Qwen-VL's 2x2 merge units (the merger), Idefics3's pixel-shuffle
  groups (the connector);
* LM prefill, per decoder layer with its real token count: q/o at full width, k/v at the grouped-query width,
  QKᵀ and AV, a gated (3-matrix) or plain (2-matrix) MLP; the LM head on ``logits_tokens`` rows per sample
  (1 under ``generate``);
* decoding: per new token after the first, the same layer with one query against the KV cache of that layer.

Attention is counted dense (n x n per head), as the kernels' shapes and the paper formulas do; a causal kernel may
skip up to half of it. Element-wise work (norms, activations, softmax, rotary, pooling) is not counted; it is a few
percent. Padding is not counted: the trace holds real tokens only.

Families (``dims_from_config``): LLaVA-1.5, LLaVA-NeXT (every anyres crop is an encoder pass; the projector runs on
every crop's patches before unpadding), LLaVA-NeXT-Video (frames pooled before the projector), LLaVA-OneVision
(images and videos, projector before pooling), Qwen2-VL / Qwen2.5-VL (packed patches priced per ``image_grid_thw`` /
``video_grid_thw``, full-attention segments per frame, windows on Qwen2.5-VL's windowed blocks, the merger) and
Idefics3 / SmolVLM (crops, the connector). A vanilla call's trace comes from its inputs (:func:`vanilla_trace`); a
sieved call's from its report, whose per-layer segments and projected rows are counted while the call runs.

Conventions for comparing with papers (LM prefill only, in multiply-accumulates as the papers write them, see the
module tests for their exact relationships):

* ``fastv_eq5``: sum over layers of ``4nd² + 2n²d + 2ndm`` (FastV Eq. 5, multi-head attention, 2-matrix MLP);
* ``pdrop``: ``4nd² + 2n²d + 3ndm`` (PyramidDrop / SparseVLM correction for gated MLPs).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..errors import UnsupportedModelError

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
    """Patch grid of one pass at the config's image size (LLaVA families: one image or crop)."""
    has_cls: bool = True
    patch_inputs: int | None = None
    """Values per patch row entering the patch embedding; ``None``: channels x patch² (Qwen-VL: x temporal patch)."""
    gated: bool = False
    """Gated (3-matrix) MLP, as Qwen2.5-VL's vision blocks."""
    head_intermediate: int | None = None
    """MLP width of SigLIP's attention-pooling head, when the tower runs one."""

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def patch_width(self) -> int:
        return self.patch_inputs or self.channels * self.patch * self.patch


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
    """(in, out) of each projector linear layer, in order, applied to every projected row."""
    lm: LMDims
    image_tokens: int | None
    """Placeholders one image (LLaVA-NeXT, OneVision: one crop; Idefics3: one crop) occupies in an uncompressed
    prompt; ``None`` where it depends on the image's resolution (Qwen-VL)."""
    family: str = "llava"
    """The config's ``model_type``: which layout :func:`vanilla_trace` reads the inputs with."""


LLAVA_FAMILIES = ("llava", "llava_next", "llava_next_video", "llava_onevision")
QWEN_FAMILIES = ("qwen2_vl", "qwen2_5_vl")
IDEFICS3_FAMILIES = ("idefics3", "smolvlm")
FAMILIES = LLAVA_FAMILIES + QWEN_FAMILIES + IDEFICS3_FAMILIES


def _lm_dims(config) -> LMDims:
    tc = config.get_text_config()
    heads = tc.num_attention_heads
    kv = getattr(tc, "num_key_value_heads", None) or heads
    head_dim = getattr(tc, "head_dim", None) or tc.hidden_size // heads
    return LMDims(
        tc.hidden_size,
        tc.intermediate_size,
        tc.num_hidden_layers,
        heads,
        kv,
        head_dim,
        tc.vocab_size,
        gated=tc.model_type not in _PLAIN_MLP,
    )


def dims_from_config(config) -> Dims:
    """Dims of a supported family's config (``config`` or a model's ``.config``; see the module docstring)."""
    family = getattr(config, "model_type", None)
    if family not in FAMILIES:
        raise UnsupportedModelError(
            f"FLOPs are implemented for model types {', '.join(FAMILIES)}; got "
            f"{family if family is not None else type(config).__name__!r}"
        )
    vc, tc = config.vision_config, config.get_text_config()
    if family in QWEN_FAMILIES:
        merge = int(vc.spatial_merge_size)
        width = vc.embed_dim if family == "qwen2_vl" else vc.hidden_size
        mlp = int(width * vc.mlp_ratio) if family == "qwen2_vl" else vc.intermediate_size
        out = vc.hidden_size if family == "qwen2_vl" else vc.out_hidden_size
        vision = VisionDims(
            width,
            mlp,
            vc.depth,
            vc.patch_size,
            vc.in_channels,
            (0, 0),
            has_cls=False,
            patch_inputs=vc.in_channels * vc.temporal_patch_size * vc.patch_size**2,
            gated=family == "qwen2_5_vl",
        )
        unit = width * merge**2
        return Dims(vision, ((unit, unit), (unit, out)), _lm_dims(config), None, family)
    side = vc.image_size // vc.patch_size
    if family in IDEFICS3_FAMILIES:
        scale = int(config.scale_factor)
        vision = VisionDims(
            vc.hidden_size,
            vc.intermediate_size,
            vc.num_hidden_layers,
            vc.patch_size,
            getattr(vc, "num_channels", 3),
            (side, side),
            has_cls=False,
        )
        projector = ((vc.hidden_size * scale**2, tc.hidden_size),)
        return Dims(vision, projector, _lm_dims(config), (side // scale) ** 2, family)
    has_cls = getattr(vc, "model_type", "") != "siglip_vision_model"
    head = vc.intermediate_size if not has_cls and getattr(vc, "vision_use_head", False) else None
    vision = VisionDims(
        vc.hidden_size,
        vc.intermediate_size,
        vc.num_hidden_layers,
        vc.patch_size,
        getattr(vc, "num_channels", 3),
        (side, side),
        has_cls=has_cls,
        head_intermediate=head,
    )
    layers = config.vision_feature_layer
    n_feat = 1 if isinstance(layers, int) else len(layers)
    projector = ((vc.hidden_size * n_feat, tc.hidden_size), (tc.hidden_size, tc.hidden_size))
    full = config.vision_feature_select_strategy != "default" and has_cls
    return Dims(vision, projector, _lm_dims(config), side * side + int(full), family)


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
    encoder_segments: list[list[int]] | None = None
    """Per encoder layer, the length of every attention segment it ran on in the call (a crop, a frame, an image,
    a window), empty for a layer skipped. ``None``: ``num_images`` segments of ``encoder_layer_tokens``."""
    encoder_head_tokens: list[int] = field(default_factory=list)
    """Rows entering SigLIP's attention-pooling head, one entry per pass that ran it."""

    def segments(self) -> list[list[int]]:
        """Per encoder layer, the attention segments of the call."""
        if self.encoder_segments is not None:
            return [list(s) for s in self.encoder_segments]
        return [[int(n)] * self.num_images if n else [] for n in self.encoder_layer_tokens] if self.num_images else []

    def to_dict(self) -> dict:
        return dict(vars(self))


def trace_from_report(report, new_tokens: int = 1, logits_tokens: int = 1, sample: int | None = None) -> TokenTrace:
    """The trace of a sieved call, from its :class:`~tokensieve.report.SieveReport`.

    The encoder segments, projector rows and pooling-head rows counted while the call ran are used as they are.
    ``sample`` restricts the trace to one sample of the batch (its images and its decoder-layer counts), so
    per-question costs add up to the batch's. The counted encoder rows are split by encoder pass (crop or frame),
    and the projector's by visual token; that is exact where every pass is one attention segment and the projector
    ran once per token entering the LM (LLaVA-1.5, Idefics3), and refused elsewhere (anyres paths that project every
    crop first, Qwen's merger on 4 rows a token and windowed blocks), since the report cannot tell whose rows those
    are.
    """
    from ..methods.base import POST_PROJECTOR

    images = report.images if sample is None else [im for im in report.images if im.sample == sample]
    rows = range(len(report.llm_layer_tokens)) if sample is None else [sample]
    layers = [list(report.llm_layer_tokens[i]) for i in rows]
    visual = [list(report.llm_layer_visual_tokens[i]) for i in rows]
    segments = [list(s) for s in report.encoder_layer_segments] if report.encoder_layer_segments else None
    head = list(report.encoder_head_tokens)
    if sample is None and report.projected_tokens is not None:  # counted while the call ran
        projected = report.projected_tokens
    elif report.stage == POST_PROJECTOR:
        projected = sum(im.tokens_in for im in images)
    else:
        projected = sum(v[0] for v in visual if v)
    if sample is not None:
        every = (
            sum(im.tokens_in for im in report.images)
            if report.stage == POST_PROJECTOR
            else sum(v[0] for v in report.llm_layer_visual_tokens if v)
        )
        if report.projected_tokens is not None and report.projected_tokens != every:
            raise ValueError(
                f"per-sample FLOPs cannot be split out of this batch: its projector ran on {report.projected_tokens} "
                f"rows, not one per visual token entering the LM ({every}); price the whole batch (sample=None)"
            )
        passes = [im.frames or im.crops for im in report.images]
        first = sum(n for im, n in zip(report.images, passes) if im.sample < sample)
        mine = slice(first, first + sum(n for im, n in zip(report.images, passes) if im.sample == sample))
        if any(s and len(s) != sum(passes) for s in (segments or []) + [head]):
            raise ValueError(
                "per-sample FLOPs need one attention segment per encoder pass; this call's encoder ran in windows "
                "or packed segments, so price the whole batch (sample=None)"
            )
        segments = [s[mine] if s else [] for s in segments] if segments is not None else None
        head = head[mine]
    return TokenTrace(
        encoder_layer_tokens=list(report.encoder_layer_tokens),
        # the encoder runs once per crop (anyres) or frame (video), each at the trace's per-pass lengths
        num_images=sum(im.frames or im.crops for im in images),
        projected_tokens=int(projected),
        llm_layer_tokens=layers,
        llm_layer_visual_tokens=visual,
        new_tokens=new_tokens,
        logits_tokens=logits_tokens,
        encoder_segments=segments,
        encoder_head_tokens=head,
    )


def vanilla_trace(
    config, input_ids, attention_mask=None, new_tokens: int = 1, logits_tokens: int = 1, **inputs
) -> TokenTrace:
    """The trace an uncompressed call on this batch has: every layer sees every token.

    ``inputs`` are the rest of the processor's output where the family needs them to know what the encoder runs
    on: ``image_sizes`` (LLaVA-NeXT, OneVision: crops per image), ``batch_num_images`` (OneVision),
    ``pixel_values_videos`` (frames), ``image_grid_thw`` / ``video_grid_thw`` (Qwen-VL). ``vanilla_trace(config,
    **inputs)`` passes them all; pixels themselves are never read.
    """
    dims = dims_from_config(config)
    ids = input_ids if input_ids.dim() == 2 else input_ids[None]
    real = ids.new_ones(ids.shape, dtype=bool) if attention_mask is None else attention_mask.bool()
    tokens = [config.image_token_id] + (
        [config.video_token_id] if getattr(config, "video_token_id", None) is not None else []
    )
    visual = (torch.isin(ids, torch.tensor(tokens, device=ids.device)) & real).sum(dim=1).tolist()
    lengths = [int(n) for n in real.sum(dim=1).tolist()]
    visual = [int(v) for v in visual]
    images = int(((ids == config.image_token_id) & real).sum())
    if dims.family == "llava":
        if images % dims.image_tokens:
            raise ValueError(
                f"{images} image placeholders are not a whole number of images of {dims.image_tokens} tokens each"
            )
        return _uniform_trace(
            dims,
            lengths,
            visual,
            images // dims.image_tokens,
            projected=images,
            new_tokens=new_tokens,
            logits_tokens=logits_tokens,
        )
    if dims.family in QWEN_FAMILIES:
        segments, head, projected = _qwen_encoder(config, dims, inputs)
    elif dims.family in IDEFICS3_FAMILIES:
        if images % dims.image_tokens:
            raise ValueError(f"{images} image placeholders are not a whole number of crops of {dims.image_tokens}")
        crops = images // dims.image_tokens
        segments, head, projected = [[dims.vision.num_patches] * crops] * dims.vision.layers, [], images
    else:
        segments, head, projected = _llava_encoder(config, dims, inputs)
    passes = len(segments[0]) if segments else 0
    return TokenTrace(
        encoder_layer_tokens=[round(sum(s) / passes) if passes else 0 for s in segments] if passes else [],
        num_images=passes,
        projected_tokens=projected,
        llm_layer_tokens=[[n] * dims.lm.layers for n in lengths],
        llm_layer_visual_tokens=[[n] * dims.lm.layers for n in visual],
        new_tokens=new_tokens,
        logits_tokens=logits_tokens,
        encoder_segments=segments,
        encoder_head_tokens=head,
    )


def _llava_encoder(config, dims: Dims, inputs: dict):
    """Encoder passes of a LLaVA-NeXT / NeXT-Video / OneVision call: every crop of every image, every video frame."""
    from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches

    v = dims.vision
    per_pass = v.num_patches + int(v.has_cls)
    crops: list[int] = []
    sizes = inputs.get("image_sizes")
    if sizes is not None:
        per_sample = inputs.get("batch_num_images")
        single = [int(n) == 1 for n in per_sample for _ in range(int(n))] if per_sample is not None else None
        for i, size in enumerate(sizes.tolist() if isinstance(sizes, torch.Tensor) else sizes):
            n = int(image_size_to_num_patches(size, config.image_grid_pinpoints, config.vision_config.image_size))
            crops.append(n if single is None or single[i] else 1)  # OneVision: multi-image prompts are not tiled
    elif inputs.get("pixel_values") is not None:
        raise ValueError(f"{dims.family} FLOPs need the processor's image_sizes to know each image's crops")
    video = inputs.get("pixel_values_videos")
    frames = int(video.shape[0] * video.shape[1]) if video is not None else 0
    passes = sum(crops) + frames
    projected = sum(crops) * dims.image_tokens
    if frames:
        if dims.family == "llava_onevision":  # OneVision projects every patch of a frame, then pools
            projected += frames * v.num_patches
        else:  # NeXT-Video pools (average or max: no matmul) before projecting
            if getattr(config, "spatial_pool_mode", "average") not in ("average", "max"):
                raise UnsupportedModelError(
                    f"FLOPs of spatial_pool_mode={config.spatial_pool_mode!r} are not implemented (average, max)"
                )
            stride = int(config.spatial_pool_stride)
            projected += frames * (v.grid[0] // stride) * (v.grid[1] // stride)
    segments = [[per_pass] * passes] * v.layers
    head = [v.num_patches] * passes if v.head_intermediate else []
    return segments, head, projected


def _qwen_encoder(config, dims: Dims, inputs: dict):
    """Attention segments of a Qwen-VL call, read off the model's own helpers for ``*_grid_thw``: one per temporal
    patch on full-attention blocks, one per window on Qwen2.5-VL's windowed blocks."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    vc = config.vision_config
    merge = int(vc.spatial_merge_size)
    full: list[int] = []
    windows: list[int] = []
    rows = 0
    for key in ("image_grid_thw", "video_grid_thw"):
        grid = inputs.get(key)
        if grid is None:
            continue
        grid = torch.as_tensor(grid).long()
        rows += int(grid.prod(-1).sum())
        full += [int(n) for n in torch.diff(get_vision_cu_seqlens(grid)).tolist() if n]
        if dims.family == "qwen2_5_vl":
            _, cu = get_vision_window_index(grid, merge, vc.window_size, vc.patch_size)
            windows += [int(n) for n in torch.diff(torch.as_tensor(cu).long()).tolist() if n]
    if rows == 0 and (inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None):
        raise ValueError(f"{dims.family} FLOPs need the processor's image_grid_thw / video_grid_thw")
    full_blocks = (
        set(getattr(vc, "fullatt_block_indexes", None) or range(vc.depth))
        if dims.family == "qwen2_5_vl"
        else set(range(vc.depth))
    )
    segments = [list(full) if i in full_blocks else list(windows) for i in range(vc.depth)]
    return segments, [], rows // merge**2


def analytic_trace(
    config,
    *,
    text_tokens: int,
    visual_tokens: int,
    projected_tokens: int | None = None,
    num_images: int = 1,
    new_tokens: int = 1,
) -> TokenTrace:
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
    return TokenTrace(
        enc,
        num_images,
        projected,
        [[n] * lm_layers for n in lengths],
        [[n] * lm_layers for n in visual],
        new_tokens,
        logits_tokens,
    )


# -- per-part formulas (FLOPs = 2 x MACs) ----------------------------------------------------------------------


def vision_layer_flops(v: VisionDims, n: int | list[int]) -> int:
    """One encoder layer on one segment of ``n`` rows, or on every segment of a list."""
    segments = [n] if isinstance(n, int) else n
    d, m = v.hidden, v.intermediate
    rows = sum(segments)
    return 2 * (4 * rows * d * d + 2 * sum(s * s for s in segments) * d + (3 if v.gated else 2) * rows * d * m)


def patch_embed_flops(v: VisionDims, rows: int | None = None) -> int:
    """The patch embedding of ``rows`` patches (default: one pass at the config's grid)."""
    return 2 * (v.num_patches if rows is None else rows) * v.patch_width * v.hidden


def vision_head_flops(v: VisionDims, n: int) -> int:
    """SigLIP's attention-pooling head on one pass of ``n`` rows: a probe query's projection, keys and values of
    every row, one attention row, the output projection and the head's MLP on the pooled row."""
    d = v.hidden
    return 2 * (d * d + 2 * n * d * d + 2 * n * d + d * d + 2 * d * (v.head_intermediate or 0))


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
        return dict(
            decode_per_token=self.decode_per_token,
            vision=self.vision,
            projector=self.projector,
            prefill=self.prefill,
            prefill_layers=list(self.prefill_layers),
            lm_head_prefill=self.lm_head_prefill,
            decode=self.decode,
            to_first_token=self.to_first_token,
            total=self.total,
            macs=self.macs,
            fastv_eq5_macs=self.fastv_eq5_macs,
            pdrop_macs=self.pdrop_macs,
        )


def count_flops(dims_or_config, trace: TokenTrace) -> Flops:
    """FLOPs of the call that produced ``trace`` (see the module docstring for what is counted)."""
    dims = dims_or_config if isinstance(dims_or_config, Dims) else dims_from_config(dims_or_config)
    v, lm = dims.vision, dims.lm
    segments = trace.segments()
    if segments and len(segments) != v.layers:
        raise ValueError(f"trace has {len(segments)} encoder layers, the config {v.layers}")
    vision = 0
    if segments:
        # layer 0 always runs whole: its rows are every patch, plus one CLS row per pass on CLS towers
        patches = sum(segments[0]) - (len(segments[0]) if v.has_cls else 0)
        vision = patch_embed_flops(v, patches) + sum(vision_layer_flops(v, s) for s in segments if s)
        vision += sum(vision_head_flops(v, n) for n in trace.encoder_head_tokens)
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
