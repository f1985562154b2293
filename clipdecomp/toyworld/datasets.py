"""Toy versions of the benchmark data sets, in the real ones' on-disk formats.

    python -m clipdecomp.toyworld.datasets OUT [--seed 0] [--scale 1.0]

writes
    OUT/waterbirds/      metadata.csv + images, the Waterbirds layout (y=1: the "water" class)
    OUT/segmentation/gtsegs_ijcv.mat   the ImageNet-segmentation layout, true object masks
    OUT/classification/{train,val}/CLASS/*.png   ImageFolder, one folder per shape

so the evaluation code for the real benchmarks reads them unchanged.

Toy Waterbirds: the two classes are the two shapes that carry the spurious cue
in the toy model's training distribution (triangles on water, squares on land,
95% of the time). Train follows that correlation; val and test are balanced
over the four (class, place) groups, as in Waterbirds' test split.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from ..io import atomic_path, atomic_write_text
from .world import LAND_BACKGROUNDS, SHAPES, WATER_BACKGROUNDS, Scene, render, sample_scene

WATERBIRDS_CLASSES = {0: "square", 1: "triangle"}  # y=0 the "land" class, y=1 the "water" class
WATERBIRDS_SPLIT_SIZES = {"train": 1200, "val": 400, "test": 800}
_SPLIT_CODES = {"train": 0, "val": 1, "test": 2}


def _save_png(image, path: Path) -> None:
    with atomic_path(path) as tmp:
        image.save(tmp, format="PNG")


def waterbirds_scene(y: int, place: int, rng: np.random.Generator) -> Scene:
    """One object of class `y` (0 square, 1 triangle) on a water (`place=1`) or land background."""
    pool = WATER_BACKGROUNDS if place == 1 else LAND_BACKGROUNDS
    return sample_scene(rng, spurious=None, fixed={"shape": WATERBIRDS_CLASSES[y], "count": 1, "background": pool[rng.integers(len(pool))]})


def waterbirds_groups(split: str, n: int, rng: np.random.Generator, correlation: float = 0.95) -> list[tuple[int, int]]:
    """(y, place) of each image: train correlated like the model's training data, val/test balanced."""
    if split == "train":
        ys = rng.integers(0, 2, size=n)
        agree = rng.random(n) < correlation
        return [(int(y), int(y if a else 1 - y)) for y, a in zip(ys, agree)]
    groups = [(y, p) for y in (0, 1) for p in (0, 1)]
    return [groups[i % 4] for i in range(n)]


def make_waterbirds(out: Path, seed: int, scale: float = 1.0) -> Path:
    """Write the toy Waterbirds folder; returns the path of `metadata.csv`."""
    from ..data.waterbirds import write_metadata

    rng = np.random.default_rng([seed, 101])
    rows = []
    total = sum(int(v * scale) for v in WATERBIRDS_SPLIT_SIZES.values())
    with tqdm(total=total, desc="toy waterbirds", dynamic_ncols=True) as bar:
        for split, size in WATERBIRDS_SPLIT_SIZES.items():
            for y, place in waterbirds_groups(split, max(4, int(size * scale)), rng):
                scene = waterbirds_scene(y, place, rng)
                idx = len(rows)
                filename = f"{WATERBIRDS_CLASSES[y]}/toy_{idx:06d}.png"
                _save_png(render(scene)[0], out / filename)
                rows.append({
                    "img_id": idx, "img_filename": filename, "y": y, "split": _SPLIT_CODES[split],
                    "place": place, "place_filename": f"/{scene.background.replace(' ', '_')}/toy_{idx:06d}.png",
                })
                bar.update(1)
    atomic_write_text(out / "classes.json", json.dumps({str(k): v for k, v in WATERBIRDS_CLASSES.items()}, indent=2) + "\n")
    write_metadata(out / "metadata.csv", rows)
    return out / "metadata.csv"


def make_segmentation(out: Path, seed: int, n: int = 500) -> Path:
    """Write `gtsegs_ijcv.mat` with `n` toy images and their true object masks (union over objects)."""
    from ..data.imagenet_seg import write_gtsegs

    rng = np.random.default_rng([seed, 202])

    def items():
        for _ in tqdm(range(n), desc="toy segmentation", dynamic_ncols=True):
            image, masks = render(sample_scene(rng, spurious=None))
            yield np.asarray(image), masks.any(0).astype(np.uint8)

    path = out / "gtsegs_ijcv.mat"
    write_gtsegs(path, items())
    return path


def make_classification(out: Path, seed: int, per_class: dict[str, int] | None = None) -> Path:
    """ImageFolder layout `out/{train,val}/SHAPE/*.png`: zero-shot shape classification."""
    per_class = per_class or {"train": 40, "val": 60}
    rng = np.random.default_rng([seed, 303])
    total = sum(per_class.values()) * len(SHAPES)
    with tqdm(total=total, desc="toy classification", dynamic_ncols=True) as bar:
        for split, k in per_class.items():
            for shape in SHAPES:
                for i in range(k):
                    scene = sample_scene(rng, spurious=None, fixed={"shape": shape})
                    _save_png(render(scene)[0], out / split / shape / f"toy_{i:05d}.png")
                    bar.update(1)
    return out


def make_datasets(out: Path, seed: int = 0, scale: float = 1.0) -> dict[str, Path]:
    """All three toy data sets under `out`; deterministic by seed."""
    out = Path(out)
    paths = {
        "waterbirds": make_waterbirds(out / "waterbirds", seed, scale).parent,
        "segmentation": make_segmentation(out / "segmentation", seed, max(8, int(500 * scale))),
        "classification": make_classification(
            out / "classification", seed, {"train": max(2, int(40 * scale)), "val": max(2, int(60 * scale))}
        ),
    }
    atomic_write_text(out / "README.txt", _readme(seed, scale))
    return paths


def _readme(seed: int, scale: float) -> str:
    return (
        f"Toy-world benchmark data made by clipdecomp (seed {seed}, scale {scale}).\n"
        "waterbirds/: Waterbirds layout; y=1 triangle (the water class), y=0 square; place=1 water.\n"
        "segmentation/gtsegs_ijcv.mat: ImageNet-segmentation layout, masks = union of the drawn objects.\n"
        "classification/{train,val}/SHAPE/: ImageFolder, classes are the toy shapes.\n"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path, help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every data-set size (e.g. 0.1 for a quick look)")
    args = parser.parse_args(argv)
    if args.scale <= 0:
        parser.error("--scale must be > 0")
    for name, path in make_datasets(args.out, args.seed, args.scale).items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
