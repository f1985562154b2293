"""The ImageNet-segmentation benchmark file ``gtsegs_ijcv.mat`` (Guillaumin et al. 2014).

Layout (MATLAB v7.3, i.e. an HDF5 file with a 512-byte MATLAB userblock), exactly as
``shared/notes/protocols.md`` defines it::

    /value/img   [n, 1] object references; each -> an image stored [3, W, H] uint8
    /value/gt    [n, 1] object references; each -> a "cell" whose [0, 0] entry
                 references the mask stored [W, H] (1 = object, 0 = background)

MATLAB is column-major, so an ``H x W x 3`` MATLAB array appears in HDF5 as ``[3, W, H]``;
the reader transposes back to ``[H, W, 3]`` / ``[H, W]``.  The file carries no class labels.

Contents
--------
* :class:`ImageNetSegmentation` -- lazy ``torch.utils.data.Dataset`` over the file.
* :func:`write_gtsegs` -- writes the same layout (atomically), e.g. for toy data.
* :func:`square_crop_pair` / :func:`crop_box_for` -- the model's resize-shorter-side +
  centre-crop applied identically to image and mask (misaligned crops are a known flaw
  of some public evaluation code).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, NamedTuple

import h5py
import numpy as np
import torch
from PIL import Image

from ..errors import InputError
from ..io import atomic_path

__all__ = [
    "ImageNetSegmentation",
    "write_gtsegs",
    "CropBox",
    "SquareCrop",
    "crop_box_for",
    "square_crop_pair",
    "EXPECTED_LAYOUT",
]

EXPECTED_LAYOUT = (
    "expected a MATLAB v7.3 (HDF5) file with /value/img = [n, 1] object references to images "
    "stored [3, W, H] uint8, and /value/gt = [n, 1] object references to cells whose [0, 0] entry "
    "references a mask stored [W, H] with values 0/1"
)


# --------------------------------------------------------------------------- reading


def _is_ref_dataset(h5py, obj: Any) -> bool:
    return isinstance(obj, h5py.Dataset) and h5py.check_dtype(ref=obj.dtype) is h5py.Reference


def _check_layout(h5py, f: Any, path: Path) -> int:
    """Validate the top-level layout of an open file; return the number of items n."""
    if "value" not in f or not isinstance(f["value"], h5py.Group):
        raise InputError(f"{path}: no group /value; {EXPECTED_LAYOUT}")
    value = f["value"]
    shapes = {}
    for key in ("img", "gt"):
        if key not in value:
            raise InputError(f"{path}: no dataset /value/{key}; {EXPECTED_LAYOUT}")
        ds = value[key]
        if not _is_ref_dataset(h5py, ds):
            kind = type(ds).__name__ if not isinstance(ds, h5py.Dataset) else f"dataset of dtype {ds.dtype}"
            raise InputError(f"{path}: /value/{key} is a {kind}, not an array of object references; {EXPECTED_LAYOUT}")
        if ds.ndim != 2 or ds.shape[1] != 1:
            raise InputError(f"{path}: /value/{key} has shape {list(ds.shape)}, expected [n, 1]; {EXPECTED_LAYOUT}")
        shapes[key] = ds.shape[0]
    if shapes["img"] != shapes["gt"]:
        raise InputError(
            f"{path}: /value/img holds {shapes['img']} references but /value/gt holds {shapes['gt']}; "
            "the two must have the same length n"
        )
    return int(shapes["img"])


def _deref(h5py, f: Any, ref: Any, what: str, path: Path) -> Any:
    if not ref:
        raise InputError(f"{path}: {what} is a null object reference; {EXPECTED_LAYOUT}")
    try:
        return f[ref]
    except Exception as exc:  # h5py raises ValueError/KeyError on dangling references
        raise InputError(f"{path}: {what} is a reference that cannot be resolved ({exc}); {EXPECTED_LAYOUT}") from exc


def _read_item(h5py, f: Any, index: int, path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read item `index` -> (image uint8 [H, W, 3], mask uint8 [H, W])."""
    img_obj = _deref(h5py, f, f["value/img"][index, 0], f"/value/img[{index}, 0]", path)
    if not isinstance(img_obj, h5py.Dataset) or img_obj.ndim != 3 or img_obj.shape[0] != 3:
        shape = list(img_obj.shape) if isinstance(img_obj, h5py.Dataset) else type(img_obj).__name__
        raise InputError(f"{path}: image {index} is stored as {shape}, expected [3, W, H]; {EXPECTED_LAYOUT}")
    raw = img_obj[()]
    if raw.dtype != np.uint8:
        if not np.issubdtype(raw.dtype, np.integer) or raw.min(initial=0) < 0 or raw.max(initial=0) > 255:
            raise InputError(f"{path}: image {index} has dtype {raw.dtype}, expected uint8 (0..255); {EXPECTED_LAYOUT}")
        raw = raw.astype(np.uint8)
    image = np.ascontiguousarray(raw.transpose(2, 1, 0))  # [3, W, H] -> [H, W, 3]

    cell = _deref(h5py, f, f["value/gt"][index, 0], f"/value/gt[{index}, 0]", path)
    if not _is_ref_dataset(h5py, cell) or cell.ndim != 2 or cell.shape[0] < 1 or cell.shape[1] < 1:
        shape = list(cell.shape) if isinstance(cell, h5py.Dataset) else type(cell).__name__
        raise InputError(
            f"{path}: /value/gt[{index}, 0] points to {shape}, expected a 2-D cell of object references; {EXPECTED_LAYOUT}"
        )
    mask_obj = _deref(h5py, f, cell[0, 0], f"cell entry [0, 0] of /value/gt[{index}, 0]", path)
    if not isinstance(mask_obj, h5py.Dataset) or mask_obj.ndim != 2:
        shape = list(mask_obj.shape) if isinstance(mask_obj, h5py.Dataset) else type(mask_obj).__name__
        raise InputError(f"{path}: mask {index} is stored as {shape}, expected [W, H]; {EXPECTED_LAYOUT}")
    mask_raw = mask_obj[()]
    mask = np.ascontiguousarray(mask_raw.T)  # [W, H] -> [H, W]
    if mask.shape != image.shape[:2]:
        raise InputError(
            f"{path}: item {index}: mask is {list(mask.shape)} (H, W) but the image is {list(image.shape[:2])}; "
            "they must have the same size"
        )
    if not np.isin(mask, (0, 1)).all():
        bad = np.unique(mask[~np.isin(mask, (0, 1))])[:5].tolist()
        raise InputError(f"{path}: mask {index} holds values {bad}; accepted values are 0 (background) and 1 (object)")
    return image, mask.astype(np.uint8)


class ImageNetSegmentation(torch.utils.data.Dataset):
    """Lazy reader of ``gtsegs_ijcv.mat``.

    ``ds[i]`` returns ``(image, mask)``: ``image`` a uint8 numpy array ``[H, W, 3]`` (RGB),
    ``mask`` a uint8 numpy array ``[H, W]`` (1 = object, 0 = background); or, when
    ``transform`` is given, ``transform(image, mask)`` (e.g.
    ``lambda im, m: square_crop_pair(im, m, 224)``).

    The layout is checked when the object is built (missing file, not HDF5, wrong layout ->
    :class:`~clipdecomp.errors.InputError`); each item is checked when read.  The HDF5 file is
    opened once per process, on first access, so the object can be handed to a
    ``DataLoader`` with workers (each worker opens its own handle).  Images differ in size:
    use ``batch_size=1`` or a ``collate_fn`` that keeps a list.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        transform: Callable[[np.ndarray, np.ndarray], Any] | None = None,
    ) -> None:
        self.path = Path(path)
        self.transform = transform
        self._file: Any = None
        self._pid: int | None = None
        if not self.path.exists():
            raise InputError(f"ImageNet-segmentation file not found: {self.path}; {EXPECTED_LAYOUT} (gtsegs_ijcv.mat)")
        if not self.path.is_file():
            raise InputError(f"{self.path} is not a file; {EXPECTED_LAYOUT} (gtsegs_ijcv.mat)")
        with self._open(h5py) as f:
            self._n = _check_layout(h5py, f, self.path)

    def _open(self, h5py):
        try:
            return h5py.File(self.path, "r")
        except OSError as exc:
            raise InputError(
                f"{self.path} cannot be opened as HDF5 ({exc}); a MATLAB file saved without '-v7.3' "
                f"is not HDF5 and is not accepted; {EXPECTED_LAYOUT}"
            ) from exc

    def _handle(self) -> Any:
        pid = os.getpid()
        if self._file is None or self._pid != pid:
            self._file = self._open(h5py)
            self._pid = pid
        return self._file

    def __len__(self) -> int:
        return self._n

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        if index < 0:
            index += self._n
        if not 0 <= index < self._n:
            raise IndexError(f"index out of range: the file holds {self._n} items")
        image, mask = _read_item(h5py, self._handle(), index, self.path)
        if self.transform is not None:
            return self.transform(image, mask)
        return image, mask

    def close(self) -> None:
        """Close this process's file handle (reopened on the next access)."""
        if self._file is not None and self._pid == os.getpid():
            try:
                self._file.close()
            except Exception:
                pass
        self._file = None
        self._pid = None

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_file"] = None  # h5py handles cannot be pickled; each worker opens its own
        state["_pid"] = None
        return state

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass

    def __repr__(self) -> str:
        return f"ImageNetSegmentation({str(self.path)!r}, n={self._n})"


# --------------------------------------------------------------------------- writing


def _matlab_header() -> bytes:
    """The 128-byte MAT-file header MATLAB writes into a v7.3 file's 512-byte userblock."""
    stamp = time.strftime("%a %b %d %H:%M:%S %Y", time.gmtime())
    text = f"MATLAB 7.3 MAT-file, Platform: GLNXA64, Created on: {stamp} HDF5 schema 1.00 .".encode("ascii")
    text = text[:116].ljust(116, b" ")
    subsys_offset = b"\x00" * 8
    version = b"\x00\x02"  # 0x0200, little-endian
    endian = b"IM"
    return text + subsys_offset + version + endian


def _check_pair(index: int, image: Any, mask: Any) -> tuple[np.ndarray, np.ndarray]:
    image = np.asarray(image)
    mask = np.asarray(mask)
    if image.ndim != 3 or image.shape[2] != 3:
        raise InputError(f"write_gtsegs: item {index}: image has shape {list(image.shape)}; expected [H, W, 3] (RGB)")
    if image.dtype != np.uint8:
        if not np.issubdtype(image.dtype, np.integer) or image.min(initial=0) < 0 or image.max(initial=0) > 255:
            raise InputError(f"write_gtsegs: item {index}: image dtype {image.dtype}; expected uint8 (integers 0..255)")
        image = image.astype(np.uint8)
    if mask.ndim != 2 or mask.shape != image.shape[:2]:
        raise InputError(
            f"write_gtsegs: item {index}: mask has shape {list(mask.shape)}; expected [H, W] = {list(image.shape[:2])}, "
            "the image's height and width"
        )
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    if not np.isin(mask, (0, 1)).all():
        raise InputError(f"write_gtsegs: item {index}: mask values {np.unique(mask)[:5].tolist()}; accepted are 0 and 1 (or bool)")
    return image, mask.astype(np.uint8)


def write_gtsegs(
    path: str | os.PathLike,
    items: Iterable[tuple[np.ndarray, np.ndarray]],
    *,
    compression: str | None = None,
) -> int:
    """Write ``items`` -- ``(image uint8 [H, W, 3], mask {0,1} [H, W])`` pairs -- as ``gtsegs_ijcv.mat``.

    Produces exactly the layout :class:`ImageNetSegmentation` reads (see the module docstring):
    images stored ``[3, W, H]``, masks ``[W, H]`` inside ``[1, 1]`` cells of references, the
    data sets under ``/#refs#`` with MATLAB class attributes, and a MATLAB 7.3 header in the
    512-byte userblock.  ``items`` may be a generator (streamed, not held in memory).  The
    file appears atomically.  ``compression`` (e.g. ``"gzip"``) is passed to h5py.
    Returns the number of items written.
    """
    ref_dtype = h5py.ref_dtype
    matlab_class = lambda name: np.bytes_(name)  # noqa: E731 - MATLAB stores fixed-length ASCII attributes
    with atomic_path(path) as tmp:
        with h5py.File(tmp, "w", userblock_size=512) as f:
            refs = f.create_group("#refs#")
            img_refs: list[Any] = []
            gt_refs: list[Any] = []
            for i, pair in enumerate(items):
                try:
                    image, mask = pair
                except (TypeError, ValueError) as exc:
                    raise InputError(f"write_gtsegs: item {i} is not an (image, mask) pair") from exc
                image, mask = _check_pair(i, image, mask)
                d_img = refs.create_dataset(f"img{i}", data=image.transpose(2, 1, 0), compression=compression)
                d_img.attrs["MATLAB_class"] = matlab_class("uint8")
                d_mask = refs.create_dataset(f"mask{i}", data=mask.T, compression=compression)
                d_mask.attrs["MATLAB_class"] = matlab_class("uint8")
                d_cell = refs.create_dataset(f"cell{i}", shape=(1, 1), dtype=ref_dtype)
                d_cell[0, 0] = d_mask.ref
                d_cell.attrs["MATLAB_class"] = matlab_class("cell")
                img_refs.append(d_img.ref)
                gt_refs.append(d_cell.ref)
            value = f.create_group("value")
            value.attrs["MATLAB_class"] = matlab_class("struct")
            for key, lst in (("img", img_refs), ("gt", gt_refs)):
                ds = value.create_dataset(key, shape=(len(lst), 1), dtype=ref_dtype)
                for j, r in enumerate(lst):
                    ds[j, 0] = r
                ds.attrs["MATLAB_class"] = matlab_class("cell")
        with open(tmp, "r+b") as fh:
            fh.write(_matlab_header())
    return len(img_refs)


# --------------------------------------------------------------------------- geometry


@dataclass(frozen=True)
class CropBox:
    """Where the model's square input lies in an image (resize shorter side to ``size``, centre crop).

    Matches ``torchvision.transforms.Resize(size)`` + ``CenterCrop(size)`` (open_clip's default
    "shortest" preprocessing) to the pixel.

    Attributes:
        size: side of the square model input.
        source_hw: ``(H, W)`` of the original image/mask.
        resized_hw: ``(H', W')`` after resizing the shorter side to ``size``.
        box: ``(left, top, right, bottom)`` of the crop in the resized frame (``right - left == size``).
        source_box: the same box in original pixel coordinates (floats).
        native_box: ``source_box`` rounded to whole original pixels (ints), for cropping a mask
            at its own resolution.
    """

    size: int
    source_hw: tuple[int, int]
    resized_hw: tuple[int, int]
    box: tuple[int, int, int, int]
    source_box: tuple[float, float, float, float]
    native_box: tuple[int, int, int, int]

    def crop_native(self, array: np.ndarray) -> np.ndarray:
        """Crop an ``[H, W, ...]`` array (the original image or mask) to ``native_box``."""
        if tuple(array.shape[:2]) != self.source_hw:
            raise InputError(
                f"crop_native: array is {list(array.shape[:2])} (H, W) but this crop box was computed for {list(self.source_hw)}"
            )
        left, top, right, bottom = self.native_box
        return array[top:bottom, left:right]


def crop_box_for(height: int, width: int, size: int) -> CropBox:
    """Geometry of resize-shorter-side-to-``size`` + centre-crop ``size x size`` on an ``height x width`` image."""
    if int(size) != size or size < 1:
        raise InputError(f"crop size must be a positive integer, got {size!r}")
    if height < 1 or width < 1:
        raise InputError(f"image size must be at least 1x1, got {height}x{width}")
    size = int(size)
    # torchvision's _compute_resized_output_size: the short side becomes `size`, long side truncated.
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_h, new_w = size, int(size * width / height)
    # torchvision's center_crop (Python's round, as there).
    top = int(round((new_h - size) / 2.0))
    left = int(round((new_w - size) / 2.0))
    box = (left, top, left + size, top + size)
    sx, sy = width / new_w, height / new_h
    source_box = (left * sx, top * sy, (left + size) * sx, (top + size) * sy)
    native = (
        max(0, int(round(source_box[0]))),
        max(0, int(round(source_box[1]))),
        min(width, int(round(source_box[2]))),
        min(height, int(round(source_box[3]))),
    )
    return CropBox(size, (int(height), int(width)), (new_h, new_w), box, source_box, native)


class SquareCrop(NamedTuple):
    """Result of :func:`square_crop_pair`.

    ``image``: PIL RGB ``size x size`` (the model input before normalisation);
    ``mask``: uint8 ``[size, size]``, the mask under the same resize (nearest) and crop;
    ``crop``: the :class:`CropBox`; ``crop.crop_native(original_mask)`` gives the same region of
    the mask at its own resolution, to compare with a heatmap upsampled to that shape.
    """

    image: Image.Image
    mask: np.ndarray
    crop: CropBox


def square_crop_pair(image: np.ndarray | Image.Image, mask: np.ndarray, size: int) -> SquareCrop:
    """Apply the SAME resize-shorter-side + centre-crop to ``image`` (bicubic) and ``mask`` (nearest).

    Args:
        image: uint8 ``[H, W, 3]`` array or a PIL image of size ``W x H``.
        mask: ``[H, W]`` array with values 0/1 (or bool).
        size: side of the square model input (e.g. 224).
    Returns:
        :class:`SquareCrop` ``(image PIL size x size, mask uint8 [size, size], crop CropBox)``.
    """
    pil = image if isinstance(image, Image.Image) else None
    if pil is None:
        arr = np.asarray(image)
        if arr.ndim != 3 or arr.shape[2] != 3 or arr.dtype != np.uint8:
            raise InputError(f"square_crop_pair: image must be uint8 [H, W, 3] or a PIL image, got {arr.dtype} {list(arr.shape)}")
        pil = Image.fromarray(arr)
    else:
        pil = pil.convert("RGB")
    mask = np.asarray(mask)
    if mask.dtype == bool:
        mask = mask.astype(np.uint8)
    h, w = pil.height, pil.width
    if mask.shape != (h, w):
        raise InputError(f"square_crop_pair: mask is {list(mask.shape)} but the image is [{h}, {w}] (H, W); they must match")
    if not np.isin(mask, (0, 1)).all():
        raise InputError(f"square_crop_pair: mask values {np.unique(mask)[:5].tolist()}; accepted are 0 and 1 (or bool)")
    crop = crop_box_for(h, w, size)
    new_h, new_w = crop.resized_hw
    if (new_h, new_w) != (h, w):
        pil = pil.resize((new_w, new_h), Image.BICUBIC)
        mask_img = Image.fromarray(mask.astype(np.uint8)).resize((new_w, new_h), Image.NEAREST)
    else:
        mask_img = Image.fromarray(mask.astype(np.uint8))
    out_image = pil.crop(crop.box)
    out_mask = np.asarray(mask_img.crop(crop.box), dtype=np.uint8).copy()
    return SquareCrop(out_image, out_mask, crop)
