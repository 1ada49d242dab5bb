"""A seeded VQA generator built so that dropping the wrong visual tokens costs answers.

Every scene is mostly a grey, textured background (noise plus stripes: many near-duplicate patches that a good
method may drop) with one to four saturated shapes, one per quadrant, each in its own colour. When there are two or
more shapes, one of them is tiny (7-9 px, inside one or two 8-px patches) and every scene carries a small drawn
digit, so counting, "smallest", relations and reading all hinge on a handful of tokens.

Drawing uses no anti-aliasing and the background is pure grey, so every object colour is exact in the pixels:
the test suite re-derives every answer from the image alone.

Splits are disjoint seed ranges; scene ``i`` of a split is always the same scene (and the same question).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 96
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (30, 160, 60),
    "blue": (40, 80, 225),
    "yellow": (235, 205, 20),
    "purple": (150, 50, 190),
}
SHAPES = ("circle", "square", "triangle")
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
INK = {"black": (0, 0, 0), "white": (255, 255, 255)}
FAMILIES = ("count", "exist", "position", "relation", "smallest", "digit")
NEEDS_TWO = ("relation", "smallest")
DESCRIBE = "describe the image ."  # a training-only task: the whole scene as text, for dense supervision
SPLIT_SEEDS = {"train": 0, "val": 1, "test": 2}
TEST_SIZE = 2004  # 334 questions per family

# Seven segments (a..g) on a 6 x 11 cell with 2-px strokes: (x0, y0, x1, y1) inclusive, relative to the digit box.
DIGIT_W, DIGIT_H = 6, 11
SEGMENTS = {
    "a": (0, 0, 5, 1),
    "b": (4, 0, 5, 5),
    "c": (4, 5, 5, 10),
    "d": (0, 9, 5, 10),
    "e": (0, 5, 1, 10),
    "f": (0, 0, 1, 5),
    "g": (0, 5, 5, 5),
}
DIGIT_SEGMENTS = {
    0: "abcdef",
    1: "bc",
    2: "abged",
    3: "abgcd",
    4: "fgbc",
    5: "afgcd",
    6: "afgedc",
    7: "abc",
    8: "abcdefg",
    9: "abcdfg",
}

TINY = (7, 9)
LARGE = (13, 26)
SHAPE_MIN = 13  # shapes are only asked about for objects at least this large


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 inclusive

    @property
    def size(self) -> int:
        return self.box[2] - self.box[0] + 1

    @property
    def centre(self) -> tuple[float, float]:
        return (self.box[0] + self.box[2]) / 2, (self.box[1] + self.box[3]) / 2


@dataclass
class Scene:
    objects: list[Obj]
    digit: int
    digit_ink: str
    digit_pos: tuple[int, int]
    texture_seed: int
    stripe: tuple[int, int, int]  # period, angle code, phase
    image: Image.Image = field(repr=False, default=None)


@dataclass(frozen=True)
class Sample:
    image: Image.Image
    question: str
    answer: str
    family: str
    index: int


def _rng(split: str, index: int) -> np.random.Generator:
    if split not in SPLIT_SEEDS:
        raise ValueError(f"unknown split {split!r}; use one of {sorted(SPLIT_SEEDS)}")
    return np.random.default_rng([SPLIT_SEEDS[split], index, 7919])


def _overlaps(a, b, gap=2) -> bool:
    return not (a[2] + gap < b[0] or b[2] + gap < a[0] or a[3] + gap < b[1] or b[3] + gap < a[1])


def make_scene(rng: np.random.Generator) -> Scene:
    n = int(rng.integers(1, 5))
    quads = rng.permutation(4)[:n]
    colours = rng.permutation(list(COLOURS))[:n]
    tiny_at = int(rng.integers(n)) if n >= 2 else -1
    half = IMAGE_SIZE // 2
    objects = []
    for k, (q, colour) in enumerate(zip(quads, colours)):
        lo, hi = TINY if k == tiny_at else LARGE
        if n == 1:
            lo, hi = TINY[0], LARGE[1]
        size = int(rng.integers(lo, hi + 1))
        qx, qy = (q % 2) * half, (q // 2) * half
        x0 = qx + int(rng.integers(2, half - size - 1))
        y0 = qy + int(rng.integers(2, half - size - 1))
        objects.append(Obj(str(rng.choice(SHAPES)), str(colour), (x0, y0, x0 + size - 1, y0 + size - 1)))
    for _ in range(1000):
        dx = int(rng.integers(1, IMAGE_SIZE - DIGIT_W - 1))
        dy = int(rng.integers(1, IMAGE_SIZE - DIGIT_H - 1))
        box = (dx, dy, dx + DIGIT_W - 1, dy + DIGIT_H - 1)
        if not any(_overlaps(box, o.box) for o in objects):
            break
    else:  # pragma: no cover - a 96 px canvas with four shapes always has room
        raise RuntimeError("no room for the digit")
    scene = Scene(
        objects=objects,
        digit=int(rng.integers(10)),
        digit_ink=str(rng.choice(list(INK))),
        digit_pos=(dx, dy),
        texture_seed=int(rng.integers(2**31)),
        stripe=(int(rng.integers(6, 14)), int(rng.integers(4)), int(rng.integers(20))),
    )
    scene.image = render(scene)
    return scene


def _background(scene: Scene) -> np.ndarray:
    g = np.random.default_rng(scene.texture_seed)
    base = int(g.integers(100, 160))
    noise = g.integers(-18, 19, size=(IMAGE_SIZE // 2, IMAGE_SIZE // 2)).repeat(2, 0).repeat(2, 1)
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    period, angle, phase = scene.stripe
    coord = (xx, yy, xx + yy, xx - yy + IMAGE_SIZE)[angle]
    stripes = np.where(((coord + phase) // (period // 2)) % 2 == 0, 14, -14)
    grey = np.clip(base + noise + stripes, 70, 190).astype(np.uint8)
    return np.repeat(grey[:, :, None], 3, axis=2)


def _paint_objects(draw: ImageDraw.ImageDraw, objects, object_fill) -> None:
    for k, o in enumerate(objects):
        fill = object_fill(k, o)
        x0, y0, x1, y1 = o.box
        if o.shape == "square":
            draw.rectangle(o.box, fill=fill)
        elif o.shape == "circle":
            draw.ellipse(o.box, fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=fill)


def _paint_digit(draw: ImageDraw.ImageDraw, digit: int, pos: tuple[int, int], fill) -> None:
    dx, dy = pos
    for seg in DIGIT_SEGMENTS[digit]:
        sx0, sy0, sx1, sy1 = SEGMENTS[seg]
        draw.rectangle((dx + sx0, dy + sy0, dx + sx1, dy + sy1), fill=fill)


def _paint(draw: ImageDraw.ImageDraw, scene: Scene, object_fill, digit_fill) -> None:
    _paint_objects(draw, scene.objects, object_fill)
    _paint_digit(draw, scene.digit, scene.digit_pos, digit_fill)


def render(scene: Scene) -> Image.Image:
    img = Image.fromarray(_background(scene), "RGB")
    _paint(ImageDraw.Draw(img), scene, lambda k, o: COLOURS[o.colour], INK[scene.digit_ink])
    return img


DIGIT_LABEL = 255


def label_map(scene: Scene) -> np.ndarray:
    """Which thing each pixel shows: 0 background, ``k + 1`` object ``k``, :data:`DIGIT_LABEL` the digit.

    Drawn with the same calls as :func:`render`, so it matches the image pixel for pixel; training uses it for
    per-patch targets on the vision tower (a dense signal a from-scratch tower learns from much faster than from
    answers alone).
    """
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    _paint(ImageDraw.Draw(img), scene, lambda k, o: k + 1, DIGIT_LABEL)
    return np.asarray(img)


def quadrant(obj: Obj) -> str:
    cx, cy = obj.centre
    half = IMAGE_SIZE / 2
    return QUADRANTS[(cx >= half) + 2 * (cy >= half)]


def _yes_no(flag: bool) -> str:
    return "yes" if flag else "no"


def describe_scene(scene: Scene) -> str:
    """Every fact the question families ask about, in a fixed order (quadrants in reading order, then the digit).

    Training on this answer supervises ten or more tokens per image instead of one, which is what gets a
    from-scratch vision tower past the stage where the language model answers from priors alone.
    """
    parts = []
    for o in sorted(scene.objects, key=lambda o: QUADRANTS.index(quadrant(o))):
        size = "small" if o.size < SHAPE_MIN else "large"
        parts.append(f"{quadrant(o)} {size} {o.colour} {o.shape}")
    parts.append(f"{len(scene.objects)} shapes digit {scene.digit}")
    return " , ".join(parts)


def ask(scene: Scene, family: str, rng: np.random.Generator) -> tuple[str, str]:
    """One question of ``family`` about ``scene`` and its answer (yes/no families are balanced by coin flip)."""
    objs = scene.objects
    if family == "describe":
        return DESCRIBE, describe_scene(scene)
    if family == "count":
        return "how many shapes are there?", str(len(objs))
    if family == "digit":
        return "what digit is written?", str(scene.digit)
    if family in NEEDS_TWO and len(objs) < 2:
        raise ValueError(f"family {family!r} needs a scene with at least two shapes")
    if family == "smallest":
        return "what color is the smallest shape?", min(objs, key=lambda o: o.size).colour
    if family == "position":
        o = objs[int(rng.integers(len(objs)))]
        if o.size >= SHAPE_MIN and rng.random() < 0.5:
            return f"what shape is in the {quadrant(o)}?", o.shape
        return f"what color is the shape in the {quadrant(o)}?", o.colour
    if family == "exist":
        present = {(o.colour, o.shape) for o in objs}
        if rng.random() < 0.5:
            big = [o for o in objs if o.size >= SHAPE_MIN] or objs
            o = big[int(rng.integers(len(big)))]
            return f"is there a {o.colour} {o.shape}?", "yes"
        # adversarial negatives: a colour and a shape that are both in the scene, never together
        colours = {o.colour for o in objs}
        shapes = {o.shape for o in objs}
        pool = [(c, s) for c in sorted(colours) for s in sorted(shapes) if (c, s) not in present]
        if not pool or rng.random() < 0.3:
            pool = [(c, s) for c in COLOURS for s in SHAPES if (c, s) not in present]
        c, s = pool[int(rng.integers(len(pool)))]
        return f"is there a {c} {s}?", "no"
    if family == "relation":
        i, j = rng.permutation(len(objs))[:2]
        a, b = objs[i], objs[j]
        (ax, ay), (bx, by) = a.centre, b.centre
        options = []
        if quadrant(a)[-5:] != quadrant(b)[-5:]:  # different columns
            options += [("left of", ax < bx), ("right of", ax > bx)]
        if quadrant(a)[:3] != quadrant(b)[:3]:  # different rows
            options += [("above", ay < by), ("below", ay > by)]
        rel, truth = options[int(rng.integers(len(options)))]
        return f"is the {a.colour} shape {rel} the {b.colour} shape?", _yes_no(truth)
    raise ValueError(f"unknown family {family!r}; use one of {FAMILIES}")


def sample(split: str, index: int, family: str | None = None) -> Sample:
    """Scene ``index`` of ``split`` with one question; the family cycles with the index unless given."""
    rng = _rng(split, index)
    fam = family or FAMILIES[index % len(FAMILIES)]
    scene = make_scene(rng)
    while fam in NEEDS_TWO and len(scene.objects) < 2:
        scene = make_scene(rng)
    question, answer = ask(scene, fam, rng)
    return Sample(scene.image, question, answer, fam, index)


def conversation(split: str, index: int, describe: bool = False, with_scene: bool = False):
    """One scene with a question from every family it allows, in shuffled order (training only).

    Several answers per image make each pass through the vision tower teach more; ``describe`` appends the
    whole-scene description as the last turn, after the questions, so no question can be read off it.
    Returns ``(image, turns)``, or ``(image, turns, scene)`` with ``with_scene``.
    """
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 104729])
    scene = make_scene(rng)
    fams = [f for f in FAMILIES if len(scene.objects) >= 2 or f not in NEEDS_TWO]
    turns = [ask(scene, fams[k], rng) for k in rng.permutation(len(fams))]
    if describe:
        turns.append((DESCRIBE, describe_scene(scene)))
    return (scene.image, turns, scene) if with_scene else (scene.image, turns)


@dataclass
class Sheet:
    """A training-only picture for the vision tower: many digits and shapes anywhere on the scenes' background.

    One scene shows one digit, so a tower learns to read digits from few examples per image; a sheet shows many
    (and shapes of every size), each labelled per pixel by :func:`sheet_labels`. Sheets are never asked about.
    """

    objects: list[Obj]
    digits: list[tuple[int, str, tuple[int, int]]]  # (digit, ink, top-left corner)
    texture_seed: int
    stripe: tuple[int, int, int]
    image: Image.Image = field(repr=False, default=None)


SHEET_DIGIT = 100  # label of digit j in sheet_labels: SHEET_DIGIT + j


def sheet(split: str, index: int) -> Sheet:
    """Sheet ``index`` of ``split`` (seeded): 3-8 shapes (tiny or large, colours may repeat) and 3-8 digits."""
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 32452843])
    boxes, objects, digits = [], [], []

    def place(w: int, h: int) -> tuple[int, int] | None:
        for _ in range(200):
            x, y = int(rng.integers(1, IMAGE_SIZE - w)), int(rng.integers(1, IMAGE_SIZE - h))
            box = (x, y, x + w - 1, y + h - 1)
            if not any(_overlaps(box, b) for b in boxes):
                boxes.append(box)
                return x, y
        return None

    for _ in range(int(rng.integers(3, 9))):
        lo, hi = TINY if rng.random() < 0.3 else LARGE
        size = int(rng.integers(lo, hi + 1))
        shape, colour = str(rng.choice(SHAPES)), str(rng.choice(list(COLOURS)))
        if (at := place(size, size)) is not None:
            objects.append(Obj(shape, colour, (at[0], at[1], at[0] + size - 1, at[1] + size - 1)))
    for _ in range(int(rng.integers(3, 9))):
        digit, ink = int(rng.integers(10)), str(rng.choice(list(INK)))
        if (at := place(DIGIT_W, DIGIT_H)) is not None:
            digits.append((digit, ink, at))
    out = Sheet(
        objects,
        digits,
        int(rng.integers(2**31)),
        (int(rng.integers(6, 14)), int(rng.integers(4)), int(rng.integers(20))),
    )
    img = Image.fromarray(_background(out), "RGB")
    draw = ImageDraw.Draw(img)
    _paint_objects(draw, objects, lambda k, o: COLOURS[o.colour])
    for digit, ink, at in digits:
        _paint_digit(draw, digit, at, INK[ink])
    out.image = img
    return out


def sheet_labels(s: Sheet) -> np.ndarray:
    """Which thing each pixel of a sheet shows: 0 background, ``k + 1`` object ``k``, ``SHEET_DIGIT + j`` digit
    ``j``."""
    img = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    draw = ImageDraw.Draw(img)
    _paint_objects(draw, s.objects, lambda k, o: k + 1)
    for j, (digit, _, at) in enumerate(s.digits):
        _paint_digit(draw, digit, at, SHEET_DIGIT + j)
    return np.asarray(img)


TRAINING_WORDS = ("where",)
"""Words that only training-side questions use (:func:`drill`); the test set never asks them."""


def where_turn(obj: Obj) -> tuple[str, str]:
    """The training-only turn "where is the <colour> shape?" about ``obj`` and its answer (its quadrant)."""
    return f"where is the {obj.colour} shape?", quadrant(obj)


def drill(
    split: str, index: int, scene: Scene, where: bool = False, relations: int = 0, exists: int = 0
) -> list[tuple[str, str]]:
    """Extra training-only turns about a :func:`conversation` scene, from their own seeded stream.

    ``where`` asks "where is the <colour> shape?" (answer: its quadrant) for every object: the colour-to-position
    look-up that relation questions hinge on (with two objects in different columns, "is A left of B?" is "is A in
    the left column?"), supervised on its own. ``relations`` / ``exists`` add that many more questions of those
    yes/no families (other pairs, other colour-shape pairs). The stream is separate from the conversation's, so the
    conversation itself, and the test set, are the same with or without drill turns.
    """
    rng = np.random.default_rng([SPLIT_SEEDS[split], index, 15485863])
    turns = []
    if where:
        turns += [where_turn(o) for o in scene.objects]
    if len(scene.objects) >= 2:
        turns += [ask(scene, "relation", rng) for _ in range(relations)]
    turns += [ask(scene, "exist", rng) for _ in range(exists)]
    return [turns[k] for k in rng.permutation(len(turns))]


def dataset(split: str = "test", limit: int | None = None, start: int = 0) -> list[Sample]:
    """The fixed questions of a split: ``test`` has :data:`TEST_SIZE` (balanced families)."""
    n = TEST_SIZE if limit is None else min(limit, TEST_SIZE)
    return [sample(split, start + i) for i in range(n)]


WORDS = sorted(
    set(
        " ".join(
            FAMILY_Q
            for FAMILY_Q in (
                "how many shapes are there ? what digit is written color is the smallest shape in top left right "
                "bottom",
                "is there a of above below yes no",
                "describe image . , small large",
            )
        ).split()
    )
    | set(COLOURS)
    | set(SHAPES)
    | {str(d) for d in range(10)}
)
