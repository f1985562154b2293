"""Text-conditioned heatmaps from the per-token decomposition (paper Sec. 5, Fig. 6-7).

Every function here is a pure function of a :class:`~clipdecomp.decomposition.Decomposition`
(or of tensors): no model call, no I/O.

Notation: ``B`` images, ``T`` texts, ``D`` joint dimension, ``(gh, gw)`` the patch grid,
``P = gh * gw`` patch tokens, ``k`` basis directions.

The map of a text ``t`` at patch ``i`` is the direct contribution of token ``i`` through
the attention heads of the chosen layers, read along ``t``::

    map[i] = < sum_{l in layers} sum_h c_{l,h,i},  t >

(``Decomposition.token_scores``; the class token, index 0, is excluded). Summed over all
patches *and* the class token this gives the layers' total head contribution ``<sum_l
sum_h c_{l,h}, t>`` exactly. The token contributions include their even share of the
``out_proj`` / ``ln_post`` biases, which is the same at every patch.

Paper normalisation (the segmentation protocol): subtract, at every patch, the mean map of a
set of class descriptions ``normalizer [C, D]``. The score is linear in the text, so this is
the map of ``t - mean(normalizer)``, computed in one pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence, Union

import torch
import torch.nn.functional as F

from .decomposition import Decomposition
from .errors import InputError

__all__ = [
    "text_heatmaps",
    "class_heatmaps",
    "relative_heatmap",
    "head_direction_heatmaps",
    "HeadDirectionMaps",
    "patch_grid",
    "upsample",
]

Layers = Optional[Union[int, Sequence[int]]]


def _as_texts(texts: Any, dec: Decomposition, what: str) -> torch.Tensor:
    if not isinstance(texts, torch.Tensor):
        raise InputError(f"{what} must be a torch.Tensor of text embeddings [T, {dec.embed_dim}], got {type(texts).__name__}.")
    if texts.ndim == 1:
        texts = texts[None]
    if texts.ndim != 2 or texts.shape[1] != dec.embed_dim or texts.shape[0] < 1:
        raise InputError(
            f"{what} must have shape [T, {dec.embed_dim}] (or [{dec.embed_dim}] for one text), got {list(texts.shape)}."
        )
    if not bool(torch.isfinite(texts).all()):
        raise InputError(f"{what} contains NaN or infinite values.")
    return texts.to(device=dec.device, dtype=dec.dtype)


def patch_grid(scores: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Drop the class token and lay patch scores out on the grid.

    Args:
        scores: ``[B, N, T]`` per-token scores, ``N = 1 + gh * gw`` (token 0 = class token).
        grid: ``(gh, gw)``.

    Returns:
        ``[B, T, gh, gw]`` (token ``1 + r * gw + c`` goes to row ``r``, column ``c``).
    """
    gh, gw = grid
    if scores.ndim != 3 or scores.shape[1] != 1 + gh * gw:
        raise InputError(f"scores must be [B, 1 + {gh}*{gw}, T], got {list(scores.shape)}.")
    B, _, T = scores.shape
    return scores[:, 1:].transpose(1, 2).reshape(B, T, gh, gw)


def text_heatmaps(
    dec: Decomposition,
    texts: torch.Tensor,
    layers: Layers = None,
    *,
    normalizer: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Per-patch direct-contribution scores of texts.

    Args:
        dec: a decomposition with token-level data for ``layers``.
        texts: text embeddings ``[T, D]`` (or ``[D]``), usually unit-normalised.
        layers: layers to sum over (default: all of ``dec.token_layers``); negative
            indices count from the end.
        normalizer: optional class-description embeddings ``[C, D]``; their mean map is
            subtracted at every patch (the paper's normalisation).

    Returns:
        ``[B, T, gh, gw]`` heatmaps, in ``dec``'s dtype.
    """
    t = _as_texts(texts, dec, "texts")
    if normalizer is not None:
        t = t - _as_texts(normalizer, dec, "normalizer").mean(0, keepdim=True)
    return patch_grid(dec.token_scores(t, layers), dec.grid)


def class_heatmaps(
    dec: Decomposition,
    classes: torch.Tensor,
    targets: Union[torch.Tensor, Sequence[int]],
    layers: Layers = None,
) -> torch.Tensor:
    """The segmentation protocol's map: image ``b``'s map of class ``targets[b]`` minus the
    mean map over all classes, at every patch.

    Args:
        classes: class text embeddings ``[C, D]``.
        targets: ``B`` class indices (e.g. the zero-shot prediction).

    Returns:
        ``[B, gh, gw]``; equals ``text_heatmaps(dec, classes, layers, normalizer=classes)[b, targets[b]]``.
    """
    c = _as_texts(classes, dec, "classes")
    idx = torch.as_tensor(targets, dtype=torch.long).reshape(-1)
    if idx.numel() != dec.batch_size or bool(((idx < 0) | (idx >= c.shape[0])).any()):
        raise InputError(f"targets must be {dec.batch_size} class indices in [0, {c.shape[0]}), got {idx.tolist()}.")
    t = c[idx.to(c.device)] - c.mean(0, keepdim=True)  # [B, D]: one text per image
    scores = dec.token_scores(t, layers)  # [B, N, B]
    own = scores.diagonal(dim1=0, dim2=2).t()  # [B, N]: image b against its own text b
    return patch_grid(own[..., None], dec.grid)[:, 0]


def relative_heatmap(
    dec: Decomposition,
    text_a: torch.Tensor,
    text_b: torch.Tensor,
    layers: Layers = None,
) -> torch.Tensor:
    """Where the image speaks for ``text_a`` *rather than* ``text_b``: map(a) - map(b).

    Args:
        text_a, text_b: text embeddings ``[D]`` (or ``[1, D]``).

    Returns:
        ``[B, gh, gw]``.
    """
    a = _as_texts(text_a, dec, "text_a")
    b = _as_texts(text_b, dec, "text_b")
    if a.shape[0] != 1 or b.shape[0] != 1:
        raise InputError(f"text_a and text_b must be single embeddings [D], got {list(a.shape)} and {list(b.shape)}.")
    return text_heatmaps(dec, a - b, layers)[:, 0]


@dataclass
class HeadDirectionMaps:
    """Per-token maps of one head's basis directions for one image (paper Fig. 7).

    Attributes:
        layer, head: the head.
        maps: ``[k, gh, gw]``: patch ``i``'s contribution through the head read along each
            basis direction (class token excluded).
        coefficients: ``[k]``: the image's head contribution (minus ``mean`` if given)
            along each direction; the maps of a direction sum, over all tokens including the
            class token, to its coefficient plus ``<mean, u>``.
        largest: direction indices sorted by decreasing coefficient (first ``top``).
        most_negative: direction indices sorted by increasing coefficient (first ``top``).
    """

    layer: int
    head: int
    maps: torch.Tensor
    coefficients: torch.Tensor
    largest: list[int]
    most_negative: list[int]


def head_direction_heatmaps(
    dec: Decomposition,
    layer: int,
    head: int,
    basis: torch.Tensor,
    image_index: int = 0,
    *,
    mean: Optional[torch.Tensor] = None,
    top: int = 2,
) -> HeadDirectionMaps:
    """Heatmaps of a head's TextSpan basis directions for one image.

    Args:
        dec: decomposition with token-level data for ``layer``.
        layer, head: which head (``layer`` may be negative).
        basis: ``[k, D]`` directions (``TextSpanResult.basis``).
        image_index: which image of the batch.
        mean: ``[D]`` the head's mean output over a data set (``TextSpanResult.mean``),
            subtracted before the coefficients are taken; ``None`` for raw coefficients.
        top: how many directions to list in ``largest`` / ``most_negative``.

    Returns:
        :class:`HeadDirectionMaps`.
    """
    u = _as_texts(basis, dec, "basis")
    if isinstance(head, bool) or not isinstance(head, int) or not 0 <= head < dec.n_heads:
        raise InputError(f"head must be an int in [0, {dec.n_heads}), got {head!r}.")
    if isinstance(image_index, bool) or not isinstance(image_index, int) or not -dec.batch_size <= image_index < dec.batch_size:
        raise InputError(f"image_index must be an int in [0, {dec.batch_size}), got {image_index!r}.")
    if isinstance(top, bool) or not isinstance(top, int) or top < 1:
        raise InputError(f"top must be a positive int, got {top!r}.")
    scores = dec.head_token_scores(u, [layer])[image_index, 0, :, head]  # [N, k]
    maps = patch_grid(scores[None], dec.grid)[0]  # [k, gh, gw]
    coef = scores.sum(0)  # = <head contribution, u>
    if mean is not None:
        m = _as_texts(mean, dec, "mean")
        if m.shape[0] != 1:
            raise InputError(f"mean must be a single vector [{dec.embed_dim}], got {list(mean.shape)}.")
        coef = coef - (m @ u.t())[0]
    order = torch.argsort(coef, descending=True).tolist()
    n = min(top, len(order))
    l_norm = layer % dec.layers
    return HeadDirectionMaps(l_norm, head, maps, coef, order[:n], order[::-1][:n])


def upsample(heatmap: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Bilinear resize (``align_corners=False``) of ``[..., h, w]`` maps to ``size = (H, W)``.

    Leading dimensions are kept; integer inputs come back as float32.
    """
    if not isinstance(heatmap, torch.Tensor) or heatmap.ndim < 2:
        raise InputError(f"heatmap must be a tensor [..., h, w], got {getattr(heatmap, 'shape', type(heatmap).__name__)}.")
    size = tuple(size)
    if len(size) != 2 or any(isinstance(s, bool) or int(s) != s or s < 1 for s in size):
        raise InputError(f"size must be (H, W) with positive integers, got {size!r}.")
    lead = heatmap.shape[:-2]
    x = heatmap if heatmap.is_floating_point() else heatmap.float()
    x = x.reshape(-1, 1, *heatmap.shape[-2:])
    out = F.interpolate(x, size=(int(size[0]), int(size[1])), mode="bilinear", align_corners=False)
    return out.reshape(*lead, int(size[0]), int(size[1]))
