"""clipdecomp decompose: decompose every image of a folder into safetensors shards.

    clipdecomp decompose --images DIR --out STORE                       # bundled toy model
    clipdecomp decompose --model ViT-B-16 --pretrained laion2b_s34b_b88k --images DIR --out STORE

Writes ``STORE/shard-00000.safetensors``, ... and ``STORE/manifest.json``, each
file under a temporary name first and then renamed into place. Rerunning the same
command on an interrupted store resumes after the last complete shard. Images are
read in sorted file order (recursive), so the shards line up with ``manifest.json``.
Read the result back with ``clipdecomp.DecompositionStore(STORE).load("heads")``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..errors import ClipDecompError
from ..streaming import PARTS
from .common import add_model_arguments, load_from_args


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipdecomp decompose", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(parser)
    parser.add_argument("--images", type=Path, required=True, help="folder of images (searched recursively)")
    parser.add_argument("--out", type=Path, required=True, help="output folder (created; resumed if it holds shards)")
    parser.add_argument("--parts", default="embed,mlps,heads", help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=256, help="images per shard")
    parser.add_argument("--max-images", type=int, default=None, help="a seeded random subset of this size")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    parts = tuple(p.strip() for p in args.parts.split(",") if p.strip())
    try:
        from ..images import image_loader
        from ..streaming import decompose_to_disk

        unknown = [p for p in parts if p not in PARTS]
        if unknown or not parts:
            raise ClipDecompError(f"--parts: unknown part(s) {unknown}; accepted: {', '.join(PARTS)}")
        model = load_from_args(args)
        loader = image_loader(args.images, model.preprocess, args.batch_size, max_images=args.max_images, seed=args.seed)
        store = decompose_to_disk(model, loader, args.out, parts=parts, shard_size=args.shard_size)
    except ClipDecompError as e:
        print(f"clipdecomp decompose: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {len(store)} images to {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
