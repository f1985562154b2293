"""clipdecomp segment-eval: zero-shot segmentation on gtsegs_ijcv.mat, ours vs baselines.

    clipdecomp segment-eval --data toy/segmentation/gtsegs_ijcv.mat --classes toy --out runs/seg
    clipdecomp segment-eval --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --data gtsegs_ijcv.mat --classes imagenet --layers all --out runs/seg-b16

For each image: the same square crop for image and mask, the model's zero-shot class over
--classes, a heatmap per method (ours = per-patch direct contributions of the --layers,
predicted class minus the mean over classes; raw_attention; rollout; gradcam), bilinear
upsampling to the mask, binarisation at the mean, then pixel accuracy / mIoU / mAP over the
set. Writes OUT/table.md, OUT/table.csv and OUT/results.json (atomically) and prints the table.

--classes: 'toy' (the toy shapes, each the mean of the toy world's prompt ensemble),
'imagenet' (1000 classes x 80 OpenAI templates), or a text file with one class name a line
(used with --templates).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from ..errors import ClipDecompError, InputError
from .common import add_model_arguments, load_from_args
from .heatmap import parse_layers

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipdecomp segment-eval", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_model_arguments(p)
    p.add_argument("--data", type=Path, required=True, help="gtsegs_ijcv.mat (ImageNet-segmentation layout)")
    p.add_argument("--classes", default="toy", help="'toy', 'imagenet' or a text file of class names (default: toy)")
    p.add_argument("--templates", choices=("openai", "simple"), default="openai",
                   help="prompts for 'imagenet' / a class file: OpenAI's 80 templates or 'a photo of a {}.'")
    p.add_argument("--layers", default="all", help="layers ours sums over: 'all', 'lastN' or comma-separated indices")
    p.add_argument("--methods", default="ours,raw_attention,rollout,gradcam", help="comma-separated subset")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--limit", type=int, default=None, help="only the first N images")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from ..experiments.segmentation import class_set, evaluate_segmentation, table_markdown, write_results

        if args.batch_size < 1:
            raise InputError(f"--batch-size must be >= 1, got {args.batch_size}.")
        if args.limit is not None and args.limit < 1:
            raise InputError(f"--limit must be >= 1, got {args.limit}.")
        methods = [m.strip() for m in args.methods.split(",") if m.strip()]
        lm = load_from_args(args)
        layers = parse_layers(args.layers, len(lm.visual.transformer.resblocks))
        templates = ["a photo of a {}."] if args.templates == "simple" else None
        classes = class_set(lm, args.classes, templates)
        result = evaluate_segmentation(
            lm, args.data, classes, methods=methods, layers=layers, batch_size=args.batch_size,
            limit=args.limit, progress=not args.quiet,
        )
        paths = write_results(result, args.out)
    except ClipDecompError as e:
        print(f"clipdecomp segment-eval: error: {e}", file=sys.stderr)
        return 2
    print(table_markdown(result["metrics"]), end="")
    print(f"wrote {paths['markdown']}, {paths['csv']}, {paths['json']}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
