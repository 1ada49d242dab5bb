"""Training the embedded default model: a small LLaVA-1.5-layout VLM learned from scratch on CPU.

Stock classes only (``LlavaForConditionalGeneration``, CLIP vision tower with its CLS token, Llama LM,
``vision_feature_layer=-2``), so what the methods see is what they would see in LLaVA-1.5, just smaller. Each
sample is one question with a one-word answer; the loss covers the answer token and end-of-sequence only, so
answers come from ``generate()``. Training mixes fresh procedural scenes (never repeated) with the easy-VQA
train split. Everything is seeded: the same config gives the same weights on the same torch build.

``training/train_default.py`` is the command. The modules, each with one job:

- :mod:`.config`: :class:`TrainConfig`, every option of a run.
- :mod:`.model`: the architecture, its vocabulary and position init, and warm starts from a saved model.
- :mod:`.batches`: seeded conversation batches (:class:`Mixture`) and their tokenization (:func:`make_batch`).
- :mod:`.targets`: per-patch targets read off the pixels, for the training-only losses.
- :mod:`.supervision`: those losses (:class:`PatchProbe`, :class:`AttentionGuide`, :class:`Teacher`).
- :mod:`.loop`: the schedule, resumable state, :func:`train` and :func:`save`.
- :mod:`.card`: the model card (imported on its own: it needs ``tools.evaluate``, which this package does not).

The names below are those the module ``tokensieve.train`` offered before the layout moved it here; that old path
still gives this package (``tokensieve._compat``).
"""

from ..data.prompts import prompt_text
from .batches import Mixture, make_batch
from .config import TrainConfig
from .loop import STATE_FILE, lr_at, save, train
from .model import CHAT_WORDS, build_model, vocabulary, warm_start
from .supervision import AttentionGuide, PatchProbe, Teacher, aux_heads
from .targets import (
    AUX_COLOURS,
    AUX_HEADS,
    AUX_SHAPES,
    IGNORE,
    POOLED,
    TARGET_ROWS,
    WORD_TARGETS,
    _per_patch,
    easyvqa_targets,
    mask_side,
    quadrant_targets,
    scene_targets,
    sheet_targets,
)

__all__ = [
    "AUX_COLOURS",
    "AUX_HEADS",
    "AUX_SHAPES",
    "CHAT_WORDS",
    "IGNORE",
    "POOLED",
    "STATE_FILE",
    "TARGET_ROWS",
    "WORD_TARGETS",
    "AttentionGuide",
    "Mixture",
    "PatchProbe",
    "Teacher",
    "TrainConfig",
    "_per_patch",  # private, but tests check targets against it
    "aux_heads",
    "build_model",
    "easyvqa_targets",
    "lr_at",
    "make_batch",
    "mask_side",
    "prompt_text",
    "quadrant_targets",
    "save",
    "scene_targets",
    "sheet_targets",
    "train",
    "vocabulary",
    "warm_start",
]
