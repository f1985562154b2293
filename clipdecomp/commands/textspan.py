"""clipdecomp textspan: find a text basis for every attention head of the last layers.

    clipdecomp textspan --images DIR --out FILE.json                 # bundled toy model
    clipdecomp textspan --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --images DIR --pool general --layers 4 --k 60 --rank 80 --out FILE.json

Steps: embed the text pool with the model's text encoder (unit norm); decompose
every image under DIR (recursive, sorted; ``--max-images N`` draws a seeded random
subset) and keep, for each head of the last ``--layers`` layers, its *unnormalised*
direct contribution to the image embedding (``Decomposition.heads``: the parts that
sum to ``encode_image``, before the embedding is L2-normalised), as in the paper's
code; run TextSpan (:func:`clipdecomp.textspan.textspan`) on each head; assign
each head a role (:mod:`clipdecomp.roles`); write ``FILE.json`` + ``FILE.safetensors``
(:mod:`clipdecomp.textspan_results`) and print the table of roles.

Pools: ``general`` and ``words`` (``assets/pools/``), a text file (one description a
line, optional ``# category: NAME`` headers), or ``random``: ``--random-size``
unit Gaussian vectors drawn with ``--seed`` and named ``random 0``, ``random 1``, ...
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

from ..errors import ClipDecompError, InputError
from ..textspan_results import HeadSpan, TextSpanResults
from .common import add_model_arguments

__all__ = ["pool_embeddings", "head_contributions", "run_textspan", "main"]

DEFAULT_RANDOM_SIZE = 3000


def _positive(name: str, value: Any, low: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise InputError(f"{name} must be an int >= {low}, got {value!r}.")
    return value


def _load_text_pool(pool: str | os.PathLike):
    from ..pools import load_pool

    try:
        return load_pool(pool)
    except ValueError as e:  # pools raise plain ValueError
        raise InputError(f"{e} (or 'random' for the random baseline)") from e


def pool_embeddings(model: Any, pool: str, *, seed: int = 0, random_size: int = DEFAULT_RANDOM_SIZE,
                    batch_size: int = 256, progress: bool = True):
    """The pool's texts and unit-norm embeddings ``[T, D]``.

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel`.
        pool: ``"general"``, ``"words"``, ``"random"`` or a path to a text file.
        seed, random_size: the random pool's seed and size.

    Returns:
        ``(TextPool, embeddings [T, D] float32 on the model's device)``.
    """
    from tqdm.auto import tqdm

    from ..pools import random_pool_embeddings, random_text_pool
    from ..zeroshot import text_embeddings

    if not isinstance(pool, (str, os.PathLike)) or not os.fspath(pool).strip():
        raise InputError(f"pool must be 'general', 'words', 'random' or a text file, got {pool!r}.")
    if os.fspath(pool).strip() == "random":
        _positive("random_size", random_size)
        D = int(model.visual.output_dim)  # the joint space
        return random_text_pool(random_size), random_pool_embeddings(random_size, D, seed).to(model.device)
    text_pool = _load_text_pool(pool)
    chunks = []
    for i in tqdm(range(0, len(text_pool), batch_size), desc=f"embed pool {text_pool.name}", unit="batch",
                  disable=not progress):
        chunks.append(text_embeddings(model, text_pool.texts[i : i + batch_size], batch_size))
    return text_pool, torch.cat(chunks).float()


def head_contributions(model: Any, loader: Any, layers: list[int], *, progress: bool = True) -> torch.Tensor:
    """Unnormalised direct contributions of every head of ``layers`` over all images
    of ``loader`` ``[N, len(layers), H, D]`` (float32, CPU)."""
    from tqdm.auto import tqdm

    from ..ablation import batch_images
    from ..decomposition import decompose

    parts = []
    for batch in tqdm(loader, desc="decompose", unit="batch", disable=not progress):
        images = batch_images(batch).to(model.device)
        dec = decompose(model, images, token_layers=None)
        parts.append(dec.heads[:, layers].to("cpu", torch.float32))
    if not parts:
        raise InputError("the image loader yielded no images.")
    return torch.cat(parts)


def run_textspan(
    model: Any,
    images: str | os.PathLike,
    *,
    pool: str = "general",
    layers: int = 4,
    k: int = 60,
    rank: Optional[int] = 80,
    batch_size: int = 64,
    max_images: Optional[int] = None,
    seed: int = 0,
    random_size: int = DEFAULT_RANDOM_SIZE,
    model_spec: tuple[Optional[str], Optional[str]] | None = None,
    progress: bool = True,
) -> TextSpanResults:
    """TextSpan on every head of the last ``layers`` layers, with roles (not saved).

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel`.
        images: folder of images (recursive).
        pool: see :func:`pool_embeddings`.
        layers: how many of the last layers to analyse (1..L).
        k: texts per head (>= 1); rank: TextSpan rank reduction (``None``: none).
        batch_size, max_images, seed: image batching and the seeded random subset.
        model_spec: ``(name, pretrained)`` as given to ``load_model``, recorded in the
            results (default: ``model.name, model.pretrained``).

    Raises:
        InputError: bad numbers, an unknown pool, a missing or empty image folder.
    """
    from ..images import image_loader
    from ..roles import assign_roles
    from ..textspan import textspan

    from tqdm.auto import tqdm

    _positive("k", k)
    _positive("layers", layers)
    _positive("batch_size", batch_size)
    if rank is not None:
        _positive("rank", rank)
    n_layers = len(model.visual.transformer.resblocks)
    if layers > n_layers:
        raise InputError(f"layers={layers} but the model has {n_layers} layers (accepted: 1..{n_layers}).")
    layer_ids = list(range(n_layers - layers, n_layers))
    loader = image_loader(images, model.preprocess, batch_size, max_images=max_images, seed=seed)  # checks the folder
    text_pool, X = pool_embeddings(model, pool, seed=seed, random_size=random_size, progress=progress)
    C = head_contributions(model, loader, layer_ids, progress=progress)  # [N, nl, H, D]
    N, _, H, D = C.shape
    heads = []
    for li, h in tqdm([(li, h) for li in range(len(layer_ids)) for h in range(H)], desc="textspan", unit="head",
                      disable=not progress):
        r = textspan(C[:, li, h], X, k, rank)
        heads.append(HeadSpan.from_textspan(layer_ids[li], h, r, text_pool.texts, text_pool.categories))
    name, pretrained = model_spec if model_spec is not None else (model.name, model.pretrained)
    results = TextSpanResults(
        model=name, pretrained=pretrained, pool=text_pool.name, layers=layer_ids, k=k, rank=rank, n_images=N,
        seed=seed, embed_dim=D, heads=heads,
        info={
            "images": os.fspath(images),
            "n_texts": len(text_pool),
            "contributions": "unnormalised direct contributions of each head (Decomposition.heads)",
            "n_layers": n_layers,
        },
    )
    return assign_roles(results, categorised=len({c for c in text_pool.categories if c}) >= 2)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipdecomp textspan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    p.add_argument("--pool", default="general", help="general | words | random | FILE (default: general)")
    p.add_argument("--layers", type=int, default=4, help="analyse the heads of the last N layers (default 4)")
    p.add_argument("--k", type=int, default=60, help="texts per head (default 60)")
    p.add_argument("--rank", type=int, default=80, help="TextSpan rank reduction; 0 = none (default 80)")
    p.add_argument("--batch-size", type=int, default=64, help="images per forward pass (default 64)")
    p.add_argument("--max-images", type=int, default=None, help="use a random subset of N images (seeded)")
    p.add_argument("--seed", type=int, default=0, help="seed of the image subset and the random pool (default 0)")
    p.add_argument("--random-size", type=int, default=DEFAULT_RANDOM_SIZE,
                   help=f"size of the random pool (default {DEFAULT_RANDOM_SIZE})")
    p.add_argument("--out", type=Path, required=True, help="results FILE.json (FILE.safetensors is written beside it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars and no table")
    return p


def _check_args(args: argparse.Namespace) -> None:
    """Cheap checks of the command line, so mistakes show before the model loads."""
    from ..images import list_image_files

    if args.out.suffix != ".json":
        raise InputError(f"--out must name a .json file (the tensors go to FILE.safetensors), got {args.out}.")
    for name in ("k", "layers", "batch_size", "random_size"):
        _positive("--" + name.replace("_", "-"), getattr(args, name))
    if args.rank < 0:
        raise InputError(f"--rank must be >= 0 (0 = no rank reduction), got {args.rank}.")
    if args.max_images is not None:
        _positive("--max-images", args.max_images)
    if args.pool.strip() != "random":
        _load_text_pool(args.pool)
    list_image_files(args.images)


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..loading import load_model

        _check_args(args)  # before loading a possibly large model
        lm = load_model(args.model, args.pretrained, device=args.device)
        results = run_textspan(
            lm, args.images, pool=args.pool, layers=args.layers, k=args.k, rank=args.rank or None,
            batch_size=args.batch_size, max_images=args.max_images, seed=args.seed, random_size=args.random_size,
            model_spec=(args.model, args.pretrained), progress=not args.quiet,
        )
        path = results.save(args.out)
    except ClipDecompError as e:
        print(f"clipdecomp textspan: error: {e}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(results.format_table())
    print(f"wrote {path} and {path.with_suffix('.safetensors')}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
