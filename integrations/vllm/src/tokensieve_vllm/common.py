"""What every family's plugin shares: settings in the front end, the per-image setting field, engine checks, trace.

Family modules (:mod:`.llava`, :mod:`.qwen_vl`) subclass vLLM's own processing info, processor and model; the
pieces here are the ones that do not depend on the family. Imports vLLM (unlike :mod:`.settings`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping

import torch
from vllm.config import VllmConfig
from vllm.exceptions import VLLMValidationError
from vllm.multimodal.inputs import MultiModalFieldConfig

from tokensieve.plan import Target

from .settings import PREFIX, SettingsError, SieveSpec, merge, resolve, server_settings, split_kwargs

FIELD = "tokensieve"
"""The per-image processor output that carries the resolved setting (JSON bytes) to the engine."""
TRACE_ENV = "TOKENSIEVE_VLLM_TRACE"
"""When set, the engine appends one JSON line per image (method, k, kept patch indices) to this file."""


def bad_request(exc: SettingsError) -> VLLMValidationError:
    """A setting that cannot run, as vLLM's validation error: a 400 answer for that request."""
    return VLLMValidationError(f"tokensieve: {exc}", parameter=f"mm_processor_kwargs.{exc.parameter or FIELD}")


def encode_specs(specs: list[SieveSpec | None]) -> torch.Tensor:
    """[n, L] uint8 rows, one JSON setting per image, padded with spaces (JSON ignores them) to one length."""
    texts = [(s.to_json() if s else "null").encode() for s in specs]
    width = max(map(len, texts), default=4)
    return torch.tensor([list(t.ljust(width)) for t in texts], dtype=torch.uint8).reshape(len(texts), width)


def decode_spec(row: torch.Tensor) -> SieveSpec | None:
    text = bytes(row.tolist()).decode().strip()
    return None if text == "null" else SieveSpec.from_json(text)


def item_spec(out_mm_kwargs, modality: str, item_idx: int) -> SieveSpec | None:
    """The setting the processor attached to one item (``None``: stock tokens, or no field at all)."""
    item = out_mm_kwargs[modality][item_idx] if modality in out_mm_kwargs else None
    elem = item.get(FIELD) if item is not None else None
    return decode_spec(elem.data) if elem is not None else None


def by_method(specs: list[SieveSpec | None]) -> list[list[int]]:
    """Indices of the images whose method and parameters agree (``None``: no method), in first-seen order: one
    encoder run each, every image still selected with its own ``k``."""
    groups: dict[str | None, list[int]] = {}
    for i, spec in enumerate(specs):
        key = None if spec is None else f"{spec.method}:{json.dumps(spec.params, sort_keys=True)}"
        groups.setdefault(key, []).append(i)
    return list(groups.values())


class SettingField:
    """Processor mixin: each image's resolved setting travels as the batched ``tokensieve`` field, kept on the CPU
    (it is part of the processor's output, hence of its cache entry)."""

    def _get_mm_fields_config(self, hf_inputs, hf_processor_mm_kwargs: Mapping[str, object]):
        return {
            **super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs),
            FIELD: MultiModalFieldConfig.batched("image", keep_on_cpu=True),
        }


class WithoutTokensieve:
    """The HF processor, called without the ``tokensieve_*`` keys that vLLM merges in from the server's kwargs."""

    def __init__(self, processor) -> None:
        self.processor = processor

    def __call__(self, **kwargs):
        return self.processor(**{k: v for k, v in kwargs.items() if not k.startswith(PREFIX)})


def request_settings(info, request_kwargs: Mapping[str, object]) -> dict[str, object]:
    """Server default merged with one request's ``tokensieve_*`` kwargs; a bad key is a 400."""
    mm_config = info.ctx.model_config.get_multimodal_config()
    try:
        ours, _ = split_kwargs(request_kwargs)
        return merge(server_settings(info.get_hf_config(), mm_config.mm_processor_kwargs), ours)
    except SettingsError as exc:
        raise bad_request(exc) from None


def call_hf_processor(processor, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]):
    """``(merged settings, family, HF processor output)`` for one request of a family whose images are resolved one
    by one: the method and its parameters are checked before any image work, the HF processor never sees the
    ``tokensieve_*`` keys."""
    info = processor.info
    settings = request_settings(info, hf_kwargs)
    family = info.family()
    resolve_or_400(settings, family)
    _, rest = split_kwargs(hf_kwargs)
    return settings, family, info.ctx.call_hf_processor(WithoutTokensieve(info.get_hf_processor(**rest)), hf_data, rest)


def resolve_or_400(settings: Mapping[str, object], family: Target, tokens: int | None = None) -> SieveSpec | None:
    try:
        return resolve(settings, family, tokens)
    except SettingsError as exc:
        raise bad_request(exc) from None


def check_engine(vllm_config: VllmConfig, family: Target) -> None:
    """Start-up checks: one tensor-parallel rank, and a server default that resolves (else the server won't start)."""
    tp = vllm_config.parallel_config.tensor_parallel_size
    if tp != 1:
        raise ValueError(
            f"tokensieve-vllm runs with tensor_parallel_size=1 only (got {tp}): attention-based methods would "
            "read only the heads of one shard"
        )
    config = vllm_config.model_config.hf_config
    mm_config = vllm_config.model_config.get_multimodal_config()
    try:  # a bad server default stops the server at start-up, not at its first image
        resolve(server_settings(config, mm_config.mm_processor_kwargs), family)
    except SettingsError as exc:
        raise ValueError(f"tokensieve: bad server default: {exc}") from None


def record(path: str | None, spec: SieveSpec | None, kept: list[list[int]], encoder) -> None:
    """One trace line per image: method, k, kept indices (raster, CLS excluded) and the tokens entering each encoder
    layer (what tokensieve.tools.flops prices); ``encoder`` is one list for all images or one each."""
    if not path:
        return
    per_image = encoder if encoder and isinstance(encoder[0], list) else [encoder] * len(kept)
    with open(path, "a", encoding="utf-8") as f:
        for row, layers in zip(kept, per_image):
            f.write(
                json.dumps(
                    {
                        "method": spec.method if spec else None,
                        "k": spec.k if spec else len(row),
                        "params": spec.params if spec else {},
                        "kept": row,
                        "encoder_layer_tokens": layers,
                    }
                )
                + "\n"
            )
