"""The one record of a training run: every option, so a saved ``training.json`` says how to make its weights again.

Field order is the order of ``training.json``'s ``config`` and of ``train_default.py``'s options. A field added later
must default to the behaviour runs had before it, because resuming (:mod:`.loop`) reads a missing field as its
default.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TrainConfig:
    image_size: int = 96
    patch_size: int = 8
    vision_width: int = 96
    vision_layers: int = 8
    vision_heads: int = 4
    vision_mlp: int = 192
    text_width: int = 128
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_mlp: int = 256
    rope_theta: float = 10000.0
    """The LM's RoPE base. With 32-dim heads only a few rotary pairs turn slowly enough to match content across the
    ~150 positions between a question and the visual tokens; a larger base keeps more of them stable."""
    steps: int = 2000
    batch_size: int = 32
    lr: float = 2e-3
    min_lr: float = 1e-4
    warmup: int = 150
    weight_decay: float = 0.05
    easyvqa_share: float = 0.3
    describe_share: float = 0.25
    sincos_positions: int = 1
    turns: int = 6
    curriculum_steps: int = 0
    aux_weight: float = 0.0
    aux_balance: int = 0
    """1: each probe head's loss is the mean over patches that show something plus the mean over those that show
    nothing, so a digit on 3 of 144 patches weighs as much as the background (plain mean: ~2% of the loss)."""
    aux_pooled: int = 0
    """1: the probe also answers per object and per digit: its per-patch logits averaged over the instance's patches
    (colour, shape, digit), the way an LM reads an object by attending to all its patches. A patch inside a square
    cannot tell it from a circle; the object's patches together can."""
    aux_mask: int = 0
    """1: a probe head says which sub-cells of each patch are drawn (any object or digit, whatever its colour): the
    colour-free outline a patch shows, which is what tells a circle's edge from a square's."""
    aux_quadrant: int = 0
    """1: a fourth probe head names each patch's quadrant, so the feature layer states where it is in words the LM
    can read."""
    question_first: int = 0
    """1: the chat template puts the question before the image (:data:`tiny.QUESTION_FIRST_TEMPLATE`), so each
    visual token can compare what it shows with what is asked (causal attention reads earlier tokens only) instead of
    the answer position having to find the asked-for patches. Measured: it helps where-only pilots (about 50%
    against chance) but a whole run with it scored below final144 (training/runs/pilots-2026-12-02.md); off by
    default."""
    aux_words: float = 0.0
    """Weight of a word-alignment loss: each patch's projector output, scored against the LM's own (tied) embeddings
    of the colour, shape, row ("top" / "bottom") and column ("left" / "right") words, names what the patch shows and
    where it is, so a question's colour word and the patches of that colour start out alike in the LM's space.
    Measured: where-only pilots go from chance to about 65% with it, but it did not lift relations in a whole run
    (training/runs/pilots-2026-12-02.md)."""
    aux_attention: float = 0.0
    """Weight of :class:`AttentionGuide`'s loss (0: off): question-driven attention supervised onto what the
    question names."""
    attention_at: str = "word"
    """Where :class:`AttentionGuide` supervises: ``word``, ``answer``, ``route``, comma-separated. Measured
    (training/runs/pilots-2026-12-02.md): ``word`` alone lifts easy-VQA's yes/no but not where-questions, because
    the answer position never reads the word that found the object; ``word,route`` adds that second hop and is the
    one that moved where / relation / existence."""
    attention_layer: int = 2
    """The LM layer whose heads ``answer`` / ``route`` supervise (after layer 1, where the quadrant words look)."""
    lead_families: str = ""
    """Comma-separated shapes families (and ``where``): each shapes conversation then opens with a question drawn
    from them, its other turns following. Only the first turn has the evaluation prompt's layout (with
    ``question_first``, the only one whose visual tokens read the question), so this is where the families that
    need the question's words at the visual tokens are trained."""
    where_questions: int = 0
    """1: shapes conversations also ask "where is the <colour> shape?" for every object (training-only)."""
    extra_relations: int = 0
    extra_exists: int = 0
    """More relation / existence questions per shapes conversation (other pairs), after the one per family."""
    sheets: int = 0
    """Training sheets (many digits and shapes, :func:`shapes.sheet`) per step, seen by the vision tower and the probe
    only: ten times the digits per image that a scene has, for a few percent of a step's compute."""
    vision_steps: int = 0
    """Steps before the main schedule that train the vision tower and the probe alone, on ``batch_size`` sheets each
    (about a fifth of a full step's compute): the tower learns to see digits and shapes before the LM reads it."""
    max_positions: int = 512
    init_from: str = ""
    """A saved model to start from instead of random weights: tensors of equal shape are copied; CLIP's position
    table and patch kernel are resized when the image or patch size differ (see :func:`warm_start`)."""
    distill_from: str = ""
    """A trained model whose feature layer the vision tower learns to reproduce (its grid resized to this one's,
    [CLS] to [CLS]), on every image the tower sees; with ``init_from`` the same model, its projector and LM then
    read the new tower from the first step. Needs the probe (``aux_weight`` > 0), whose hook reads the states."""
    distill_weight: float = 1.0
    seed: int = 0
    threads: int = 2
    log_every: int = 25
    notes: dict = field(default_factory=dict)
