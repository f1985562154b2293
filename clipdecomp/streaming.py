"""Decompose a whole dataset to disk in resumable safetensors shards.

Layout of ``out_dir``::

    manifest.json                 model, parts, per-image shapes, shards, completeness
    shard-00000.safetensors       parts of images [0, shard_size)
    shard-00001.safetensors       ...

Every file is written under a temporary name (``.tmp-<name>``) and moved into place
with :func:`os.replace`, so a crash never leaves a half-written shard or manifest
under its final name. The manifest is rewritten after each shard.

Resuming: rerunning :func:`decompose_to_disk` on the same ``out_dir`` keeps the shards
listed in the manifest and continues after them. This requires the loader to yield
the same images in the same order on every run (no shuffling, no random
augmentation): a ``DataLoader`` with a ``RandomSampler`` is refused, and for every
kept shard the SHA-1 of its first image (stored in the manifest, with the shard's
first/last sample index) is checked against the rerun's images, raising
:class:`~clipdecomp.errors.StoreError` on a mismatch. Already decomposed images are
read from the loader again but not decomposed.

Memory stays bounded: at most one shard (plus one batch) of results is held; nothing
accumulates across shards.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Sequence, Union

import torch

from .ablation import batch_images
from .decomposition import Decomposition, decompose
from .errors import InputError, StoreError
from .io import atomic_write_bytes, remove_stale_temporaries

__all__ = ["decompose_to_disk", "DecompositionStore", "PARTS", "MANIFEST_NAME"]

MANIFEST_NAME = "manifest.json"
FORMAT = "clipdecomp-shards"
FORMAT_VERSION = 1
#: Parts that can be stored, per image: embed [D], mlps [L, D], heads [L, H, D], total [D], norm [].
PARTS = ("embed", "mlps", "heads", "total", "norm")


def _shard_name(i: int) -> str:
    return f"shard-{i:05d}.safetensors"


def _atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    from safetensors.torch import save

    atomic_write_bytes(path, save({k: v.contiguous() for k, v in tensors.items()}, metadata=metadata))


def _write_manifest(out: Path, manifest: dict) -> None:
    atomic_write_bytes(out / MANIFEST_NAME, json.dumps(manifest, indent=2).encode("utf-8"))


def _image_sha1(image: torch.Tensor) -> str:
    t = image.detach().to("cpu").contiguous()
    return hashlib.sha1(str(t.dtype).encode() + str(tuple(t.shape)).encode() + t.numpy().tobytes()).hexdigest()


def _batch_labels(batch: Any) -> Optional[torch.Tensor]:
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        lab = batch[1]
        if isinstance(lab, torch.Tensor) and lab.ndim == 1 and not lab.is_floating_point():
            return lab.to(torch.int64)
    if isinstance(batch, dict):
        for key in ("label", "labels"):
            lab = batch.get(key)
            if isinstance(lab, torch.Tensor) and lab.ndim == 1 and not lab.is_floating_point():
                return lab.to(torch.int64)
    return None


def _check_loader_order(loader: Any) -> None:
    from torch.utils.data import DataLoader, RandomSampler

    if isinstance(loader, DataLoader):
        sampler = loader.sampler
        if isinstance(sampler, RandomSampler) or isinstance(getattr(loader.batch_sampler, "sampler", None), RandomSampler):
            raise InputError(
                "the DataLoader shuffles (RandomSampler); decompose_to_disk needs a deterministic order "
                "to resume: use shuffle=False and no random augmentation."
            )


def _part_tensors(dec: Decomposition, parts: Sequence[str]) -> dict[str, torch.Tensor]:
    out = {}
    for p in parts:
        t = dec.total() if p == "total" else getattr(dec, p)
        out[p] = t.detach().to("cpu")
    return out


def _model_name(model: Any) -> str:
    name = getattr(model, "name", None)
    return name if isinstance(name, str) else type(model).__name__


class DecompositionStore:
    """Lazy reader of a folder written by :func:`decompose_to_disk`.

    ``len(store)`` is the number of stored images; ``store.load(part)`` concatenates one
    part over all shards (``[n, *shape]``); iterating yields one dict of tensors per shard.
    """

    def __init__(self, out_dir: Union[str, os.PathLike]) -> None:
        self.path = Path(out_dir)
        mpath = self.path / MANIFEST_NAME
        if not mpath.is_file():
            raise StoreError(f"{self.path} has no {MANIFEST_NAME}; not a decompose_to_disk folder.")
        try:
            self.manifest: dict = json.loads(mpath.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as e:
            raise StoreError(f"cannot read {mpath}: {e}") from e
        if self.manifest.get("format") != FORMAT:
            raise StoreError(f"{mpath} is not a {FORMAT} manifest (format={self.manifest.get('format')!r}).")

    def __len__(self) -> int:
        return int(self.manifest["num_images"])

    @property
    def parts(self) -> tuple[str, ...]:
        """Stored parts (plus ``"labels"`` if the loader yielded labels)."""
        return tuple(self.manifest["parts"]) + (("labels",) if self.manifest.get("has_labels") else ())

    @property
    def shapes(self) -> dict[str, list[int]]:
        """Per-image shape of every stored part."""
        return dict(self.manifest["shapes"])

    @property
    def complete(self) -> bool:
        """Whether the loader was exhausted (``False`` for an interrupted run)."""
        return bool(self.manifest.get("complete"))

    @property
    def model(self) -> str:
        return self.manifest["model"]

    @property
    def shard_files(self) -> list[Path]:
        return [self.path / s["file"] for s in self.manifest["shards"]]

    def _check_part(self, part: str) -> None:
        if part not in self.parts:
            raise InputError(f"part {part!r} is not stored here; stored parts: {list(self.parts)}.")

    def load(self, part: str) -> torch.Tensor:
        """One part over all images ``[len(self), *shape]`` (reads only that tensor)."""
        from safetensors import safe_open

        self._check_part(part)
        chunks = []
        for f in self.shard_files:
            with safe_open(str(f), framework="pt") as sf:
                chunks.append(sf.get_tensor(part))
        if not chunks:
            shape = [] if part == "labels" else self.shapes.get(part, [])
            return torch.empty(0, *shape)
        return torch.cat(chunks)

    def iter_shards(self, parts: Optional[Sequence[str]] = None) -> Iterator[dict[str, torch.Tensor]]:
        """Yield ``{part: tensor [n_shard, *shape]}`` for each shard, in order."""
        from safetensors import safe_open

        parts = list(self.parts if parts is None else parts)
        for p in parts:
            self._check_part(p)
        for f in self.shard_files:
            with safe_open(str(f), framework="pt") as sf:
                yield {p: sf.get_tensor(p) for p in parts}

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.iter_shards()

    def __repr__(self) -> str:
        return (
            f"DecompositionStore({str(self.path)!r}, images={len(self)}, parts={list(self.parts)}, "
            f"shards={len(self.manifest['shards'])}, complete={self.complete})"
        )


def _valid_shards(out: Path, shards: list[dict]) -> list[dict]:
    """Listed shards whose file exists and has a readable header, up to the first bad one."""
    from safetensors import safe_open

    kept, expect_first = [], 0
    for s in shards:
        f = out / s["file"]
        try:
            with safe_open(str(f), framework="pt") as sf:
                sf.keys()
        except Exception:
            break
        if s["first"] != expect_first:
            break
        kept.append(s)
        expect_first = s["last"] + 1
    return kept


def decompose_to_disk(
    model: Any,
    loader: Iterable[Any],
    out_dir: Union[str, os.PathLike],
    *,
    parts: Sequence[str] = ("embed", "mlps", "heads"),
    shard_size: int = 256,
    progress: bool = True,
    device: Optional[Union[str, torch.device]] = None,
) -> DecompositionStore:
    """Decompose every image of ``loader`` and write the chosen parts to ``out_dir``.

    Args:
        model: anything :func:`~clipdecomp.decomposition.decompose` accepts.
        loader: a deterministic, unshuffled iterable of image batches ``[B, 3, H, W]``
            or ``(images, labels)`` tuples (integer labels are stored as ``"labels"``).
        out_dir: target folder (created). Rerunning on it resumes after the stored shards.
        parts: any of :data:`PARTS`.
        shard_size: images per shard (the last shard may be smaller).
        progress: show a tqdm progress bar.
        device: move batches there (default: the model's device).

    Returns:
        A :class:`DecompositionStore` on ``out_dir``.

    Raises:
        InputError: bad parts / shard_size, or a shuffling DataLoader.
        StoreError: ``out_dir`` holds results of another run (model, parts, shard size), or
            the loader's images differ from the stored ones (non-deterministic loader).
    """
    from tqdm.auto import tqdm

    parts = list(parts)
    if not parts or any(p not in PARTS for p in parts) or len(set(parts)) != len(parts):
        raise InputError(f"parts must be distinct names from {list(PARTS)}, got {parts!r}.")
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise InputError(f"shard_size must be a positive int, got {shard_size!r}.")
    _check_loader_order(loader)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out)

    name = _model_name(model)
    manifest: Optional[dict] = None
    if (out / MANIFEST_NAME).is_file():
        manifest = DecompositionStore(out).manifest
        theirs = (manifest.get("model"), manifest.get("parts"), manifest.get("shard_size"))
        if theirs != (name, parts, shard_size):
            raise StoreError(
                f"{out} holds results of another run (model={theirs[0]!r}, parts={theirs[1]}, "
                f"shard_size={theirs[2]}) but this run has model={name!r}, parts={parts}, "
                f"shard_size={shard_size}. Use a new folder or delete this one."
            )
        manifest["shards"] = _valid_shards(out, manifest["shards"])
        if manifest.get("complete") and len(manifest["shards"]) == manifest.get("num_shards_final"):
            return DecompositionStore(out)
        manifest["complete"] = False
    else:
        manifest = {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "model": name,
            "parts": parts,
            "shard_size": shard_size,
            "shapes": {},
            "dtype": None,
            "has_labels": None,
            "num_images": 0,
            "complete": False,
            "shards": [],
        }
    manifest["num_images"] = sum(s["count"] for s in manifest["shards"])
    done = manifest["num_images"]
    # first-image hashes of the kept shards, to verify the loader replays the same images
    expected = {s["first"]: s["first_sha1"] for s in manifest["shards"]}

    buffer: list[dict[str, torch.Tensor]] = []
    buffered = 0
    pending_sha1: list[str] = []  # first-image hashes of the shards being filled, in order

    def flush(n: int) -> None:
        nonlocal buffer, buffered
        cat = {k: torch.cat([b[k] for b in buffer]) for k in buffer[0]}
        i = len(manifest["shards"])
        first = manifest["num_images"]
        fname = _shard_name(i)
        _atomic_save_tensors(
            out / fname, {k: v[:n] for k, v in cat.items()}, {"format": FORMAT, "first": str(first), "count": str(n)}
        )
        manifest["shards"].append(
            {"file": fname, "first": first, "last": first + n - 1, "count": n, "first_sha1": pending_sha1.pop(0)}
        )
        manifest["num_images"] = first + n
        _write_manifest(out, manifest)
        rest = {k: v[n:].clone() for k, v in cat.items()}  # do not keep `cat` alive
        buffer = [rest] if buffered > n else []
        buffered -= n

    pos = 0  # global index of the batch's first image
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, disable=not progress, desc="decompose", unit="batch"):
        images = batch_images(batch)
        labels = _batch_labels(batch)
        nb = images.shape[0]
        if labels is not None and labels.shape[0] != nb:
            raise InputError(f"a batch has {nb} images but {labels.shape[0]} labels.")
        if manifest["has_labels"] is None:
            manifest["has_labels"] = labels is not None
        elif manifest["has_labels"] != (labels is not None):
            raise StoreError("the loader yields labels in some batches but not in others (or not as in the stored run).")
        for first, sha in expected.items():  # verify replayed images of the kept shards
            if pos <= first < pos + nb and _image_sha1(images[first - pos]) != sha:
                raise StoreError(
                    f"image #{first} differs from the one stored in {out} by an earlier run: the loader is not "
                    "deterministic (shuffling or random augmentation?). Use an unshuffled loader with the eval "
                    "transform, or a new folder."
                )
        if pos + nb <= done:  # already on disk
            pos += nb
            continue
        skip = max(0, done - pos)
        images = images[skip:]
        labels = labels[skip:] if labels is not None else None
        for i in range(images.shape[0]):
            if (pos + skip + i - done) % shard_size == 0:
                pending_sha1.append(_image_sha1(images[i]))
        if device is not None:
            images = images.to(device)
        dec = decompose(model, images, token_layers=None)
        res = _part_tensors(dec, parts)
        if labels is not None:
            res["labels"] = labels.cpu()
        if not manifest["shapes"]:
            manifest["shapes"] = {k: list(v.shape[1:]) for k, v in res.items() if k != "labels"}
            manifest["dtype"] = str(dec.dtype).replace("torch.", "")
        del dec
        buffer.append(res)
        buffered += images.shape[0]
        pos += nb
        while buffered >= shard_size:
            flush(shard_size)
    if buffered > 0:
        flush(buffered)
    manifest["complete"] = True
    manifest["num_shards_final"] = len(manifest["shards"])
    _write_manifest(out, manifest)
    return DecompositionStore(out)
