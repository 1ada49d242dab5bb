"""easy-VQA (Victor Zhou, MIT; PyPI ``easy-vqa``): a third-party VQA set, read from the installed package.

The wheel ships all 5,000 PNGs (64 x 64, one shape each) and the question files, so nothing is downloaded here.
Families group questions by what they ask: ``yes/no``, ``color``, ``shape``.
"""

from __future__ import annotations

from functools import lru_cache

from PIL import Image

from .shapes import Sample

SPLITS = ("train", "test")
COLOURS = {"red", "green", "blue", "black", "gray", "teal", "brown", "yellow"}


def _module():
    try:
        import easy_vqa
    except ImportError as exc:  # pragma: no cover - it is a declared dependency
        raise ImportError("easy-VQA needs the `easy-vqa` package: pip install easy-vqa") from exc
    return easy_vqa


def family(answer: str) -> str:
    if answer in ("yes", "no"):
        return "yes/no"
    return "color" if answer in COLOURS else "shape"


@lru_cache(maxsize=2)
def questions(split: str) -> tuple[tuple[str, str, int], ...]:
    """(question, answer, image id) in the package's own order."""
    if split not in SPLITS:
        raise ValueError(f"unknown easy-VQA split {split!r}; use one of {SPLITS}")
    ev = _module()
    texts, answers, ids = ev.get_train_questions() if split == "train" else ev.get_test_questions()
    return tuple(zip(texts, answers, ids))


@lru_cache(maxsize=2)
def image_paths(split: str) -> dict[int, str]:
    ev = _module()
    return ev.get_train_image_paths() if split == "train" else ev.get_test_image_paths()


def load_image(split: str, image_id: int) -> Image.Image:
    with Image.open(image_paths(split)[image_id]) as im:
        return im.convert("RGB")


def dataset(split: str = "test", limit: int | None = None) -> list[Sample]:
    """The split's questions in order (the official test split has 9,673); ``limit`` takes an evenly spaced subset."""
    qs = questions(split)
    if limit is not None and limit < len(qs):  # evenly spaced, so a subset spans images and families like the whole
        qs = [qs[i * len(qs) // limit] for i in range(limit)]
    cache: dict[int, Image.Image] = {}
    out = []
    for i, (q, a, image_id) in enumerate(qs):
        if image_id not in cache:
            cache[image_id] = load_image(split, image_id)
        out.append(Sample(cache[image_id], q, a, family(a), i))
    return out


@lru_cache(maxsize=2)
def attributes(split: str = "train") -> dict[int, tuple[str | None, str | None]]:
    """Each image's ``(colour, shape)`` as far as its own questions name them (``None`` where none does)."""
    out: dict[int, list] = {}
    for _, a, image_id in questions(split):
        f = family(a)
        if f in ("color", "shape"):
            out.setdefault(image_id, [None, None])[f == "shape"] = a
    return {i: (c, s) for i, (c, s) in out.items()}


@lru_cache(maxsize=2)
def descriptions(split: str = "train") -> dict[int, str]:
    """``"<colour> <shape>"`` for each image whose own questions name both (a training-only dense target)."""
    return {i: f"{c} {s}" for i, (c, s) in sorted(attributes(split).items()) if c is not None and s is not None}


@lru_cache(maxsize=2)
def by_image(split: str = "train") -> dict[int, tuple[tuple[str, str], ...]]:
    """Each image's (question, answer) pairs, in the package's order."""
    out: dict[int, list[tuple[str, str]]] = {}
    for q, a, image_id in questions(split):
        out.setdefault(image_id, []).append((q, a))
    return {i: tuple(v) for i, v in out.items()}


def words() -> set[str]:
    import re

    out = set()
    for split in SPLITS:
        for q, a, _ in questions(split):
            out.update(re.findall(r"\w+|[^\w\s]", q.lower()))
            out.add(a)
    return out
