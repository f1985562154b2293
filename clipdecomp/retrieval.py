"""Image retrieval with chosen heads' direct contributions (paper Sec. 5.3, Fig. 8).

An image is represented by the sum of the direct contributions of a few heads (e.g. the
heads whose TextSpan role is colour); neighbours are found by cosine similarity of these
sums. With ``heads=None`` the representation is the full image embedding, i.e. ordinary
CLIP retrieval.

* :class:`Contributions`: per-head contributions ``[N, L', H, D]`` of chosen layers plus the
  full embeddings ``[N, D]``, for a gallery or for queries; :func:`gallery_contributions`
  computes them batch by batch (progress bar), ``save`` / ``load`` cache them (safetensors,
  atomic).
* :func:`nearest`: top-k neighbours of queries in a gallery, by chosen heads or full embedding.
* :func:`cosine_topk`, :func:`factor_precision_at_k`, :func:`probe_accuracy`: pure functions
  for measurements (how often neighbours share a known factor such as colour; how well a
  linear probe on each head predicts it).

Contributions are the *unnormalised* parts of :class:`~clipdecomp.decomposition.Decomposition`
(they sum, with the embedding and MLP terms, to ``encode_image``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from tqdm import tqdm

from .errors import InputError, StoreError
from .io import atomic_path

__all__ = [
    "Contributions",
    "gallery_contributions",
    "nearest",
    "cosine_topk",
    "factor_precision_at_k",
    "probe_accuracy",
    "parse_head",
]

HeadList = Optional[Sequence[tuple[int, int]]]


@dataclass
class Contributions:
    """Per-head direct contributions and full embeddings of ``N`` images.

    Attributes:
        heads: ``[N, L', H, D]`` contributions of the heads of ``layers`` (unnormalised).
        embeddings: ``[N, D]`` full image embeddings (``encode_image``, unnormalised).
        layers: the absolute layer indices of ``heads``' second axis.
        files: optional image paths, one per row.
        model: the model's name (for cache checks).
        n_model_layers: the model's number of layers (resolves negative layer indices;
            default ``max(layers) + 1``).
    """

    heads: torch.Tensor
    embeddings: torch.Tensor
    layers: tuple[int, ...]
    files: list[str] = field(default_factory=list)
    model: str = ""
    n_model_layers: int = 0

    def __post_init__(self) -> None:
        self.layers = tuple(int(l) for l in self.layers)
        if not self.n_model_layers:
            self.n_model_layers = max(self.layers) + 1 if self.layers else 0
        if self.heads.ndim != 4 or self.embeddings.ndim != 2 or self.heads.shape[0] != self.embeddings.shape[0]:
            raise InputError(f"heads must be [N, L', H, D] and embeddings [N, D]; got {list(self.heads.shape)} and {list(self.embeddings.shape)}.")
        if self.heads.shape[1] != len(self.layers):
            raise InputError(f"heads has {self.heads.shape[1]} layers but layers={list(self.layers)}.")
        if self.files and len(self.files) != len(self):
            raise InputError(f"{len(self.files)} files for {len(self)} rows.")

    def __len__(self) -> int:
        return int(self.heads.shape[0])

    def features(self, heads: HeadList = None) -> torch.Tensor:
        """``[N, D]``: the sum of the chosen heads' contributions, or the full embedding when
        ``heads`` is ``None``. ``heads`` holds ``(layer, head)`` pairs with absolute layer
        indices (or negative ones counted from the model's end, as stored in ``layers``)."""
        if heads is None:
            return self.embeddings
        heads = list(heads)
        if not heads:
            raise InputError("heads is empty; pass None for the full embedding.")
        pos = {l: i for i, l in enumerate(self.layers)}
        out = torch.zeros(self.heads.shape[0], self.heads.shape[-1], dtype=self.heads.dtype)
        for l, h in heads:
            key = l % self.n_model_layers if -self.n_model_layers <= l < 0 else l
            if key not in pos:
                raise InputError(f"layer {l} is not in this gallery's layers {list(self.layers)}.")
            if not 0 <= h < self.heads.shape[2]:
                raise InputError(f"head {h} is out of range [0, {self.heads.shape[2]}).")
            out = out + self.heads[:, pos[key], h]
        return out

    def save(self, path: Union[str, os.PathLike]) -> Path:
        """Write a ``.safetensors`` cache (atomically)."""
        from safetensors.torch import save_file

        path = Path(path)
        meta = {"layers": json.dumps(list(self.layers)), "files": json.dumps(self.files), "model": self.model,
                "n_model_layers": str(self.n_model_layers)}
        with atomic_path(path) as tmp:
            save_file({"heads": self.heads.contiguous(), "embeddings": self.embeddings.contiguous()}, str(tmp), metadata=meta)
        return path

    @staticmethod
    def load(path: Union[str, os.PathLike]) -> "Contributions":
        """Read a cache written by :meth:`save`."""
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise StoreError(f"contributions cache not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                heads, emb = f.get_tensor("heads"), f.get_tensor("embeddings")
            return Contributions(heads, emb, tuple(json.loads(meta["layers"])), json.loads(meta.get("files", "[]")),
                                 meta.get("model", ""), int(meta.get("n_model_layers", "0")))
        except Exception as e:  # SafetensorError, KeyError, OSError, JSON errors, bad shapes
            raise StoreError(f"{path} is not a clipdecomp contributions cache ({type(e).__name__}: {e}).") from e


def gallery_contributions(
    model: Any,
    batches: Iterable[Any],
    *,
    layers: Union[str, Sequence[int]] = "all",
    total: Optional[int] = None,
    files: Sequence[str] = (),
    progress: bool = True,
) -> Contributions:
    """Decompose image batches and keep the heads of ``layers`` and the embeddings.

    Args:
        model: a ``LoadedModel`` (or open_clip model / ``VisionTransformer``).
        batches: iterable of ``[B, 3, H, W]`` tensors (or ``(images, ...)`` loader batches).
        layers: ``"all"`` or layer indices.
        total: number of images, for the progress bar.
        files: optional paths, one per image.

    Returns:
        :class:`Contributions` (float32, CPU).
    """
    from .ablation import batch_images
    from .decomposition import decompose

    heads, embs, sel, L = [], [], None, 0
    with tqdm(total=total, desc="gallery", unit="img", dynamic_ncols=True, disable=not progress) as bar:
        for batch in batches:
            dec = decompose(model, batch_images(batch), token_layers=None)
            if sel is None:
                L = dec.layers
                if layers == "all":
                    sel = list(range(L))
                else:
                    if any(isinstance(l, bool) or not isinstance(l, int) or not -L <= l < L for l in layers):
                        raise InputError(f"layers must be 'all' or ints in [-{L}, {L}), got {layers!r}.")
                    sel = sorted({l % L for l in layers})
            heads.append(dec.heads[:, sel].float().cpu())
            embs.append(dec.total().float().cpu())
            bar.update(dec.batch_size)
    if not heads:
        raise InputError("no images: the batches were empty.")
    name = getattr(model, "name", type(model).__name__)
    return Contributions(torch.cat(heads), torch.cat(embs), tuple(sel), [str(f) for f in files], name, L)


def cosine_topk(
    queries: torch.Tensor,
    gallery: torch.Tensor,
    k: int,
    *,
    exclude_self: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``k`` gallery rows by cosine similarity.

    Args:
        queries: ``[Q, D]``; gallery: ``[N, D]``.
        exclude_self: the queries ARE the gallery (``Q == N``, row ``i`` = row ``i``); skip
            each query's own row (leave-one-out).

    Returns:
        ``(indices [Q, k] long, scores [Q, k])``, most similar first.
    """
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise InputError(f"queries [Q, D] and gallery [N, D] must share D; got {list(queries.shape)} and {list(gallery.shape)}.")
    n = gallery.shape[0] - (1 if exclude_self else 0)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
        raise InputError(f"k must be an int in [1, {n}], got {k!r}.")
    sims = F.normalize(queries.double(), dim=-1) @ F.normalize(gallery.double(), dim=-1).t()
    if exclude_self:
        if queries.shape[0] != gallery.shape[0]:
            raise InputError("exclude_self needs the queries to be the gallery (same number of rows).")
        sims.fill_diagonal_(float("-inf"))
    scores, idx = sims.topk(k, dim=-1)
    return idx, scores.to(queries.dtype)


def nearest(
    query: Contributions,
    gallery: Contributions,
    heads: HeadList = None,
    k: int = 8,
    *,
    center: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neighbours of each query image in the gallery.

    Args:
        query: contributions of ``Q`` query images (same model and layers as ``gallery``).
        heads: ``(layer, head)`` pairs whose summed contributions represent an image; ``None``
            for the full embedding.
        center: subtract the gallery mean of the representation from both sides first (a
            head's outputs share a large constant part that dominates raw cosines).

    Returns:
        ``(indices [Q, k], scores [Q, k])``, most similar first.
    """
    q, g = query.features(heads), gallery.features(heads)
    if center:
        mu = g.mean(0, keepdim=True)
        q, g = q - mu, g - mu
    return cosine_topk(q, g, k)


def factor_precision_at_k(
    features: torch.Tensor,
    labels: Union[torch.Tensor, Sequence[Any]],
    k: int,
    *,
    center: bool = False,
) -> float:
    """Leave-one-out precision@k of a factor: every image queries all the others; the mean
    fraction of its ``k`` nearest neighbours (cosine) that share its label.

    Args:
        features: ``[N, D]`` representations; labels: ``N`` labels (any hashable values).
        center: subtract the mean feature first.
    """
    labels = list(labels.tolist() if isinstance(labels, torch.Tensor) else labels)
    if len(labels) != features.shape[0]:
        raise InputError(f"{len(labels)} labels for {features.shape[0]} features.")
    codes = {v: i for i, v in enumerate(dict.fromkeys(labels))}
    y = torch.tensor([codes[v] for v in labels])
    x = features - features.mean(0, keepdim=True) if center else features
    idx, _ = cosine_topk(x, x, k, exclude_self=True)
    return float((y[idx] == y[:, None]).double().mean())


def probe_accuracy(
    train: torch.Tensor,
    train_labels: Sequence[Any],
    test: torch.Tensor,
    test_labels: Sequence[Any],
    *,
    ridge: float = 1e-2,
) -> torch.Tensor:
    """Held-out accuracy of a ridge-regression linear probe (one-hot targets, argmax), for
    every head at once.

    Args:
        train, test: ``[N, ..., D]`` features (e.g. ``Contributions.heads`` ``[N, L', H, D]``);
            each position of the middle axes gets its own probe.
        ridge: L2 penalty relative to the mean feature variance.

    Returns:
        ``[...]`` accuracies (e.g. ``[L', H]``).
    """
    classes = {v: i for i, v in enumerate(dict.fromkeys(list(train_labels) + list(test_labels)))}
    ytr = torch.tensor([classes[v] for v in train_labels])
    yte = torch.tensor([classes[v] for v in test_labels])
    if train.shape[0] != len(ytr) or test.shape[0] != len(yte) or train.shape[1:] != test.shape[1:]:
        raise InputError(f"features {list(train.shape)} / {list(test.shape)} do not match the labels ({len(ytr)} / {len(yte)}).")
    xtr = train.double().movedim(0, -2)  # [..., N, D]
    xte = test.double().movedim(0, -2)
    mu = xtr.mean(-2, keepdim=True)
    xtr, xte = xtr - mu, xte - mu
    ones_tr = torch.ones(*xtr.shape[:-1], 1, dtype=xtr.dtype)
    ones_te = torch.ones(*xte.shape[:-1], 1, dtype=xte.dtype)
    xtr, xte = torch.cat([xtr, ones_tr], -1), torch.cat([xte, ones_te], -1)
    Y = F.one_hot(ytr, len(classes)).double()  # [N, C]
    D1 = xtr.shape[-1]
    lam = ridge * xtr[..., :-1].pow(2).mean((-1, -2), keepdim=True) * xtr.shape[-2]
    gram = xtr.transpose(-1, -2) @ xtr + lam * torch.eye(D1, dtype=xtr.dtype)
    w = torch.linalg.solve(gram, xtr.transpose(-1, -2) @ Y)  # [..., D+1, C]
    pred = (xte @ w).argmax(-1)  # [..., N_test]
    return (pred == yte).double().mean(-1)


def parse_head(spec: str) -> tuple[int, int]:
    """``"L.H"`` (e.g. ``"5.2"`` or ``"-1.0"``) -> ``(layer, head)``."""
    try:
        l, h = spec.strip().split(".")
        return int(l), int(h)
    except ValueError as e:
        raise InputError(f"a head is written LAYER.HEAD (e.g. 5.2 or -1.0), got {spec!r}.") from e
