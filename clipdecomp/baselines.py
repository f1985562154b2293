"""Baseline saliency maps for the zero-shot segmentation comparison (paper Table 3).

* :func:`raw_attention_map`: the last layer's class-token attention to the patches,
  averaged over heads.
* :func:`attention_rollout` (Abnar & Zuidema 2020): with ``A_l`` the layer's attention
  averaged over heads and ``Â_l = 0.5 A_l + 0.5 I`` (rows still sum to 1), the rollout
  is ``R = Â_L ... Â_2 Â_1``; the map is the class-token row of ``R`` over the patches.
  :func:`rollout` is the pure product, :func:`attention_matrices` computes the full
  ``[B, L, H, N, N]`` attention probabilities with the model's own modules.
* :func:`gradcam_maps`: GradCAM through the maintained ``pytorch-grad-cam`` package
  (``pip install grad-cam``): target = the image-text similarity (cosine) of the chosen
  class text, target layer = the last block's ``ln_1`` output (the input of the last
  attention), tokens reshaped to the patch grid.

All maps are returned on the patch grid ``[B, gh, gw]`` (class token excluded), higher =
more salient.
"""

from __future__ import annotations

from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .decomposition import Decomposition, _check_images, _split_heads
from .errors import InputError, MissingDependencyError
from .loading import vision_tower

__all__ = [
    "raw_attention_map",
    "attention_matrices",
    "rollout",
    "attention_rollout",
    "gradcam_maps",
    "ImageTextSimilarity",
]


def _to_grid(row: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """``[B, N]`` token values (class token first) -> ``[B, gh, gw]`` patch values."""
    gh, gw = grid
    if row.shape[-1] != 1 + gh * gw:
        raise InputError(f"expected {1 + gh * gw} tokens for grid {grid}, got {row.shape[-1]}.")
    return row[:, 1:].reshape(row.shape[0], gh, gw)


def raw_attention_map(dec: Decomposition) -> torch.Tensor:
    """Class-token attention of the last layer to each patch, averaged over heads ``[B, gh, gw]``."""
    return _to_grid(dec.class_attention[:, -1].mean(1), dec.grid)


def attention_matrices(model: Any, images: torch.Tensor) -> torch.Tensor:
    """Full attention probabilities of every layer ``[B, L, H, N, N]`` (rows: queries).

    Runs the model's own modules (``_embeds``, each block's ``ln_1`` / ``in_proj`` /
    ``ln_q`` / ``ln_k`` and the block itself for the residual update), so the result is the
    attention of the model's own forward pass.

    Args:
        model: a ``LoadedModel``, open_clip CLIP model or its ``VisionTransformer`` (eval mode).
        images: preprocessed ``[B, 3, H, W]``.
    """
    visual = vision_tower(model)
    if visual.training:
        raise InputError("the model is in training mode; call model.eval() first.")
    images = _check_images(images, visual)
    transformer = visual.transformer
    out = []
    with torch.no_grad():
        x = visual._embeds(images)  # [B, N, W]
        for blk in transformer.resblocks:
            attn = blk.attn
            H = attn.num_heads
            W = x.shape[-1]
            h = blk.ln_1(x)
            q, k = F.linear(h, attn.in_proj_weight[: 2 * W], None if attn.in_proj_bias is None else attn.in_proj_bias[: 2 * W]).chunk(2, -1)
            q, k = _split_heads(q, H), _split_heads(k, H)  # [B, H, N, dh]
            if hasattr(attn, "ln_q"):
                q, k = attn.ln_q(q), attn.ln_k(k)
            logits = (q @ k.transpose(-1, -2)) * (W // H) ** -0.5
            out.append(torch.softmax(logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits, -1))
            x = blk(x) if transformer.batch_first else blk(x.transpose(0, 1)).transpose(0, 1)
    return torch.stack(out, 1)


def rollout(attn: torch.Tensor, residual: float = 0.5) -> torch.Tensor:
    """Attention rollout ``[B, N, N]`` from head-averaged attention ``[B, L, N, N]``.

    ``R = Â_L @ ... @ Â_1`` with ``Â_l = (1 - residual) A_l + residual I``; rows of ``R`` sum
    to 1 when those of every ``A_l`` do.
    """
    if attn.ndim != 4 or attn.shape[-1] != attn.shape[-2]:
        raise InputError(f"attn must be [B, L, N, N], got {list(attn.shape)}.")
    if not 0.0 <= residual <= 1.0:
        raise InputError(f"residual must be in [0, 1], got {residual}.")
    B, L, N, _ = attn.shape
    eye = torch.eye(N, dtype=attn.dtype, device=attn.device)
    r = eye.expand(B, N, N)
    for l in range(L):
        r = ((1.0 - residual) * attn[:, l] + residual * eye) @ r
    return r


def attention_rollout(model: Any, images: torch.Tensor, *, attn: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Rollout map: class-token row of :func:`rollout` over the patches ``[B, gh, gw]``.

    Pass ``attn`` (from :func:`attention_matrices`) to skip the forward pass.
    """
    visual = vision_tower(model)
    if attn is None:
        attn = attention_matrices(model, images)
    r = rollout(attn.mean(2))
    return _to_grid(r[:, 0], (int(visual.grid_size[0]), int(visual.grid_size[1])))


class ImageTextSimilarity(nn.Module):
    """``images [B, 3, H, W] -> cosine similarities [B, T]`` with fixed text embeddings.

    The model for GradCAM: the score of class ``c`` is ``<embed(x)/|embed(x)|, t_c>``.
    The input is made to require grad, so gradients reach the target layer even when the
    model's parameters are frozen.
    """

    def __init__(self, visual: nn.Module, texts: torch.Tensor) -> None:
        super().__init__()
        self.visual = visual
        self.register_buffer("texts", texts.detach(), persistent=False)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.detach().requires_grad_(True)
        emb = F.normalize(self.visual(x), dim=-1)
        return emb @ self.texts.to(emb.dtype).t()


def _gradcam_cls():
    try:
        from pytorch_grad_cam import GradCAM
    except ImportError as e:  # pragma: no cover - grad-cam is a requirement
        raise MissingDependencyError("GradCAM needs the `grad-cam` package: pip install grad-cam") from e

    class GridGradCAM(GradCAM):
        """GradCAM that returns maps at the patch grid instead of the input size."""

        grid: tuple[int, int] = (1, 1)

        def get_target_width_height(self, input_tensor: torch.Tensor) -> tuple[int, int]:
            return self.grid[1], self.grid[0]

    return GridGradCAM


def gradcam_maps(
    model: Any,
    images: torch.Tensor,
    texts: torch.Tensor,
    targets: Sequence[int],
    *,
    target_layer: Optional[nn.Module] = None,
) -> torch.Tensor:
    """GradCAM maps ``[B, gh, gw]`` (pytorch-grad-cam: ReLU, then min-max to [0, 1] per image).

    Args:
        model: ``LoadedModel`` / CLIP model / ``VisionTransformer``.
        images: preprocessed ``[B, 3, H, W]``.
        texts: class text embeddings ``[C, D]``.
        targets: ``B`` class indices: image ``b`` is explained for ``texts[targets[b]]``.
        target_layer: default the last block's ``ln_1``.
    """
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget

    visual = vision_tower(model)
    images = _check_images(images, visual)
    if not isinstance(texts, torch.Tensor) or texts.ndim != 2:
        raise InputError(f"texts must be a [C, D] tensor, got {getattr(texts, 'shape', type(texts).__name__)}.")
    targets = [int(t) for t in targets]
    if len(targets) != images.shape[0] or any(not 0 <= t < texts.shape[0] for t in targets):
        raise InputError(f"targets must be {images.shape[0]} class indices in [0, {texts.shape[0]}), got {targets}.")
    gh, gw = int(visual.grid_size[0]), int(visual.grid_size[1])
    batch_first = visual.transformer.batch_first

    def reshape(t: torch.Tensor) -> torch.Tensor:  # [B, N, W] -> [B, W, gh, gw]
        if not batch_first:
            t = t.transpose(0, 1)
        return t[:, 1:].reshape(t.shape[0], gh, gw, t.shape[-1]).permute(0, 3, 1, 2)

    layer = target_layer if target_layer is not None else visual.transformer.resblocks[-1].ln_1
    wrapper = ImageTextSimilarity(visual, texts.to(images.device)).eval()
    cam = _gradcam_cls()(wrapper, [layer], reshape_transform=reshape)
    cam.grid = (gh, gw)
    # Gradients flow from the input (ImageTextSimilarity makes it require grad); freezing
    # the parameters meanwhile leaves no .grad behind on the model.
    flags = [(p, p.requires_grad) for p in visual.parameters()]
    try:
        for p, _ in flags:
            p.requires_grad_(False)
        with torch.enable_grad():
            out = cam(images, [ClassifierOutputTarget(t) for t in targets])
    finally:
        cam.activations_and_grads.release()
        for p, flag in flags:
            p.requires_grad_(flag)
    return torch.from_numpy(np.asarray(out, dtype=np.float32)).reshape(images.shape[0], gh, gw)
