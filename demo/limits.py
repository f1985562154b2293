"""Input limits of the demo, and the checks that enforce them.

Every request is bounded before any model work starts, so a bad or hostile input gets a
one-line message instead of a stack trace or a worker stuck for minutes:

==========================  ==================================================================
image file                  at most :data:`MAX_IMAGE_BYTES` (20 MB); the upload itself is
                            refused above that size by the server (``launch(max_file_size=)``)
image pixels                each side at most :data:`MAX_IMAGE_SIDE` (4096) and at least
                            :data:`MIN_IMAGE_SIDE` (8), checked from the file header, before
                            the pixels are decoded (no decompression bombs)
image contents              must decode completely with Pillow (truncated / corrupt files and
                            non-images are refused); the first frame of an animation is used
texts                       1 to :data:`MAX_TEXTS` (16) non-empty lines, each at most
                            :data:`MAX_TEXT_CHARS` (200) characters
neighbours (retrieval)      1 to :data:`MAX_NEIGHBOURS` (32), at most the gallery size
TextSpan over a folder      at most :data:`MAX_TEXTSPAN_IMAGES` (2000) images (a seeded random
                            subset of larger folders); the folder walk stops with an error
                            after :data:`MAX_FOLDER_ENTRIES` (50000) entries
server folders              with ``CLIPDECOMP_FOLDER_ROOT`` set, folder paths typed into the
                            UI must lie inside it (use it on a public deployment)
==========================  ==================================================================

All checks raise :class:`clipdecomp.errors.InputError` with a message meant for the user;
the UI turns it into a ``gr.Error``.
"""

from __future__ import annotations

import math
import os
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence, Union

from PIL import Image, ImageOps, UnidentifiedImageError

from clipdecomp.errors import InputError

__all__ = [
    "MAX_IMAGE_BYTES",
    "MAX_IMAGE_SIDE",
    "MIN_IMAGE_SIDE",
    "MAX_TEXTS",
    "MAX_TEXT_CHARS",
    "MAX_NEIGHBOURS",
    "MAX_TEXTSPAN_IMAGES",
    "MAX_FOLDER_ENTRIES",
    "FOLDER_ROOT_ENV",
    "load_image",
    "check_image",
    "parse_texts",
    "check_folder",
    "check_int",
    "head_label",
    "parse_head_labels",
]

MAX_IMAGE_BYTES = 20 * 1024 * 1024
MAX_IMAGE_SIDE = 4096
MIN_IMAGE_SIDE = 8
MAX_TEXTS = 16
MAX_TEXT_CHARS = 200
MAX_NEIGHBOURS = 32
MAX_TEXTSPAN_IMAGES = 2000
MAX_FOLDER_ENTRIES = 50_000
FOLDER_ROOT_ENV = "CLIPDECOMP_FOLDER_ROOT"

_NO_IMAGE = "No image: upload an image or pick one of the examples first."


def _check_size(width: int, height: int, what: str) -> None:
    if width > MAX_IMAGE_SIDE or height > MAX_IMAGE_SIDE:
        raise InputError(
            f"{what} is {width}x{height} pixels; the limit is {MAX_IMAGE_SIDE}x{MAX_IMAGE_SIDE}. "
            "Please resize it and try again."
        )
    if width < MIN_IMAGE_SIDE or height < MIN_IMAGE_SIDE:
        raise InputError(f"{what} is {width}x{height} pixels; each side must be at least {MIN_IMAGE_SIDE} pixels.")


def check_image(image: Any) -> Image.Image:
    """An in-memory image as RGB, within the pixel limits.

    Raises:
        InputError: ``None``, not a PIL image, or too large / too small.
    """
    if image is None:
        raise InputError(_NO_IMAGE)
    if not isinstance(image, Image.Image):
        raise InputError(f"expected an image, got {type(image).__name__}.")
    _check_size(image.width, image.height, "The image")
    return image if image.mode == "RGB" else image.convert("RGB")


def load_image(path: Union[str, os.PathLike, None]) -> Image.Image:
    """Read an image file within the limits (size in bytes and pixels checked before
    decoding), EXIF orientation applied, as RGB.

    Raises:
        InputError: no path, a missing / too large / corrupt file, or too many pixels.
    """
    if path is None or (isinstance(path, str) and not path.strip()):
        raise InputError(_NO_IMAGE)
    p = Path(path)
    name = p.name
    try:
        n_bytes = p.stat().st_size
    except OSError:
        raise InputError(f"The image file {name!r} could not be found; please upload it again.") from None
    if n_bytes > MAX_IMAGE_BYTES:
        raise InputError(
            f"The image file {name!r} is {n_bytes / 2**20:.1f} MB; the limit is {MAX_IMAGE_BYTES // 2**20} MB."
        )
    try:
        with Image.open(p) as im:  # reads the header only
            _check_size(im.width, im.height, f"The image {name!r}")
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im.seek(0)
                im.load()
                out = ImageOps.exif_transpose(im)
                return out.convert("RGB")
    except InputError:
        raise
    except UnidentifiedImageError:
        raise InputError(f"{name!r} is not an image Pillow can read (PNG, JPEG, WebP, GIF, BMP, TIFF, ...).") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise InputError(f"The image {name!r} is truncated or corrupt and cannot be decoded ({e}).") from None


def parse_texts(texts: Union[str, Sequence[str], None]) -> list[str]:
    """Texts from a box with one text per line (or a list): stripped, blank lines dropped,
    duplicates removed (order kept).

    Raises:
        InputError: no text, more than :data:`MAX_TEXTS`, or a text longer than
            :data:`MAX_TEXT_CHARS` characters.
    """
    if texts is None:
        lines: list[str] = []
    elif isinstance(texts, str):
        lines = texts.splitlines()
    else:
        lines = [str(t) for t in texts]
    out = list(dict.fromkeys(" ".join(t.split()) for t in lines if t and t.strip()))
    if not out:
        raise InputError("No text: type at least one text, one per line (e.g. 'a red circle').")
    if len(out) > MAX_TEXTS:
        raise InputError(f"{len(out)} texts given; the limit is {MAX_TEXTS} per request (one per line).")
    for i, t in enumerate(out, 1):
        if len(t) > MAX_TEXT_CHARS:
            raise InputError(f"Text {i} is {len(t)} characters long; the limit is {MAX_TEXT_CHARS} characters.")
    return out


def check_folder(path: Union[str, os.PathLike, None], what: str = "image folder") -> Path:
    """A server-side folder typed into the UI: it must exist, lie inside
    ``$CLIPDECOMP_FOLDER_ROOT`` when that is set (on a Hugging Face Space, where
    ``SPACE_ID`` is set, folders are refused unless it is), and hold at most
    :data:`MAX_FOLDER_ENTRIES` entries (counted recursively).

    Raises:
        InputError: otherwise.
    """
    if path is None or not str(path).strip():
        raise InputError(f"No {what}: type the path of a folder on the server.")
    folder = Path(str(path).strip()).expanduser()
    root_env = os.environ.get(FOLDER_ROOT_ENV)
    if root_env:
        root = Path(root_env).expanduser().resolve()
        resolved = folder.resolve() if folder.is_absolute() else (root / folder).resolve()
        if resolved != root and root not in resolved.parents:
            raise InputError(f"The {what} must be inside {root} on this server, got {str(path)!r}.")
        folder = resolved
    elif "SPACE_ID" in os.environ:
        # A public Space with no root set would let any visitor walk the server's files.
        raise InputError(
            f"Server folders are disabled on this public deployment; its owner can allow one by setting {FOLDER_ROOT_ENV}."
        )
    if not folder.is_dir():
        raise InputError(f"The {what} {str(folder)!r} does not exist or is not a folder on the server.")
    n = 0
    for _, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        n += len(dirnames) + len(filenames)
        if n > MAX_FOLDER_ENTRIES:
            raise InputError(
                f"The {what} {str(folder)!r} holds more than {MAX_FOLDER_ENTRIES} files and folders; "
                "point it at a smaller folder."
            )
    return folder


def check_int(value: Any, name: str, low: int, high: int, default: Optional[int] = None) -> int:
    """An integer setting in ``[low, high]`` (floats with an integer value accepted, as
    number boxes send them); ``None`` gives ``default``.

    Raises:
        InputError: out of range or not a whole number.
    """
    if value is None and default is not None:
        return default
    try:
        f = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{name} must be a whole number between {low} and {high}, got {value!r}.") from None
    if not math.isfinite(f) or f != int(f) or not low <= f <= high:
        raise InputError(f"{name} must be a whole number between {low} and {high}, got {value!r}.")
    return int(f)


def head_label(layer: int, head: int) -> str:
    """``(5, 2)`` -> ``"L5.H2"`` (the label the UI shows)."""
    return f"L{layer}.H{head}"


def parse_head_labels(value: Union[str, Sequence[str], None], n_layers: int, n_heads: int) -> list[tuple[int, int]]:
    """Heads picked in the UI (``["L5.H2", "5.4"]`` or ``"L5.H2, 5.4"``) -> ``[(5, 2), (5, 4)]``,
    validated against the model's shape by :func:`repair.select.parse_heads`; an empty
    value gives ``[]``.

    Raises:
        InputError: a malformed label, an index out of range or a duplicate.
    """
    from repair.select import parse_heads

    if value is None:
        return []
    spec = value if isinstance(value, str) else ",".join(str(v) for v in value)
    return parse_heads(spec.strip().strip(","), n_layers, n_heads)
