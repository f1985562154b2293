"""Mean-ablation of attention heads, exactly (in the decomposition) and baked into weights.

Notation: ``L`` layers, ``H`` heads, ``dh`` head width, ``W = H * dh``, ``D`` joint dim.

Exact repair
    Each chosen head's *direct* contribution to the image embedding is replaced by its
    mean over a data set, in the decomposition (:func:`exact_embeddings`, i.e.
    :func:`clipdecomp.ablation.ablated_embedding`). Nothing else changes: every other
    part, and the per-image ``ln_post`` scale, is the image's own.

Baked repair
    A stock open_clip model whose weights realise the ablation at the residual stream
    (:func:`bake_ablation`). Head ``h`` of layer ``l`` writes, at every token,
    ``ls_1 * (s_h z_h @ W_o[:, h]^T + b_o)`` where ``z_h`` ``[dh]`` is its attention output
    (before ``out_proj``), ``s_h`` the per-head scale (1 without ``scale_heads``),
    ``W_o[:, h]`` its ``dh`` columns of ``out_proj.weight`` and ``b_o`` the ``out_proj``
    bias (shared, left in place). Baking sets ``W_o[:, h] = 0`` and adds
    ``m_h = s_h * mean_i(z_h(i, class token)) @ W_o[:, h]^T`` ``[W]`` to ``b_o``: the head's
    mean residual write at the class token, computed exactly from the stored class-token
    attention outputs (:func:`compute_repair_means`). Consequences, all intended by the
    weight-space construction and measured by :func:`embedding_agreement`:

    * at the class token of layer ``l`` the head now writes exactly its mean;
    * the same constant is written at *every* token, so later layers see changed
      patch tokens (indirect effects change);
    * the last layer's MLP reads the changed class-token residual, and ``ln_post``
      normalises by the new residual's own scale, so even for last-layer heads the
      baked embedding differs from the exact one (see ``tests/test_repair.py``).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from torch import nn

from clipdecomp.ablation import PartMeans, ablated_embedding, batch_images, stream_means
from clipdecomp.decomposition import Decomposition, decompose
from clipdecomp.errors import InputError, UnsupportedModelError
from clipdecomp.loading import LoadedModel, vision_tower

__all__ = [
    "RepairMeans",
    "compute_repair_means",
    "class_token_head_outputs",
    "head_residual_means",
    "bake_ablation",
    "exact_embeddings",
    "measure_agreement",
    "embedding_agreement",
    "AgreementMeter",
]

Head = tuple[int, int]


@dataclass
class RepairMeans:
    """Everything both repairs need, from one pass over a data set.

    Attributes:
        parts: joint-space means of every decomposition part (for the exact repair).
        z: ``[L, H, dh]`` (float64) mean attention output of each head at the class
            token, before the per-head scale and ``out_proj`` (for the baked repair).
        count: number of images.
        split: name of the data split the means were taken over (provenance).
    """

    parts: PartMeans
    z: torch.Tensor
    count: int
    split: Optional[str] = None

    @property
    def n_layers(self) -> int:
        return int(self.z.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.z.shape[1])


def class_token_head_outputs(dec: Decomposition) -> torch.Tensor:
    """Per-head attention outputs at the class token ``[B, L, H, dh]`` of a decomposition.

    These are the activations the decomposition reads every head's contribution from
    (:attr:`~clipdecomp.decomposition.Decomposition.head_outputs`).
    """
    return dec.head_outputs


def compute_repair_means(
    model: Any,
    loader: Iterable[Any],
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    split: Optional[str] = None,
) -> RepairMeans:
    """Stream ``loader`` once; return the joint-space part means and the class-token
    attention-output means (float64 running sums; memory does not grow with the data).

    Args:
        model: anything :func:`clipdecomp.decomposition.decompose` accepts (eval mode).
        loader: yields ``[B, 3, H, W]`` batches or ``(images, labels, ...)`` tuples.
        device: where to move the batches (default: leave them).
        progress: show a tqdm bar.
        split: recorded in the result.

    Raises:
        InputError: the loader yielded no images.
    """
    desc = f"means ({split})" if split else "means"
    means, count, dtype = stream_means(
        model, loader, lambda dec: (dec.embed, dec.mlps, dec.heads, class_token_head_outputs(dec)),
        device=device, progress=progress, desc=desc,
    )
    embed, mlps, heads, z = means
    parts_means = PartMeans(embed.to(dtype), mlps.to(dtype), heads.to(dtype), count)
    return RepairMeans(parts=parts_means, z=z, count=count, split=split)


def _attn_params(blk: nn.Module) -> tuple[nn.Module, int, torch.Tensor]:
    """``(out_proj, n_heads, head_scale [H])`` of a residual attention block."""
    attn = blk.attn
    H = int(attn.num_heads)
    out = attn.out_proj
    if out.bias is None:
        raise UnsupportedModelError(
            "the attention out_proj has no bias, so a head's mean write cannot be baked into it "
            "(adding a bias would change the state dict, and stock open_clip could not load it)."
        )
    hs = getattr(attn, "head_scale", None)
    scale = torch.ones(H, dtype=torch.float64) if hs is None else hs.detach().to(torch.float64).reshape(H).cpu()
    return out, H, scale


def head_residual_means(model: Any, z_means: torch.Tensor, heads: Sequence[Head]) -> dict[Head, torch.Tensor]:
    """Each head's mean write into ``out_proj``'s output space at the class token (before
    the layer scale), ``m_h = s_h * mean z_h @ W_o[:, h]^T`` ``[W]`` (float64, on CPU).

    Args:
        model: LoadedModel / CLIP / VisionTransformer the means belong to.
        z_means: ``[L, H, dh]`` from :class:`RepairMeans`.
        heads: ``(layer, head)`` pairs.
    """
    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    L, H = len(blocks), int(blocks[0].attn.num_heads)
    W = visual.transformer.width
    if tuple(z_means.shape) != (L, H, W // H):
        raise InputError(
            f"attention-output means have shape {list(z_means.shape)}, this model needs [{L}, {H}, {W // H}] "
            "(means of another model?)."
        )
    out: dict[Head, torch.Tensor] = {}
    for l, h in heads:
        proj, Hl, scale = _attn_params(blocks[l])
        dh = W // Hl
        cols = proj.weight.detach().to(device="cpu", dtype=torch.float64)[:, h * dh : (h + 1) * dh]  # [W, dh]
        out[(l, h)] = scale[h] * (z_means[l, h].to(torch.float64) @ cols.t())
    return out


def _unwrap_clip(model: Any) -> nn.Module:
    return model.clip if isinstance(model, LoadedModel) else model


def bake_ablation(model: Any, means: RepairMeans, heads: Sequence[Head], *, inplace: bool = False) -> nn.Module:
    """A stock open_clip model whose weights mean-ablate ``heads`` (see the module doc).

    For each ``(l, h)``: the ``dh`` input columns of head ``h`` in layer ``l``'s
    ``out_proj.weight`` are set to zero and the head's mean class-token write
    (:func:`head_residual_means`) is added to ``out_proj.bias``. With no heads the
    result equals the input exactly. Weights keep their dtype; the mean is computed in
    float64 and rounded once.

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel` or open_clip CLIP model (or
            its ``VisionTransformer``).
        means: from :func:`compute_repair_means` on the same model.
        heads: ``(layer, head)`` pairs (validate them with :func:`repair.select.parse_heads`).
        inplace: modify ``model``'s weights instead of a deep copy.

    Returns:
        The modified module (a copy unless ``inplace``), in eval mode.
    """
    clip = _unwrap_clip(model)
    vision_tower(clip)
    heads = [(int(l), int(h)) for l, h in heads]
    if len(set(heads)) != len(heads):
        raise InputError(f"duplicate heads in {heads}.")
    writes = head_residual_means(clip, means.z, heads)  # validates shapes and indices
    out = clip if inplace else copy.deepcopy(clip)
    blocks = vision_tower(out).transformer.resblocks
    with torch.no_grad():
        for (l, h), m in writes.items():
            proj, H, _ = _attn_params(blocks[l])
            dh = proj.weight.shape[1] // H
            proj.weight[:, h * dh : (h + 1) * dh] = 0
            proj.bias.copy_((proj.bias.detach().to(torch.float64).cpu() + m).to(proj.bias))
    return out.eval()


def exact_embeddings(dec: Decomposition, means: Union[RepairMeans, PartMeans], heads: Sequence[Head], **kwargs: Any) -> torch.Tensor:
    """The exact repair: ``dec.total()`` with the chosen heads' direct contributions
    replaced by their means ``[B, D]`` (unnormalised). Extra keyword arguments go to
    :func:`clipdecomp.ablation.ablated_embedding` (``mlps=``, ``layers_up_to=``)."""
    parts = means.parts if isinstance(means, RepairMeans) else means
    return ablated_embedding(dec, parts, heads=list(heads), **kwargs)


def measure_agreement(
    model: Any,
    baked: nn.Module,
    means: RepairMeans,
    heads: Sequence[Head],
    loader: Iterable[Any],
    *,
    progress: bool = True,
) -> dict[str, float]:
    """Baked vs exact repair embeddings over every image of ``loader``
    (:func:`embedding_agreement`, the exact repair as the reference)."""
    from tqdm.auto import tqdm

    visual = vision_tower(baked)
    p = visual.conv1.weight
    meter = AgreementMeter()
    total = len(loader) if hasattr(loader, "__len__") else None
    with torch.no_grad():
        for batch in tqdm(loader, total=total, disable=not progress, desc="baked vs exact", unit="batch", dynamic_ncols=True):
            images = batch_images(batch).to(device=p.device, dtype=p.dtype)
            dec = decompose(model, images, token_layers=None)
            meter.update(visual(images), exact_embeddings(dec, means, heads))
    return meter.result()


def embedding_agreement(a: torch.Tensor, b: torch.Tensor) -> dict[str, float]:
    """How far embeddings ``a [B, D]`` are from the reference ``b [B, D]``.

    Returns ``mean_cos`` / ``min_cos`` (cosine similarity per image), ``rel_l2``
    (mean over images of ``||a - b|| / ||b||``), ``max_rel_l2`` and ``n``.
    """
    m = AgreementMeter()
    m.update(a, b)
    return m.result()


@dataclass
class AgreementMeter:
    """Streaming :func:`embedding_agreement` over batches."""

    cos_sum: float = 0.0
    cos_min: float = math.inf
    rel_sum: float = 0.0
    rel_max: float = 0.0
    n: int = 0

    def update(self, a: torch.Tensor, b: torch.Tensor) -> None:
        if a.shape != b.shape or a.ndim != 2:
            raise InputError(f"expected two [B, D] embeddings of the same shape, got {list(a.shape)} and {list(b.shape)}.")
        a64, b64 = a.detach().to(torch.float64).cpu(), b.detach().to(torch.float64).cpu()
        cos = torch.nn.functional.cosine_similarity(a64, b64, dim=-1)
        rel = (a64 - b64).norm(dim=-1) / b64.norm(dim=-1)
        self.cos_sum += float(cos.sum())
        self.cos_min = min(self.cos_min, float(cos.min()))
        self.rel_sum += float(rel.sum())
        self.rel_max = max(self.rel_max, float(rel.max()))
        self.n += int(a.shape[0])

    def result(self) -> dict[str, float]:
        if self.n == 0:
            raise InputError("no embeddings were compared.")
        return {
            "mean_cos": self.cos_sum / self.n,
            "min_cos": self.cos_min,
            "rel_l2": self.rel_sum / self.n,
            "max_rel_l2": self.rel_max,
            "n": self.n,
        }
