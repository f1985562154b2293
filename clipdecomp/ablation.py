"""Mean-ablation of decomposition parts.

Replacing a part (a head, an MLP, the embedding term) by its mean over a dataset
removes the image-specific information it carries while keeping the embedding's
offset (Gandelsman et al., Sec. 3). Means are taken in the joint space, over the
*unnormalised* parts returned by :class:`~clipdecomp.decomposition.Decomposition`.

* :func:`compute_means` streams a DataLoader and returns :class:`PartMeans`.
* :func:`ablated_embedding` is a pure function: total with chosen parts replaced.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch

from .decomposition import Decomposition, decompose
from .errors import CheckpointError, InputError
from .io import atomic_path

__all__ = ["PartMeans", "compute_means", "stream_means", "ablated_embedding", "batch_images"]

HeadSel = Union[str, Iterable[tuple[int, int]]]
MlpSel = Union[str, Iterable[int]]


@dataclass
class PartMeans:
    """Dataset means of the decomposition parts (joint space, unnormalised).

    Attributes:
        embed: ``[D]``; mlps: ``[L, D]``; heads: ``[L, H, D]``; count: number of images.
    """

    embed: torch.Tensor
    mlps: torch.Tensor
    heads: torch.Tensor
    count: int

    @property
    def layers(self) -> int:
        return self.mlps.shape[0]

    @property
    def n_heads(self) -> int:
        return self.heads.shape[1]

    @staticmethod
    def from_decomposition(dec: Decomposition) -> "PartMeans":
        """Means over the images of one decomposition."""
        return PartMeans(dec.embed.mean(0), dec.mlps.mean(0), dec.heads.mean(0), dec.batch_size)

    def save(self, path: Union[str, os.PathLike]) -> None:
        """Write to a ``.safetensors`` file (atomically)."""
        from safetensors.torch import save_file

        tensors = {
            "embed": self.embed.detach().cpu().contiguous(),
            "mlps": self.mlps.detach().cpu().contiguous(),
            "heads": self.heads.detach().cpu().contiguous(),
        }
        with atomic_path(path) as tmp:
            save_file(tensors, str(tmp), metadata={"format": "clipdecomp-part-means", "count": str(int(self.count))})

    @staticmethod
    def load(path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu") -> "PartMeans":
        """Read a file written by :meth:`save`."""
        from safetensors import safe_open

        try:
            with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in ("embed", "mlps", "heads")}
        except FileNotFoundError as e:
            raise CheckpointError(f"part-means file not found: {path}") from e
        except Exception as e:
            raise CheckpointError(
                f"cannot read part means from {path} ({type(e).__name__}: {e}); expected a .safetensors "
                "file written by PartMeans.save with tensors embed, mlps, heads."
            ) from e
        if meta.get("format") != "clipdecomp-part-means":
            raise CheckpointError(f"{path} is not a PartMeans file (metadata format={meta.get('format')!r}).")
        return PartMeans(tensors["embed"], tensors["mlps"], tensors["heads"], int(meta.get("count", 0)))


def batch_images(batch: Any) -> torch.Tensor:
    """The images of a loader batch: the batch itself, or the first item of a tuple/list
    ``(images, labels, ...)``, or ``batch["image"]`` / ``batch["images"]`` of a dict."""
    if isinstance(batch, torch.Tensor):
        return batch
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0]
    if isinstance(batch, dict):
        for key in ("image", "images"):
            if isinstance(batch.get(key), torch.Tensor):
                return batch[key]
    raise InputError(
        f"cannot find images in a loader batch of type {type(batch).__name__}; the loader must yield "
        "image tensors [B, 3, H, W], (images, labels, ...) tuples, or dicts with an 'image' key."
    )


def stream_means(
    model: Any,
    loader: Iterable[Any],
    parts: Callable[[Decomposition], Sequence[torch.Tensor]],
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
    desc: str = "means",
) -> tuple[list[torch.Tensor], int, torch.dtype]:
    """Means over every image of ``loader`` of the batch-first tensors ``parts(dec)``.

    Streams: each batch is decomposed, ``parts`` picks tensors ``[B, ...]`` from the
    decomposition, and only their float64 running sums (on the CPU) are kept, so memory
    does not grow with the dataset.

    Args:
        model: anything :func:`~clipdecomp.decomposition.decompose` accepts.
        loader: yields image batches ``[B, 3, H, W]``, ``(images, labels, ...)`` tuples
            or dicts with an ``"image"`` key.
        parts: ``Decomposition -> [tensor [B, ...], ...]``.
        device: where to move the batches (default: leave them where they are).
        progress: show a tqdm progress bar labelled ``desc``.

    Returns:
        ``(means, count, dtype)``: the float64 means ``[...]`` in the order of ``parts``,
        the number of images and the decomposition's dtype.

    Raises:
        InputError: the loader yielded no images.
    """
    from tqdm.auto import tqdm

    sums: Optional[list[torch.Tensor]] = None
    count = 0
    dtype = torch.float32
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, disable=not progress, desc=desc, unit="batch", dynamic_ncols=True):
        images = batch_images(batch)
        if device is not None:
            images = images.to(device)
        dec = decompose(model, images, token_layers=None)
        batch_sums = [p.detach().sum(0).to(device="cpu", dtype=torch.float64) for p in parts(dec)]
        sums = batch_sums if sums is None else [s + b for s, b in zip(sums, batch_sums)]
        count += dec.batch_size
        dtype = dec.dtype
    if sums is None or count == 0:
        raise InputError(f"the loader yielded no images ({desc}); cannot compute means.")
    return [s / count for s in sums], count, dtype


def compute_means(
    model: Any,
    loader: Iterable[Any],
    *,
    device: Optional[Union[str, torch.device]] = None,
    progress: bool = True,
) -> PartMeans:
    """Mean of every part over all images yielded by ``loader`` (see :func:`stream_means`).

    Args:
        model: anything :func:`~clipdecomp.decomposition.decompose` accepts.
        loader: yields image batches ``[B, 3, H, W]`` or ``(images, labels)`` tuples.
        device: where to move the batches (default: leave them where they are).
        progress: show a tqdm progress bar.

    Returns:
        :class:`PartMeans` on the CPU, in the decomposition's dtype.
    """
    means, count, dtype = stream_means(
        model, loader, lambda dec: (dec.embed, dec.mlps, dec.heads), device=device, progress=progress, desc="part means"
    )
    embed, mlps, heads = (m.to(dtype) for m in means)
    return PartMeans(embed, mlps, heads, count)


def _select_heads(heads: HeadSel, L: int, H: int) -> torch.Tensor:
    mask = torch.zeros(L, H, dtype=torch.bool)
    if isinstance(heads, str):
        if heads != "all":
            raise InputError(f"heads must be 'all' or a list of (layer, head) pairs, got {heads!r}.")
        mask[:] = True
        return mask
    for item in heads:
        if not (isinstance(item, (tuple, list)) and len(item) == 2):
            raise InputError(f"heads entries must be (layer, head) pairs, got {item!r}.")
        l, h = item
        for v, n, what in ((l, L, "layer"), (h, H, "head")):
            if isinstance(v, bool) or not isinstance(v, int) or not -n <= v < n:
                raise InputError(f"{what} index {v!r} in {item!r} is out of range [-{n}, {n}).")
        mask[l % L, h % H] = True
    return mask


def _select_layers(layers: MlpSel, L: int) -> torch.Tensor:
    mask = torch.zeros(L, dtype=torch.bool)
    if isinstance(layers, str):
        if layers != "all":
            raise InputError(f"mlps must be 'all' or a list of layer indices, got {layers!r}.")
        mask[:] = True
        return mask
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int) or not -L <= l < L:
            raise InputError(f"MLP layer index {l!r} is out of range [-{L}, {L}).")
        mask[l % L] = True
    return mask


def ablated_embedding(
    dec: Decomposition,
    means: PartMeans,
    *,
    heads: HeadSel = (),
    mlps: MlpSel = (),
    embed: bool = False,
    layers_up_to: Optional[int] = None,
) -> torch.Tensor:
    """The image embedding with chosen parts replaced by their means ``[B, D]`` (unnormalised).

    ``total - sum(chosen parts) + sum(their means)``; nothing chosen gives ``dec.total()``.

    Args:
        dec: the decomposition of a batch.
        means: dataset means of the same model (:func:`compute_means`).
        heads: ``(layer, head)`` pairs to ablate, or ``"all"``.
        mlps: layer indices whose MLP to ablate, or ``"all"``.
        embed: ablate the direct (class-token embedding) term.
        layers_up_to: if given, additionally ablate every head and MLP of layers
            ``0 .. layers_up_to - 1`` (the first ``layers_up_to`` layers).
    """
    L, H = dec.layers, dec.n_heads
    if means.mlps.shape != (L, dec.embed_dim) or means.heads.shape != (L, H, dec.embed_dim) or means.embed.shape != (
        dec.embed_dim,
    ):
        raise InputError(
            f"means have shapes embed {list(means.embed.shape)}, mlps {list(means.mlps.shape)}, heads "
            f"{list(means.heads.shape)}; this decomposition needs [{dec.embed_dim}], [{L}, {dec.embed_dim}], "
            f"[{L}, {H}, {dec.embed_dim}] (means of another model?)."
        )
    head_mask = _select_heads(heads, L, H)
    mlp_mask = _select_layers(mlps, L)
    if layers_up_to is not None:
        if isinstance(layers_up_to, bool) or not isinstance(layers_up_to, int) or not 0 <= layers_up_to <= L:
            raise InputError(f"layers_up_to must be an int in [0, {L}], got {layers_up_to!r}.")
        head_mask[:layers_up_to] = True
        mlp_mask[:layers_up_to] = True

    out = dec.total().clone()
    dev, dt = out.device, out.dtype
    if head_mask.any():
        hm = head_mask.to(dev)
        diff = means.heads.to(dev, dt)[hm].sum(0) - dec.heads[:, hm].sum(1)  # [B, D]
        out += diff
    if mlp_mask.any():
        mm = mlp_mask.to(dev)
        out += means.mlps.to(dev, dt)[mm].sum(0) - dec.mlps[:, mm].sum(1)
    if embed:
        out += means.embed.to(dev, dt) - dec.embed
    return out
