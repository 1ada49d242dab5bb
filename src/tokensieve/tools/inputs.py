"""What a command reads from its user, checked before any model work: images, prompts and output paths.

Every command goes through these functions, so the same bad file gets the same one-line :class:`InputError` from
``run``, ``show`` and ``bench``, naming the option, the problem and the fix.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

from ..errors import InputError

IMAGE_SUFFIXES = ".png, .jpg, .webp, .bmp, ..."
PLOT_SUFFIXES = (".png", ".jpg", ".jpeg", ".pdf", ".svg")


def load_image(path: str | os.PathLike, option: str = "--image"):
    """The image at ``path`` as RGB, fully decoded now (a truncated file fails here, not inside the processor)."""
    from PIL import Image, UnidentifiedImageError

    p = Path(path)
    where = f"{option} {str(path)!r}"
    if not p.exists():
        raise InputError(f"{where}: no such file; check the path (relative paths start at {os.getcwd()})")
    if p.is_dir():
        raise InputError(f"{where} is a folder; give one image file ({IMAGE_SUFFIXES})")
    try:
        if p.stat().st_size == 0:
            raise InputError(f"{where} is an empty (0-byte) file; give an image file ({IMAGE_SUFFIXES})")
        with Image.open(p) as im:
            im.load()
            return im.convert("RGB")
    except InputError:
        raise
    except PermissionError:
        raise InputError(f"{where} cannot be read (permission denied); fix its permissions or copy it") from None
    except UnidentifiedImageError:
        raise InputError(f"{where} is not an image file Pillow can read; give a {IMAGE_SUFFIXES} file") from None
    except Image.DecompressionBombError as exc:
        raise InputError(f"{where} is too large to decode safely ({exc}); resize it first") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError(
            f"{where} is damaged or truncated ({' '.join(str(exc).split())}); re-save or re-download it"
        ) from None


def prepare_out_dir(path: str | os.PathLike, option: str = "--out") -> Path:
    """Create the output folder now and check it is writable, so no finished work is lost to a bad path later."""
    p = Path(path)
    where = f"{option} {str(path)!r}"
    for part in (p, *p.parents):
        if part.exists() and not part.is_dir():
            what = "is a file" if part == p else f"goes through {str(part)!r}, which is a file"
            raise InputError(f"{where} {what}, not a folder; choose a folder path for {option}")
    try:
        p.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=p):
            pass
    except OSError as exc:
        raise InputError(f"{where} cannot be written ({exc.strerror or exc}); choose another {option}") from None
    return p


def check_out_file(path: str | os.PathLike, option: str = "--out", suffixes=PLOT_SUFFIXES) -> Path:
    """A file to write later: its folder is created and checked now, and the suffix must name a known format."""
    p = Path(path)
    where = f"{option} {str(path)!r}"
    if p.is_dir():
        raise InputError(f"{where} is a folder; give a file name such as {p / ('show' + suffixes[0])}")
    if p.suffix.lower() not in suffixes:
        raise InputError(f"{where}: give a file name ending in {', '.join(suffixes)} (e.g. show.png)")
    for part in p.parents:
        if part.exists() and not part.is_dir():
            raise InputError(f"{where} goes through {str(part)!r}, which is a file, not a folder; choose another path")
    prepare_out_dir(p.parent, option)
    if p.exists() and not os.access(p, os.W_OK):
        raise InputError(f"{where} exists and cannot be overwritten; choose another {option}")
    return p


def check_question(text: str | None, option: str = "--prompt") -> str | None:
    """``None`` (use the command's default question) or a non-empty question."""
    if text is None:
        return None
    if not text.strip():
        raise InputError(f"{option} is empty; give a question, or leave {option} out to use the default question")
    return text


def build_prompt(processor, question: str, option: str = "--prompt") -> tuple[str, list[str]]:
    """The text for one image and ``question``, and notes for the user.

    The question goes through the model's chat template, which inserts the image placeholder. A question that
    already holds the model's image token once is taken as a complete prompt and sent as written (the user placed
    the image); more than one is refused, since the command passes one image.
    """
    from ..data.prompts import prompt_text

    token = getattr(processor, "image_token", None) or "<image>"
    count = question.count(token)
    notes = []
    if count > 1:
        raise InputError(
            f"{option} holds {count} image placeholders {token!r} but the command passes one image; "
            f"remove them (the placeholder is inserted for you) or keep exactly one"
        )
    if count == 1:
        text = question
        notes.append(f"{option} contains {token!r}: sent as written, without the chat template")
    else:
        if token != "<image>" and "<image>" in question:
            raise InputError(
                f"{option} contains '<image>', which is not this model's image token ({token!r}); "
                "leave it out, the placeholder is inserted for you"
            )
        text = prompt_text(processor, question)
    unknown = unknown_words(processor, question.replace(token, " "))
    if unknown:
        notes.append(f"not in the model's vocabulary, read as <unk>: {', '.join(repr(w) for w in unknown)}")
    return text, notes


def unknown_words(processor, text: str) -> list[str]:
    """Words of ``text`` that the tokenizer maps to its unknown token (word-level vocabularies such as the default
    model's); empty for byte-level tokenizers, which have none."""
    tok = getattr(processor, "tokenizer", processor)
    unk = getattr(tok, "unk_token_id", None)
    if unk is None:
        return []
    out = []
    for word in dict.fromkeys(re.findall(r"\S+", text)):
        ids = tok(word, add_special_tokens=False)["input_ids"]
        if unk in ids:
            out.append(word)
    return out
