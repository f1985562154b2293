"""The TextSpan results file: per-head text bases, roles and the run's settings.

Written by ``clipdecomp textspan`` (:mod:`clipdecomp.commands.textspan`), read by the
demo, the repair tool and :mod:`clipdecomp.roles`. Two files side by side::

    FILE.json          settings (model, pretrained, pool, layers, k, rank, n_images,
                       seed, ...) and per head: layer, head, texts (in the order
                       TextSpan chose them), their pool categories and pool rows,
                       explained_variance, cumulative_fraction, total_variance,
                       role, role_score, top_roles
    FILE.safetensors   per head ``L{l}.H{h}.basis [k_lh, D]`` (the orthonormal
                       TextSpan directions, in order) and ``L{l}.H{h}.mean [D]``
                       (the head's mean output over the images), float32

``k_lh <= k``: TextSpan stops early when no usable text is left. Layers are
absolute indices (0 = first layer). Both files are written atomically (tensors
first); the JSON records a SHA-256 of the tensors, so a pair that was not written
together is refused on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from .errors import InputError
from .io import atomic_path, atomic_write_text

__all__ = ["FORMAT", "FORMAT_VERSION", "HeadSpan", "TextSpanResults", "tensors_path"]

FORMAT = "clipdecomp-textspan-results"
FORMAT_VERSION = 1


def tensors_path(json_path: str | os.PathLike) -> Path:
    """The ``.safetensors`` file that goes with a results ``.json`` file."""
    return Path(json_path).with_suffix(".safetensors")


def _json_path(path: str | os.PathLike) -> Path:
    p = Path(path).expanduser()
    if p.suffix == ".safetensors":
        p = p.with_suffix(".json")
    if p.suffix != ".json":
        raise InputError(
            f"TextSpan results are named FILE.json (with FILE.safetensors beside it), got {str(path)!r}."
        )
    return p


@dataclass
class HeadSpan:
    """TextSpan result of one head.

    Attributes:
        layer, head: absolute layer index and head index.
        texts: the chosen texts, in order; ``categories[i]`` is the pool category of
            ``texts[i]`` and ``indices[i]`` its row in the pool.
        explained_variance: ``[k_lh]`` variance added by each text's direction.
        cumulative_fraction: ``[k_lh]`` running sum of ``explained_variance`` over
            ``total_variance``.
        total_variance: trace of the covariance of the head's outputs.
        role, role_score: the head's role and its confidence in ``[0, 1]`` (see
            :mod:`clipdecomp.roles`); ``""`` and ``0.0`` before roles are assigned.
        top_roles: ``(role, share)`` pairs, highest share first.
        basis: ``[k_lh, D]`` orthonormal directions, in the order chosen.
        mean: ``[D]`` mean output of the head over the images.
    """

    layer: int
    head: int
    texts: list[str]
    categories: list[str]
    indices: list[int]
    explained_variance: list[float]
    cumulative_fraction: list[float]
    total_variance: float
    basis: torch.Tensor
    mean: torch.Tensor
    role: str = ""
    role_score: float = 0.0
    top_roles: list[tuple[str, float]] = field(default_factory=list)

    def __post_init__(self) -> None:
        k = len(self.texts)
        lengths = {
            "categories": len(self.categories),
            "indices": len(self.indices),
            "explained_variance": len(self.explained_variance),
            "cumulative_fraction": len(self.cumulative_fraction),
            "basis rows": int(self.basis.shape[0]) if self.basis.ndim == 2 else -1,
        }
        bad = {n: v for n, v in lengths.items() if v != k}
        if bad:
            raise InputError(f"head L{self.layer}.H{self.head}: {k} texts but {bad} (must all be {k}; basis [k, D]).")
        if self.mean.ndim != 1 or self.basis.shape[1] != self.mean.shape[0]:
            raise InputError(
                f"head L{self.layer}.H{self.head}: basis {list(self.basis.shape)} and mean "
                f"{list(self.mean.shape)} do not match (expected [k, D] and [D])."
            )

    @classmethod
    def from_textspan(cls, layer: int, head: int, result: Any, texts: Sequence[str],
                      categories: Sequence[str]) -> "HeadSpan":
        """Build from a :class:`~clipdecomp.textspan.TextSpanResult` whose indices are rows
        of ``texts`` / ``categories`` (the pool). The role is left empty."""
        idx = [int(i) for i in result.indices]
        return cls(
            layer=int(layer), head=int(head), texts=[texts[i] for i in idx], categories=[categories[i] for i in idx],
            indices=idx, explained_variance=[float(v) for v in result.explained_variance],
            cumulative_fraction=[float(v) for v in result.cumulative_fraction],
            total_variance=float(result.total_variance),
            basis=result.basis.detach().to("cpu", torch.float32), mean=result.mean.detach().to("cpu", torch.float32),
        )

    @property
    def key(self) -> tuple[int, int]:
        """``(layer, head)``."""
        return (self.layer, self.head)

    @property
    def k(self) -> int:
        """Number of texts chosen for this head."""
        return len(self.texts)

    def reconstruct(self, contributions: torch.Tensor, k: Optional[int] = None,
                    center: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Projection of ``contributions [N, D]`` onto ``center + span(basis[:k])``
        (``center`` defaults to :attr:`mean`; ``k`` to all directions) ``-> [N, D]``."""
        k = self.k if k is None else k
        if not 0 <= k <= self.k:
            raise InputError(f"k must be in [0, {self.k}] for head L{self.layer}.H{self.head}, got {k}.")
        c = self.mean if center is None else center
        dt = torch.promote_types(contributions.dtype, torch.float32)
        b = self.basis[:k].to(contributions.device, dt)
        c = c.to(contributions.device, dt)
        return c + ((contributions.to(dt) - c) @ b.T) @ b


def _tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for key in sorted(tensors):
        t = tensors[key].detach().cpu().contiguous()
        h.update(key.encode())
        h.update(str(list(t.shape)).encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def _finite(x: float) -> float:
    x = float(x)
    if not math.isfinite(x):
        raise InputError(f"non-finite value {x} in TextSpan results.")
    return x


@dataclass
class TextSpanResults:
    """TextSpan results of many heads with the settings that produced them.

    Attributes:
        model, pretrained: what ``load_model`` was given, so ``load_model(model, pretrained)``
            reloads it (``model=None``: the bundled toy model).
        pool: the text pool (``"general"``, ``"words"``, ``"random"`` or a file name).
        layers: absolute indices of the analysed layers.
        k, rank: TextSpan settings (``rank=None``: no rank reduction).
        n_images, seed: number of images and the seed of the image subset / random pool.
        embed_dim: ``D``.
        heads: one :class:`HeadSpan` per (layer, head), sorted by (layer, head).
        info: free-form settings (image folder, contribution type, role method, ...).
    """

    model: Optional[str]
    pretrained: Optional[str]
    pool: str
    layers: list[int]
    k: int
    rank: Optional[int]
    n_images: int
    seed: int
    embed_dim: int
    heads: list[HeadSpan]
    info: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.heads = sorted(self.heads, key=lambda h: h.key)
        keys = [h.key for h in self.heads]
        if len(set(keys)) != len(keys):
            raise InputError("TextSpan results list a (layer, head) twice.")
        for h in self.heads:
            if h.layer not in self.layers:
                raise InputError(f"head L{h.layer}.H{h.head} is not in the analysed layers {self.layers}.")
            if h.basis.shape[1] != self.embed_dim:
                raise InputError(f"head L{h.layer}.H{h.head} has D={h.basis.shape[1]}, results say {self.embed_dim}.")
        self._index = {h.key: h for h in self.heads}

    def head(self, layer: int, head: int) -> HeadSpan:
        """The result of head ``head`` of (absolute) layer ``layer``."""
        try:
            return self._index[(int(layer), int(head))]
        except KeyError:
            raise InputError(
                f"no TextSpan result for layer {layer}, head {head}; these results cover layers "
                f"{self.layers}, heads 0..{self.n_heads - 1}."
            ) from None

    @property
    def n_heads(self) -> int:
        """Heads per layer (the largest head index + 1)."""
        return 1 + max((h.head for h in self.heads), default=-1)

    def table(self, n_texts: int = 5) -> list[dict[str, Any]]:
        """Rows for display: ``{"layer", "head", "role", "score", "texts"}`` (first ``n_texts`` texts)."""
        return [
            {"layer": h.layer, "head": h.head, "role": h.role, "score": h.role_score, "texts": h.texts[:n_texts]}
            for h in self.heads
        ]

    def format_table(self, n_texts: int = 5) -> str:
        """:meth:`table` as aligned plain text."""
        rows = self.table(n_texts)
        width = max([len("role")] + [len(r["role"]) for r in rows])
        lines = [f"{'layer':>5} {'head':>4}  {'role':<{width}}  {'score':>5}  top texts"]
        for r in rows:
            texts = " | ".join(r["texts"])
            lines.append(f"{r['layer']:>5} {r['head']:>4}  {r['role']:<{width}}  {r['score']:>5.2f}  {texts}")
        return "\n".join(lines)

    # ------------------------------------------------------------------ files
    def _tensors(self) -> dict[str, torch.Tensor]:
        out = {}
        for h in self.heads:
            out[f"L{h.layer}.H{h.head}.basis"] = h.basis.detach().to("cpu", torch.float32).contiguous()
            out[f"L{h.layer}.H{h.head}.mean"] = h.mean.detach().to("cpu", torch.float32).contiguous()
        return out

    def to_json(self) -> dict[str, Any]:
        """The JSON document (without the tensors)."""
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": self.model,
            "pretrained": self.pretrained,
            "pool": self.pool,
            "layers": [int(x) for x in self.layers],
            "k": int(self.k),
            "rank": None if self.rank is None else int(self.rank),
            "n_images": int(self.n_images),
            "seed": int(self.seed),
            "embed_dim": int(self.embed_dim),
            "info": self.info,
            "tensors_sha256": _tensor_digest(self._tensors()),
            "heads": [
                {
                    "layer": h.layer,
                    "head": h.head,
                    "role": h.role,
                    "role_score": _finite(h.role_score),
                    "top_roles": [{"role": r, "share": _finite(s)} for r, s in h.top_roles],
                    "texts": list(h.texts),
                    "categories": list(h.categories),
                    "indices": [int(i) for i in h.indices],
                    "explained_variance": [_finite(v) for v in h.explained_variance],
                    "cumulative_fraction": [_finite(v) for v in h.cumulative_fraction],
                    "total_variance": _finite(h.total_variance),
                }
                for h in self.heads
            ],
        }

    def save(self, path: str | os.PathLike) -> Path:
        """Write ``FILE.json`` and ``FILE.safetensors`` atomically; returns the JSON path."""
        from safetensors.torch import save_file

        jpath = _json_path(path)
        doc = self.to_json()
        tensors = self._tensors()
        with atomic_path(tensors_path(jpath)) as tmp:
            save_file(tensors, str(tmp), metadata={"format": FORMAT, "sha256": doc["tensors_sha256"]})
        atomic_write_text(jpath, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
        return jpath

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TextSpanResults":
        """Read results written by :meth:`save` (``path``: the .json or the .safetensors file).

        Raises:
            InputError: a file is missing, unreadable, not TextSpan results, or the two
                files were not written together.
        """
        jpath = _json_path(path)
        tpath = tensors_path(jpath)
        hint = "write them with `clipdecomp textspan ... --out FILE.json`"
        if not jpath.is_file():
            raise InputError(f"TextSpan results not found: {jpath} ({hint}).")
        if not tpath.is_file():
            raise InputError(f"{jpath} has no tensors file beside it: expected {tpath} ({hint}).")
        try:
            doc = json.loads(jpath.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InputError(f"{jpath} is not valid JSON ({e}); the file is corrupt, {hint}.") from e
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise InputError(f"{jpath} is not a TextSpan results file (format {FORMAT!r} expected).")
        if doc.get("version") != FORMAT_VERSION:
            raise InputError(f"{jpath} has format version {doc.get('version')!r}; this clipdecomp reads {FORMAT_VERSION}.")
        tensors = _read_tensors(tpath)
        if _tensor_digest(tensors) != doc.get("tensors_sha256"):
            raise InputError(f"{tpath} does not belong to {jpath} (tensor checksum differs); rerun, {hint}.")
        try:
            heads = []
            for h in doc["heads"]:
                l, hh = int(h["layer"]), int(h["head"])
                heads.append(HeadSpan(
                    layer=l, head=hh, texts=list(h["texts"]), categories=list(h["categories"]),
                    indices=[int(i) for i in h["indices"]],
                    explained_variance=[float(v) for v in h["explained_variance"]],
                    cumulative_fraction=[float(v) for v in h["cumulative_fraction"]],
                    total_variance=float(h["total_variance"]),
                    basis=tensors[f"L{l}.H{hh}.basis"], mean=tensors[f"L{l}.H{hh}.mean"],
                    role=str(h["role"]), role_score=float(h["role_score"]),
                    top_roles=[(str(r["role"]), float(r["share"])) for r in h["top_roles"]],
                ))
            return cls(
                model=doc["model"], pretrained=doc["pretrained"], pool=str(doc["pool"]),
                layers=[int(x) for x in doc["layers"]], k=int(doc["k"]),
                rank=None if doc["rank"] is None else int(doc["rank"]), n_images=int(doc["n_images"]),
                seed=int(doc["seed"]), embed_dim=int(doc["embed_dim"]), heads=heads, info=dict(doc.get("info") or {}),
            )
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, InputError):
                raise
            raise InputError(f"{jpath} is missing or has a malformed entry ({type(e).__name__}: {e}).") from e


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            if (f.metadata() or {}).get("format") != FORMAT:
                raise InputError(f"{path} is not a TextSpan tensors file (metadata format {FORMAT!r} expected).")
            return {k: f.get_tensor(k) for k in f.keys()}
    except InputError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated / garbage files
        raise InputError(f"cannot read {path} ({type(e).__name__}: {e}); the file is corrupt.") from e

