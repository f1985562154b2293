"""Render heatmaps over images (matplotlib colormaps, PIL images out) and image grids.

* :func:`render_overlay`: a ``[h, w]`` map, upsampled bilinearly to the image, coloured with
  a matplotlib colormap and alpha-blended over the image; optional colour bar.
* :func:`image_grid`: images in a grid with optional captions (for retrieval results).
* :func:`save_png`: atomic PNG write.

Only the object-oriented matplotlib API (``matplotlib.figure.Figure`` + Agg canvas) is used,
so nothing depends on pyplot's global state or a display.
"""

from __future__ import annotations

import io
import os
from typing import Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image, ImageDraw

from .errors import InputError
from .heatmaps import upsample
from .io import atomic_path

__all__ = ["render_overlay", "colorize", "image_grid", "save_png"]

ArrayLike = Union[np.ndarray, torch.Tensor]


def _as_map(heatmap: ArrayLike) -> torch.Tensor:
    t = heatmap.detach().cpu() if isinstance(heatmap, torch.Tensor) else torch.as_tensor(np.asarray(heatmap))
    if t.ndim == 3 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 2 or t.numel() == 0:
        raise InputError(f"heatmap must be a 2-D [h, w] map, got shape {list(t.shape)}.")
    t = t.to(torch.float64)
    if not bool(torch.isfinite(t).all()):
        raise InputError("heatmap contains NaN or infinite values.")
    return t


def _limits(m: torch.Tensor, vmin: Optional[float], vmax: Optional[float], symmetric: bool) -> tuple[float, float]:
    if symmetric:
        bound = float(m.abs().max()) if vmax is None else float(vmax)
        lo, hi = -bound, bound
    else:
        lo = float(m.min()) if vmin is None else float(vmin)
        hi = float(m.max()) if vmax is None else float(vmax)
    if hi <= lo:
        hi = lo + 1.0
    return lo, hi


def colorize(values: ArrayLike, cmap: str = "jet", vmin: Optional[float] = None, vmax: Optional[float] = None,
             *, symmetric: bool = False) -> np.ndarray:
    """``[h, w]`` values -> uint8 RGB ``[h, w, 3]`` through a matplotlib colormap.

    Values are mapped linearly from ``[vmin, vmax]`` (default: the map's min / max; with
    ``symmetric=True`` ``[-max|v|, max|v|]``, for signed maps) to ``[0, 1]`` and clipped.
    """
    import matplotlib

    m = _as_map(values)
    lo, hi = _limits(m, vmin, vmax, symmetric)
    try:
        cm = matplotlib.colormaps[cmap]
    except KeyError as e:
        raise InputError(f"unknown matplotlib colormap {cmap!r}; e.g. 'jet', 'viridis', 'RdBu_r'.") from e
    x = ((m - lo) / (hi - lo)).clamp(0, 1).numpy()
    return (cm(x)[..., :3] * 255.0 + 0.5).astype(np.uint8)


def _colorbar_strip(height: int, cmap: str, lo: float, hi: float, label: Optional[str]) -> Image.Image:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import Normalize
    from matplotlib.cm import ScalarMappable
    from matplotlib.figure import Figure

    dpi = 100
    fig = Figure(figsize=(1.1, max(height, 64) / dpi), dpi=dpi)
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0.08, 0.05, 0.22, 0.9))
    fig.colorbar(ScalarMappable(norm=Normalize(lo, hi), cmap=cmap), cax=ax, label=label)
    ax.tick_params(labelsize=7)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi)
    strip = Image.open(buf).convert("RGB")
    return strip.resize((max(1, round(strip.width * height / strip.height)), height), Image.BICUBIC)


def render_overlay(
    image: Image.Image,
    heatmap: ArrayLike,
    *,
    cmap: str = "jet",
    alpha: float = 0.5,
    vmin: Optional[float] = None,
    vmax: Optional[float] = None,
    symmetric: bool = False,
    colorbar: bool = False,
    label: Optional[str] = None,
) -> Image.Image:
    """Blend a coloured heatmap over an image.

    Args:
        image: the image the map refers to (e.g. the model's square input crop).
        heatmap: ``[h, w]`` (any resolution; upsampled bilinearly to the image size).
        cmap, vmin, vmax, symmetric: colouring, see :func:`colorize`.
        alpha: weight of the heatmap colour (0 = the image, 1 = the map only).
        colorbar: append a colour bar on the right.
        label: colour-bar label.

    Returns:
        RGB PIL image, ``image.size`` wide (plus the colour bar).
    """
    if not isinstance(image, Image.Image):
        raise InputError(f"image must be a PIL image, got {type(image).__name__}.")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}.")
    base = image.convert("RGB")
    m = upsample(_as_map(heatmap), (base.height, base.width))
    lo, hi = _limits(m, vmin, vmax, symmetric)
    colour = colorize(m, cmap, lo, hi)
    blended = (1.0 - alpha) * np.asarray(base, dtype=np.float64) + alpha * colour.astype(np.float64)
    out = Image.fromarray(np.clip(blended + 0.5, 0, 255).astype(np.uint8), "RGB")
    if not colorbar:
        return out
    strip = _colorbar_strip(out.height, cmap, lo, hi, label)
    canvas = Image.new("RGB", (out.width + strip.width, out.height), "white")
    canvas.paste(out, (0, 0))
    canvas.paste(strip, (out.width, 0))
    return canvas


def image_grid(
    images: Sequence[Image.Image],
    ncols: int,
    *,
    captions: Optional[Sequence[str]] = None,
    cell: Optional[int] = None,
    pad: int = 4,
) -> Image.Image:
    """Lay images out row-major in ``ncols`` columns (empty cells stay white).

    Args:
        images: PIL images (resized to ``cell x cell``; default the first image's width).
        captions: optional text under each image (same length as ``images``).
    """
    if not images:
        raise InputError("image_grid needs at least one image.")
    if ncols < 1:
        raise InputError(f"ncols must be >= 1, got {ncols}.")
    if captions is not None and len(captions) != len(images):
        raise InputError(f"got {len(captions)} captions for {len(images)} images.")
    cell = cell or images[0].width
    text_h = 14 if captions is not None else 0
    nrows = (len(images) + ncols - 1) // ncols
    W = ncols * cell + (ncols + 1) * pad
    H = nrows * (cell + text_h) + (nrows + 1) * pad
    canvas = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(canvas)
    for i, im in enumerate(images):
        r, c = divmod(i, ncols)
        x = pad + c * (cell + pad)
        y = pad + r * (cell + text_h + pad)
        canvas.paste(im.convert("RGB").resize((cell, cell), Image.BICUBIC), (x, y))
        if captions is not None:
            draw.text((x, y + cell + 1), str(captions[i])[: max(4, cell // 6)], fill=(0, 0, 0))
    return canvas


def save_png(image: Image.Image, path: Union[str, os.PathLike]) -> None:
    """Write ``image`` as PNG atomically (temporary file beside ``path``, then rename)."""
    if not isinstance(image, Image.Image):
        raise InputError(f"save_png expects a PIL image, got {type(image).__name__}.")
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")
