"""Zero-shot segmentation metrics of the ImageNet-segmentation benchmark.

Definitions follow ``shared/notes/protocols.md`` (the protocol of Chefer et al. 2021, used
by the TextSpan paper):

* :func:`binarize`: clip negatives to 0, min-max normalise to [0, 1], threshold at the
  normalised map's mean (foreground = strictly above the mean).
* :class:`SegmentationMeter`: accumulated over the whole data set,

  - pixel accuracy = sum of correct pixels / sum of labelled pixels,
  - mIoU = mean over {background, foreground} of (sum of intersections / sum of unions),
    sums over all images first, then the ratio,
  - mAP = mean over images of scikit-learn's ``average_precision_score`` of the flattened
    two-channel one-hot target against the flattened two-channel scores
    (background channel = 1 - normalised map, foreground channel = normalised map).

All three are returned as **fractions in [0, 1]** (multiply by 100 to compare with the
published percentages, e.g. 75.21 / 54.50 / 81.61 for ViT-H-14).

Like the reference code, ratios use a denominator of ``union + eps`` with
``eps = np.spacing(1)``, so a class that never occurs in either prediction or target gets
IoU 0 rather than NaN, and a per-image AP that scikit-learn cannot define counts as 0.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .errors import InputError

__all__ = ["binarize", "upsample_to", "SegmentationMeter", "image_scores"]

_EPS = float(np.spacing(1))


def _as_2d_float(x: np.ndarray | torch.Tensor, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim == 3 and arr.shape[0] == 1:
        arr = arr[0]
    if arr.ndim != 2:
        raise InputError(f"{name} must be a 2-D [H, W] map (a leading axis of size 1 is also accepted), got shape {list(arr.shape)}")
    if arr.size == 0:
        raise InputError(f"{name} is empty (shape {list(arr.shape)}); expected at least one pixel")
    if not np.isfinite(arr).all():
        raise InputError(f"{name} contains NaN or infinite values; expected finite numbers")
    return arr


def binarize(heatmap: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Normalise a heatmap and threshold it at its mean.

    Args:
        heatmap: ``[H, W]`` scores (numpy or torch, any real dtype), higher = more object.
    Returns:
        ``(normalised, foreground)``: ``normalised`` float64 ``[H, W]`` in [0, 1] (negatives
        clipped to 0, then ``(x - min) / (max - min)``); ``foreground`` bool ``[H, W]``,
        ``normalised > normalised.mean()``.

    A constant map (after clipping; e.g. all values <= 0) has no range: it normalises to all
    zeros and the foreground is empty (the reference code's NaN -> 0 replacement gives the same).
    """
    x = np.clip(_as_2d_float(heatmap, "heatmap"), 0.0, None)
    lo, hi = x.min(), x.max()
    if hi - lo <= 0:
        norm = np.zeros_like(x)
    else:
        norm = (x - lo) / (hi - lo)
    return norm, norm > norm.mean()


def upsample_to(heatmap: np.ndarray | torch.Tensor, size: Sequence[int]) -> np.ndarray | torch.Tensor:
    """Bilinearly resize a ``[h, w]`` map to ``size = (H, W)`` (``align_corners=False``).

    Returns the same kind as the input: a float32 numpy array for numpy input, a tensor of the
    input's floating dtype (float32 for integer tensors) on its device for torch input.
    """
    if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
        raise InputError(f"size must be (H, W) with positive integers, got {tuple(size)!r}")
    is_torch = isinstance(heatmap, torch.Tensor)
    t = heatmap if is_torch else torch.from_numpy(np.asarray(heatmap, dtype=np.float32))
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2:
        raise InputError(f"heatmap must be a 2-D [h, w] map, got shape {list(t.shape)}")
    if not t.is_floating_point():
        t = t.float()
    out = F.interpolate(t[None, None], size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)[0, 0]
    return out if is_torch else out.numpy()


def _check_mask(mask: np.ndarray | torch.Tensor, shape: tuple[int, ...]) -> np.ndarray:
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    m = np.asarray(mask)
    if m.ndim == 3 and m.shape[0] == 1:
        m = m[0]
    if m.shape != shape:
        raise InputError(
            f"mask has shape {list(m.shape)} but the heatmap is {list(shape)}; they must match "
            "(resize the heatmap with upsample_to(heatmap, mask.shape))"
        )
    if m.dtype != bool and not np.isin(m, (0, 1)).all():
        raise InputError(f"mask values {np.unique(m)[:5].tolist()}; accepted are 0 (background) and 1 (object), or bool")
    return m.astype(bool)


def image_scores(heatmap: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> dict[str, np.ndarray | float]:
    """Per-image sufficient statistics of the three metrics.

    Returns ``correct`` / ``labeled`` pixel counts, ``intersection`` and ``union`` (int arrays
    ``[2]``: background, foreground) and ``ap`` (the image's average precision).
    """
    from sklearn.metrics import average_precision_score

    norm, fg = binarize(heatmap)
    target = _check_mask(mask, norm.shape)
    labeled = target.size  # every pixel of a 0/1 mask is labelled
    correct = int((fg == target).sum())
    inter = np.array([(~fg & ~target).sum(), (fg & target).sum()], dtype=np.int64)
    area_pred = np.array([(~fg).sum(), fg.sum()], dtype=np.int64)
    area_lab = np.array([(~target).sum(), target.sum()], dtype=np.int64)
    union = area_pred + area_lab - inter
    # two channels (background, foreground), flattened: one-hot target vs (1 - norm, norm)
    y_true = np.concatenate([(~target).ravel(), target.ravel()]).astype(np.int64)
    y_score = np.concatenate([(1.0 - norm).ravel(), norm.ravel()])
    ap = float(np.nan_to_num(average_precision_score(y_true, y_score)))
    return {"correct": correct, "labeled": labeled, "intersection": inter, "union": union, "ap": ap}


class SegmentationMeter:
    """Accumulate pixel accuracy, mIoU and mAP over a data set.

    Usage::

        meter = SegmentationMeter()
        for heatmap, mask in pairs:            # heatmap [H, W] float, mask [H, W] {0, 1}
            meter.update(heatmap, mask)
        meter.compute()  # {'pixel_accuracy': ..., 'miou': ..., 'map': ..., ...}  (fractions)

    ``heatmap`` and ``mask`` must have the same shape; bring a patch-grid map to the mask's
    size with :func:`upsample_to` first.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.correct = 0
        self.labeled = 0
        self.intersection = np.zeros(2, dtype=np.int64)
        self.union = np.zeros(2, dtype=np.int64)
        self.ap: list[float] = []

    def __len__(self) -> int:
        return len(self.ap)

    def update(self, heatmap: np.ndarray | torch.Tensor, mask: np.ndarray | torch.Tensor) -> dict[str, np.ndarray | float]:
        """Add one image; returns its :func:`image_scores`."""
        s = image_scores(heatmap, mask)
        self.correct += s["correct"]
        self.labeled += s["labeled"]
        self.intersection += s["intersection"]
        self.union += s["union"]
        self.ap.append(s["ap"])
        return s

    def compute(self) -> dict[str, float]:
        """Metrics so far, as fractions in [0, 1].

        Keys: ``pixel_accuracy``, ``miou``, ``map``, ``iou_background``, ``iou_foreground``,
        ``n_images``.  Raises :class:`InputError` when no image was added.
        """
        if not self.ap:
            raise InputError("SegmentationMeter.compute() called before any update(); add at least one (heatmap, mask) pair")
        iou = self.intersection / (self.union + _EPS)
        return {
            "pixel_accuracy": float(self.correct / (self.labeled + _EPS)),
            "miou": float(iou.mean()),
            "map": float(np.mean(self.ap)),
            "iou_background": float(iou[0]),
            "iou_foreground": float(iou[1]),
            "n_images": len(self.ap),
        }
