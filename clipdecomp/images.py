"""Image files in a folder as a Dataset, for commands that read unlabelled images.

* :class:`ImageFiles` -- every image file under a folder (recursively, sorted by
  relative path), opened as RGB and passed through a transform.
* :func:`image_loader` -- a non-shuffling ``DataLoader`` over :class:`ImageFiles`
  yielding ``[B, 3, H, W]`` batches, optionally on a seeded random subset.

Labels are ignored: for class labels use :func:`clipdecomp.data.image_folder`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from .errors import InputError

__all__ = ["IMAGE_EXTENSIONS", "ImageFiles", "image_loader", "list_image_files"]

#: File name endings (lower case) recognised as images.
IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm")


def list_image_files(folder: str | os.PathLike) -> list[Path]:
    """All image files under ``folder`` (recursive; hidden files and folders skipped),
    sorted by their path relative to ``folder``.

    Raises:
        InputError: ``folder`` is missing, is not a folder, or holds no image file.
    """
    root = Path(folder).expanduser()
    if not root.exists():
        raise InputError(f"image folder not found: {root}")
    if not root.is_dir():
        raise InputError(f"{root} is not a folder; expected a folder of image files ({', '.join(IMAGE_EXTENSIONS)}).")
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        for name in filenames:
            if not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS):
                files.append(Path(dirpath) / name)
    if not files:
        raise InputError(
            f"no image files under {root} (searched recursively for {', '.join(IMAGE_EXTENSIONS)})."
        )
    return sorted(files, key=lambda p: p.relative_to(root).as_posix())


class ImageFiles(Dataset):
    """The image files under a folder: ``ds[i] -> transform(PIL RGB image)``.

    Args:
        folder: searched recursively; files are sorted by relative path, so the order
            (and hence any subset chosen by index) is the same on every machine.
        transform: e.g. a model's ``preprocess`` (PIL image -> ``[3, H, W]`` tensor);
            ``None`` returns the PIL image.
        indices: optional subset of the sorted files (positions in that list).

    Attributes:
        files: the selected paths, in dataset order.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        transform: Optional[Callable[[Any], Any]] = None,
        *,
        indices: Optional[Sequence[int]] = None,
    ) -> None:
        self.root = Path(folder).expanduser()
        all_files = list_image_files(self.root)
        if indices is not None:
            bad = [i for i in indices if not 0 <= int(i) < len(all_files)]
            if bad:
                raise InputError(f"image indices out of range [0, {len(all_files)}): e.g. {bad[0]}.")
            all_files = [all_files[int(i)] for i in indices]
        self.files: list[Path] = all_files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        from PIL import Image, UnidentifiedImageError

        path = self.files[i]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"cannot read image {path}: {e}") from e
        return image if self.transform is None else self.transform(image)


def image_loader(
    folder: str | os.PathLike,
    preprocess: Callable[[Any], torch.Tensor],
    batch_size: int = 64,
    *,
    max_images: Optional[int] = None,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """Batches ``[B, 3, H, W]`` of the preprocessed images under ``folder``, in file order.

    Args:
        folder: see :class:`ImageFiles`.
        preprocess: PIL image -> ``[3, H, W]`` tensor (a model's eval transform).
        batch_size: images per batch (>= 1).
        max_images: if set and smaller than the number of files, a random subset of
            that size, drawn with ``seed`` and kept in file order (so it is the same
            on every run and does not favour the first sub-folders).
        seed: seed of the subset draw.
        num_workers: DataLoader worker processes.

    The dataset is ``loader.dataset`` (an :class:`ImageFiles`; ``.files`` lists the paths).
    """
    for name, value, low in (("batch_size", batch_size, 1), ("num_workers", num_workers, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise InputError(f"{name} must be an int >= {low}, got {value!r}.")
    if max_images is not None and (isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1):
        raise InputError(f"max_images must be None or an int >= 1, got {max_images!r}.")
    dataset = ImageFiles(folder, preprocess)
    n_files = len(dataset)
    if max_images is not None and max_images < n_files:
        gen = torch.Generator().manual_seed(int(seed))
        keep = sorted(torch.randperm(n_files, generator=gen)[:max_images].tolist())
        dataset.files = [dataset.files[i] for i in keep]
    return DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=num_workers)
