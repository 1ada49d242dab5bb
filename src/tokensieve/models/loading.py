"""Models by name or folder: the embedded models, local Hugging Face folders, and the checks before loading.

``--model`` on every command goes through :func:`load_model`: an embedded name (:data:`EMBEDDED_MODELS`, plus
``tiny``, built in memory) or a local folder written by ``save_pretrained``. The folder is checked before any
weights load (config present, an image-text-to-text model, a class tokensieve supports), so a wrong path or a
text-only model is one line, not a transformers traceback. New embedded models are one entry in the table.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError

PACKAGE_DIR = Path(__file__).parent


@dataclass(frozen=True)
class EmbeddedModel:
    name: str
    path: Path | None
    """Folder inside the package; ``None`` for models built in memory."""
    note: str
    """Printed when a command uses it, so nobody mistakes what answers."""
    benchmark: bool = True
    """Trained on tokensieve's benchmarks: ``run`` asks it a benchmark question and shows the expected answer."""


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "default": EmbeddedModel(
        "default",
        PACKAGE_DIR / "default_model",
        "Using the embedded default model: a small LLaVA trained from scratch on tokensieve's shapes benchmark and "
        "easy-VQA. It answers one-word questions about simple synthetic scenes, nothing else.",
    ),
    "default-576": EmbeddedModel(
        "default-576",
        PACKAGE_DIR / "default_model_576",
        "Using the embedded default-576 model: a small LLaVA at 336 px with 14-px patches (576 visual tokens, the "
        "LLaVA-1.5 grid), trained from scratch on tokensieve's shapes benchmark and easy-VQA. It answers one-word "
        "questions about simple synthetic scenes, nothing else.",
    ),
    "tiny": EmbeddedModel(
        "tiny",
        None,
        "NOTE: a TINY RANDOM-WEIGHT LLaVA built from a config. Its answers are meaningless; the run shows the "
        "plumbing, token counts and timings only.",
        benchmark=False,
    ),
}
DEFAULT_MODEL = "default"
MODEL_HELP = f"model folder (save_pretrained output, loaded offline) or an embedded name: {', '.join(EMBEDDED_MODELS)}"


def model_path(spec: str | Path | None) -> Path | None:
    """The folder of ``spec`` (``None`` for a model built in memory); names win over same-named relative folders
    (write ``./default`` for a folder called ``default``)."""
    spec = DEFAULT_MODEL if spec is None else spec
    if not str(spec).strip():
        raise InputError(f"--model is empty; give a {MODEL_HELP}")
    entry = EMBEDDED_MODELS.get(str(spec))
    return entry.path if entry is not None else Path(spec)


def model_label(spec: str | Path | None) -> str:
    """How results name the model: the embedded name, or the folder's name."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    return spec if spec in EMBEDDED_MODELS else Path(spec).name


def supported_classes() -> list[str]:
    from ..adapters import ADAPTERS

    return [c for a in ADAPTERS for c in a.model_classes]


def _first_line(exc: BaseException) -> str:
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    return lines[0] if lines else type(exc).__name__


def check_model_dir(path: str | Path, option: str = "--model"):
    """The folder's config, after checking that it holds a vision-language model tokensieve supports."""
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES

    p = Path(path)
    where = f"{option} {str(path)!r}"
    names = ", ".join(EMBEDDED_MODELS)
    if not p.exists():
        raise InputError(
            f"{where}: no such folder; give a local model folder (for a hub model, download it first: "
            f"huggingface-cli download ID --local-dir DIR) or an embedded name ({names})"
        )
    if not p.is_dir():
        raise InputError(f"{where} is a file; give the model's folder, the one holding config.json")
    if not (p / "config.json").is_file():
        raise InputError(
            f"{where} has no config.json; give a folder written by save_pretrained (model and "
            f"processor) or an embedded name ({names})"
        )
    try:
        config = AutoConfig.from_pretrained(p, local_files_only=True)
    except Exception as exc:  # transformers raises ValueError, KeyError, OSError, JSONDecodeError here
        raise InputError(f"{where}: its config.json cannot be read ({_first_line(exc)})") from None
    model_type = getattr(config, "model_type", None)
    cls = MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES.get(model_type)
    supported = supported_classes()
    if cls is None:
        archs = ", ".join(getattr(config, "architectures", None) or [])
        raise InputError(
            f"{where} holds a {model_type!r} model{f' ({archs})' if archs else ''}, not a "
            f"vision-language model; tokensieve supports {', '.join(supported)}"
        )
    if cls not in supported:
        raise InputError(
            f"{where} holds a {cls}, which tokensieve does not support yet; it supports {', '.join(supported)}"
        )
    return config


def load_model(
    spec: str | Path | None = None, *, dtype=None, device=None, option: str = "--model", with_processor: bool = True
):
    """``(model, processor)`` for an embedded name or a local folder; eval mode, fp32 unless ``dtype``, offline.

    ``with_processor=False`` returns ``(model, None)`` without touching the processor: ``bench`` times synthetic
    inputs on models whose processor cannot be built here (video processors need torchvision)."""
    import torch

    spec = DEFAULT_MODEL if spec is None else spec
    if str(spec) == "tiny":
        from .tiny import build_tiny_llava

        model, processor = build_tiny_llava()
        if dtype is not None:
            model = model.to(dtype)
    else:
        from transformers import AutoModelForImageTextToText

        path = model_path(spec)
        check_model_dir(path, option)
        where = f"{option} {str(spec)!r}"
        processor = load_processor(path, where) if with_processor else None
        try:
            model = AutoModelForImageTextToText.from_pretrained(
                path, dtype=dtype or torch.float32, local_files_only=True
            )
        except (OSError, ValueError) as exc:
            raise InputError(f"{where}: the weights cannot be loaded ({_first_line(exc)})") from None
    if device is not None:
        model = model.to(device)
    return model.eval(), processor


def load_processor(path: str | Path, where: str = "--model"):
    """The processor saved in a checked model folder (:func:`check_model_dir`), offline."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # missing files surface as OSError, ValueError or TypeError depending on the class
        raise InputError(
            f"{where}: its processor cannot be loaded ({_first_line(exc)}); save the processor into the "
            "same folder (processor.save_pretrained)"
        ) from None


def load_default_model():
    """``(model, processor)`` of the embedded default model: a stock ``LlavaForConditionalGeneration``, fp32.

    Its prompt is ``processor.apply_chat_template`` on one user turn holding an image and a question, which gives
    ``"user : <image> QUESTION assistant : "``; it answers in one lower-case word.
    """
    return load_model(DEFAULT_MODEL)


def model_fingerprint(spec: str | Path | None) -> dict:
    """What identifies the weights, cheaply (config hash; size and first/last MiB hash of each weight file), so
    saved evaluation results are only reused for the same model."""
    spec = DEFAULT_MODEL if spec is None else str(spec)
    path = model_path(spec)
    out: dict = {"model": model_label(spec), "spec": spec}
    if path is None:
        from .._version import __version__

        out["built_in_memory"] = f"tokensieve {__version__}"
        return out
    if spec not in EMBEDDED_MODELS:  # an embedded model's folder says nothing beyond its name
        out["path"] = str(path.resolve())
    out["config_sha256"] = hashlib.sha256((path / "config.json").read_bytes()).hexdigest()
    files = {}
    for f in sorted(path.iterdir()):
        if f.suffix in (".safetensors", ".bin") and f.is_file():
            h = hashlib.sha256()
            size = f.stat().st_size
            with open(f, "rb") as fh:
                h.update(fh.read(1 << 20))
                if size > 2 << 20:
                    fh.seek(-(1 << 20), 2)
                    h.update(fh.read())
            files[f.name] = {"bytes": size, "sha256_ends": h.hexdigest()}
    out["weights"] = files
    return out
