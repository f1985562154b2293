"""Benchmark: text heatmaps for one image (decompose + per-patch scores).

Times, for one preprocessed image, ``decompose(model, x, token_layers="all")`` followed by
``text_heatmaps(dec, texts, normalizer=classes)`` (the segmentation protocol's map: every
layer and head, class token excluded, minus the mean over a class set), on

* the bundled toy model (``assets/toyclip``; a random-init ``toyclip-vit`` if it is
  missing), target < 0.3 s;
* a random-init ViT-B-16 (224 px, 12 layers, 196 patches), target < 2 s.

Text embeddings are computed once beforehand (not timed: they are shared by all images);
the median of ``--repeats`` runs after one warm-up is reported. Timings depend on other
processes using the CPU at the same time.

    python bench/bench_heatmap.py [--repeats 5] [--texts 3] [--classes 1000] [--threads 0]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without install
from clipdecomp.decomposition import decompose  # noqa: E402
from clipdecomp.heatmaps import text_heatmaps  # noqa: E402
from clipdecomp.loading import bundled_model_dir, load_model  # noqa: E402


def load(which: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if which == "toy":
            if (bundled_model_dir() / "open_clip_model.safetensors").is_file():
                return load_model(), "bundled toy model"
            from clipdecomp.registry import register_model_configs

            register_model_configs()
            return load_model("toyclip-vit"), "random-init toyclip-vit (bundled model missing)"
        torch.manual_seed(0)
        return load_model("ViT-B-16"), "random-init ViT-B-16"


def bench(lm, n_texts: int, n_classes: int, repeats: int) -> tuple[list[float], list[float], tuple[int, ...]]:
    """Times of (decompose + heatmaps) and, for reference, of a plain ``encode_image``."""
    h, w = lm.image_size
    x = torch.randn(1, 3, h, w)
    D = lm.clip.text_projection.shape[1] if hasattr(lm.clip, "text_projection") else lm.clip.visual.output_dim
    g = torch.Generator().manual_seed(0)
    texts = F.normalize(torch.randn(n_texts, D, generator=g), dim=-1)
    classes = F.normalize(torch.randn(n_classes, D, generator=g), dim=-1)
    times, ref = [], []
    for i in range(repeats + 1):
        t0 = time.perf_counter()
        with torch.no_grad():
            lm.clip.encode_image(x)
        t1 = time.perf_counter()
        dec = decompose(lm, x, token_layers="all")
        maps = text_heatmaps(dec, texts, normalizer=classes)
        t2 = time.perf_counter()
        if i:  # first run is warm-up
            ref.append(t1 - t0)
            times.append(t2 - t1)
    return times, ref, tuple(maps.shape)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--texts", type=int, default=3, help="texts to map")
    p.add_argument("--classes", type=int, default=1000, help="size of the normaliser class set")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--skip-vit", action="store_true", help="only the toy model")
    args = p.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ok = True
    for which, target in (("toy", 0.3), ("vit", 2.0)):
        if which == "vit" and args.skip_vit:
            continue
        lm, label = load(which)
        times, ref, shape = bench(lm, args.texts, args.classes, args.repeats)
        med = statistics.median(times)
        ok &= med < target
        print(f"{label}: heatmaps {list(shape)} in {med:.3f} s median (min {min(times):.3f}, max {max(times):.3f}); "
              f"target < {target} s: {'met' if med < target else 'NOT met'}; "
              f"plain encode_image {statistics.median(ref):.3f} s median for reference")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
