"""Classification data in the ``ROOT/CLASS_NAME/*.jpg`` layout (``torchvision.datasets.ImageFolder``).

Class indices follow torchvision's order (folder names sorted); :func:`classnames` returns
the matching human-readable names (underscores -> spaces), e.g. for zero-shot prompts.
Note that ImageNet's own folders are WordNet ids (``n01440764``); those need a separate
id -> name table.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

from ..errors import InputError

__all__ = ["image_folder", "classnames", "class_folders", "EXPECTED_LAYOUT"]

EXPECTED_LAYOUT = "expected ROOT/<class name>/<image files>, one sub-folder per class (torchvision ImageFolder layout)"


def _check_root(root: str | os.PathLike) -> Path:
    path = Path(root)
    if not path.exists():
        raise InputError(f"image folder not found: {path}; {EXPECTED_LAYOUT}")
    if not path.is_dir():
        raise InputError(f"{path} is not a folder; {EXPECTED_LAYOUT}")
    return path


def class_folders(root: str | os.PathLike) -> list[str]:
    """Class folder names in ImageFolder's index order (sorted); raises if there are none."""
    from torchvision.datasets.folder import find_classes

    path = _check_root(root)
    try:
        classes, _ = find_classes(str(path))
    except FileNotFoundError as exc:
        raise InputError(f"{path} has no class sub-folders; {EXPECTED_LAYOUT}") from exc
    return list(classes)


def classnames(root: str | os.PathLike) -> list[str]:
    """Human-readable class names: the class folder names, underscores replaced by spaces,
    in ImageFolder's index order (``classnames(root)[label]`` names ``label``)."""
    return [name.replace("_", " ") for name in class_folders(root)]


def image_folder(
    root: str | os.PathLike,
    transform: Callable[[Any], Any] | None = None,
    **kwargs: Any,
):
    """``torchvision.datasets.ImageFolder(root, transform, **kwargs)`` with clear errors.

    ``ds[i] -> (image, label)`` with ``image`` the PIL image or ``transform(image)``.
    Raises :class:`InputError` when ``root`` is missing, not a folder, has no class
    sub-folders, or a class folder holds no image file.
    """
    from torchvision.datasets import ImageFolder

    path = _check_root(root)
    class_folders(path)  # clear error when there are no class folders
    try:
        return ImageFolder(str(path), transform=transform, **kwargs)
    except FileNotFoundError as exc:
        raise InputError(f"{path}: {exc}; {EXPECTED_LAYOUT}") from exc
