"""clipdecomp reproduce: run every experiment of the paper for which data is given, and
write one Markdown report with tables, plots, CSV files and the paper's figures beside.

    clipdecomp reproduce --out REPORT_DIR                       # toy data + bundled model
    clipdecomp reproduce --model ViT-B-16 --pretrained laion2b_s34b_b88k \\
        --imagenet DIR --waterbirds DIR --segmentation gtsegs_ijcv.mat --out REPORT_DIR

Experiments (each runs when its data is given):

* layers (``--imagenet DIR`` with ``train/`` and ``val/``): zero-shot accuracy with MLPs,
  the class token's direct term, both, and attention layers up to l mean-ablated
  (:mod:`clipdecomp.experiments.layers`; means over ``train/``, accuracy on ``val/``);
* textspan + head roles (``--textspan-images DIR``, default ``--imagenet``'s ``train/``):
  TextSpan bases of the last layers' heads for the general, words and random pools;
* completeness (``--imagenet``): accuracy from the first k TextSpan texts per head, per
  pool (:mod:`clipdecomp.experiments.completeness`);
* waterbirds (``--waterbirds DIR``): group accuracies of the base model, the repair that
  mean-ablates the heads chosen by a role query on the general-pool TextSpan results,
  its baked version, and random heads (:mod:`repair.waterbirds_eval`; means over val);
* segmentation (``--segmentation FILE``): ours vs raw attention, rollout and GradCAM
  (:mod:`clipdecomp.experiments.segmentation`).

With no data argument the toy data sets are generated into ``REPORT_DIR/data`` (with
``--scale`` and ``--seed``) and, unless ``--model`` is given, the bundled toy model is used.

Outputs in ``REPORT_DIR``: ``report.md``, ``*.csv``, ``*.png``, ``segmentation/``, and
``cache/`` with each experiment's results as JSON (written atomically). A rerun with the
same options skips every experiment whose cache exists, so an interrupted run resumes;
a cache made with other options is recomputed.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

from ..commands.common import add_model_arguments
from ..errors import ClipDecompError, InputError
from ..io import atomic_path, atomic_write_text

__all__ = ["POOLS", "DEFAULT_KS", "Plan", "build_parser", "make_plan", "run_reproduce", "render_report", "main"]

POOLS: tuple[str, ...] = ("general", "words", "random")
DEFAULT_KS: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 40, 60)
_PACKAGES = ("clipdecomp", "torch", "open_clip_torch", "numpy", "matplotlib", "scikit-learn")

# The paper's figures (shared/notes/protocols.md), shown beside each of our tables.
PAPER = {
    "layers": (
        "| model | base | MLPs ablated | class token ablated | class token + MLPs |\n|---|---:|---:|---:|---:|\n"
        "| ViT-B-16 | 70.22 | 67.04 | 69.37 | 67.32 |\n| ViT-L-14 | 75.25 | 74.12 | 74.38 | 73.87 |\n"
        "| ViT-H-14 | 77.95 | 76.30 | 76.89 | 76.29 |\n\n"
        "ImageNet zero-shot accuracy (%), paper Section 3 and A.2 (as restated in shared/notes/protocols.md).\n"
    ),
    "completeness": (
        "Paper, Figure 4: 60 TextSpan texts per head over the last 4 layers of ViT-L-14 recover 72.77% ImageNet "
        "zero-shot accuracy of the base 75.25% (all other terms mean-ablated).\n"
    ),
    "waterbirds": (
        "| model | base | random heads (best of 5) | geolocation / location heads ablated |\n|---|---:|---:|---:|\n"
        "| ViT-B-16 | 45.6 | 52.3 | 57.5 |\n| ViT-L-14 | 47.7 | 57.7 | 72.9 |\n| ViT-H-14 | 37.2 | 37.0 | 43.3 |\n\n"
        "Worst-group accuracy (%), paper Table 2.\n"
    ),
    "segmentation": (
        "| method | pixel acc | mIoU | mAP |\n|---|---:|---:|---:|\n"
        "| ours | 75.21 | 54.50 | 81.61 |\n| Chefer et al. 2021 | 69.21 | 47.47 | 78.29 |\n"
        "| GradCAM | 70.27 | 44.50 | 70.30 |\n| raw attention | 65.67 | 43.83 | 76.05 |\n"
        "| rollout | 60.63 | 40.64 | 74.47 |\n| partial-LRP | 61.49 | 40.71 | 72.29 |\n| LRP | 52.81 | 33.57 | 54.37 |\n\n"
        "ImageNet-segmentation (4,276 images), ViT-H-14 (LAION-2B), published figures.\n"
    ),
    "roles": "The paper describes head roles qualitatively (e.g. the geolocation / location heads ablated for "
             "Waterbirds); there is no number to compare.\n",
}


@dataclass
class Plan:
    """What to run and on which data (resolved from the command line)."""

    out: Path
    model: Optional[str] = None
    pretrained: Optional[str] = None
    toy: bool = False
    imagenet: Optional[Path] = None
    waterbirds: Optional[Path] = None
    segmentation: Optional[Path] = None
    textspan_images: Optional[Path] = None
    classes: str = "auto"
    ks: tuple[int, ...] = DEFAULT_KS
    textspan_layers: int = 4
    textspan_k: int = 60
    textspan_rank: int = 80
    random_size: int = 3000
    roles: Optional[str] = None
    role_score: str = "variance"
    role_top_n: int = 6
    random_trials: int = 5
    max_images: Optional[int] = 5000
    seg_limit: Optional[int] = None
    batch_size: int = 64
    seed: int = 0
    scale: float = 1.0
    progress: bool = True
    argv: list[str] = field(default_factory=list)

    @property
    def cache(self) -> Path:
        return self.out / "cache"


# ----------------------------------------------------------------------------- helpers


def _cache_read(path: Path, params: Mapping[str, Any]) -> Optional[dict[str, Any]]:
    """The cached result if ``path`` exists and was made with ``params``, else ``None``."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return doc if doc.get("params") == json.loads(json.dumps(params)) else None


def _cache_write(path: Path, params: Mapping[str, Any], result: Any, seconds: float) -> dict[str, Any]:
    doc = {"params": json.loads(json.dumps(params)), "seconds": round(seconds, 1), "result": result}
    atomic_write_text(path, json.dumps(doc, indent=1, ensure_ascii=False) + "\n")
    return doc


def _cached(plan: Plan, name: str, params: Mapping[str, Any], compute: Callable[[], Any]) -> dict[str, Any]:
    """Run ``compute`` unless ``cache/NAME.json`` holds a result for ``params``."""
    path = plan.cache / f"{name}.json"
    doc = _cache_read(path, params)
    if doc is not None:
        print(f"reproduce: {name}: cached ({path})", file=sys.stderr)
        return doc
    start = time.perf_counter()
    result = compute()
    return _cache_write(path, params, result, time.perf_counter() - start)


def _csv_text(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def _pct(x: float) -> str:
    return f"{100 * x:.2f}"


def package_versions() -> dict[str, str]:
    """Versions of the packages the numbers depend on (``"-"`` when not installed)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for p in _PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = "-"
    return out


def _plot(path: Path, draw: Callable[[Any], None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=110)
    try:
        draw(ax)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format="png", metadata={"Software": None})
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- planning


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clipdecomp reproduce", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("model")
    add_model_arguments(g)
    g = p.add_argument_group("data (none given: generate the toy data sets into OUT/data)")
    g.add_argument("--imagenet", type=Path, default=None, metavar="DIR", help="ImageFolder with train/ (means, TextSpan) and val/ (accuracy)")
    g.add_argument("--waterbirds", type=Path, default=None, metavar="DIR", help="Waterbirds folder (metadata.csv + images)")
    g.add_argument("--segmentation", type=Path, default=None, metavar="FILE", help="gtsegs_ijcv.mat")
    g.add_argument("--textspan-images", type=Path, default=None, metavar="DIR", help="images for TextSpan (default: --imagenet's train/)")
    g.add_argument("--classes", choices=("auto", "toy", "imagenet", "folder"), default="auto",
                   help="class texts: toy shape prompt ensembles, the 1000 ImageNet names, or the folder names with "
                        "OpenAI's templates (auto: toy for toy-shape folders, imagenet for 1000 folders, else folder)")
    g.add_argument("--scale", type=float, default=1.0, help="size of the generated toy data sets (default 1.0)")
    g.add_argument("--seed", type=int, default=0, help="seed of the toy data, TextSpan's random pool and the random heads")
    g = p.add_argument_group("experiment options")
    g.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="TextSpan texts per head for completeness")
    g.add_argument("--textspan-layers", type=int, default=4, help="analyse the last N layers (default 4)")
    g.add_argument("--textspan-k", type=int, default=60, help="TextSpan texts per head (default 60)")
    g.add_argument("--textspan-rank", type=int, default=80, help="TextSpan rank reduction (default 80)")
    g.add_argument("--random-size", type=int, default=3000, help="size of the random pool (default 3000)")
    g.add_argument("--roles", default=None, help="Waterbirds role query (default: 'background scene' on toy data, "
                   "'geolocation,background scene' otherwise)")
    g.add_argument("--score", choices=("share", "variance"), default="variance", help="role score (default variance)")
    g.add_argument("--top-n", type=int, default=6, help="heads per role query (default 6)")
    g.add_argument("--random-trials", type=int, default=5, help="random-heads draws for Waterbirds (default 5)")
    g.add_argument("--max-images", type=int, default=5000,
                   help="at most N images (a seeded random subset) of the means split and of the TextSpan images "
                        "(default 5000; 0 = all)")
    g.add_argument("--seg-limit", type=int, default=None, help="evaluate only the first N segmentation images")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--out", type=Path, required=True, metavar="REPORT_DIR", help="report folder")
    return p


def _check_path(path: Optional[Path], flag: str, kind: str) -> None:
    if path is None:
        return
    ok = path.is_dir() if kind == "dir" else path.is_file()
    if not ok:
        raise InputError(f"{flag} {path}: no such {'folder' if kind == 'dir' else 'file'}.")


def make_plan(args: argparse.Namespace, argv: Sequence[str]) -> Plan:
    """Validate the command line and resolve the data (toy data is generated later)."""
    for name in ("batch_size", "textspan_layers", "textspan_k", "textspan_rank", "random_size", "top_n"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}.")
    if args.max_images < 0:
        raise InputError(f"--max-images must be >= 0 (0 = all), got {args.max_images}.")
    if args.random_trials < 0:
        raise InputError(f"--random-trials must be >= 0, got {args.random_trials}.")
    if args.scale <= 0:
        raise InputError(f"--scale must be > 0, got {args.scale}.")
    if any(k < 0 for k in args.ks):
        raise InputError(f"--ks must be >= 0, got {args.ks}.")
    _check_path(args.imagenet, "--imagenet", "dir")
    _check_path(args.waterbirds, "--waterbirds", "dir")
    _check_path(args.segmentation, "--segmentation", "file")
    _check_path(args.textspan_images, "--textspan-images", "dir")
    if args.imagenet is not None:
        for sub in ("train", "val"):
            if not (args.imagenet / sub).is_dir():
                raise InputError(f"--imagenet {args.imagenet} needs {sub}/ (ImageFolder): train/ for the means, val/ for accuracy.")
    toy = not any(x is not None for x in (args.imagenet, args.waterbirds, args.segmentation, args.textspan_images))
    return Plan(
        out=args.out, model=args.model, pretrained=args.pretrained, toy=toy, imagenet=args.imagenet,
        waterbirds=args.waterbirds, segmentation=args.segmentation, textspan_images=args.textspan_images,
        classes=args.classes, ks=tuple(args.ks), textspan_layers=args.textspan_layers, textspan_k=args.textspan_k,
        textspan_rank=args.textspan_rank, random_size=args.random_size, roles=args.roles, role_score=args.score,
        role_top_n=args.top_n, random_trials=args.random_trials, max_images=args.max_images or None, seg_limit=args.seg_limit,
        batch_size=args.batch_size, seed=args.seed, scale=args.scale, progress=not args.quiet, argv=list(argv),
    )


def prepare_toy_data(plan: Plan) -> None:
    """Generate the toy data sets into ``OUT/data`` (once) and point the plan at them."""
    from ..toyworld.datasets import make_datasets

    data = plan.out / "data"
    stamp = plan.cache / "data.json"
    params = {"seed": plan.seed, "scale": plan.scale}
    if _cache_read(stamp, params) is None:
        start = time.perf_counter()
        make_datasets(data, seed=plan.seed, scale=plan.scale)
        _cache_write(stamp, params, {"folder": "data"}, time.perf_counter() - start)
    plan.imagenet = data / "classification"
    plan.waterbirds = data / "waterbirds"
    plan.segmentation = data / "segmentation" / "gtsegs_ijcv.mat"


def resolve_classes(plan: Plan, eval_folder: Path) -> tuple[str, list[str], Any]:
    """``(kind, class names in ImageFolder order, templates or prompt sets)``."""
    from ..data.imagefolder import classnames as folder_classnames
    from ..toyworld.captions import zero_shot_prompts
    from ..zeroshot import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES

    names = folder_classnames(eval_folder)
    toy = zero_shot_prompts("shape")
    kind = plan.classes
    if kind == "auto":
        kind = "toy" if set(names) <= set(toy) else "imagenet" if len(names) == len(IMAGENET_CLASSNAMES) else "folder"
    if kind == "toy":
        missing = sorted(set(names) - set(toy))
        if missing:
            raise InputError(f"--classes toy: class folders {missing} are not toy shapes ({sorted(toy)}).")
        return kind, names, toy
    if kind == "imagenet":
        if len(names) != len(IMAGENET_CLASSNAMES):
            raise InputError(f"--classes imagenet needs {len(IMAGENET_CLASSNAMES)} class folders (sorted wnids), found {len(names)}.")
        return kind, list(IMAGENET_CLASSNAMES), list(OPENAI_IMAGENET_TEMPLATES)
    return kind, names, list(OPENAI_IMAGENET_TEMPLATES)


# ----------------------------------------------------------------------------- experiments


def toy_texts(plan: Plan) -> bool:
    """Whether the class and role texts are the toy world's: ``--classes toy``, or ``auto``
    with generated toy data or the bundled toy model."""
    return plan.classes == "toy" or (plan.classes == "auto" and (plan.toy or plan.model is None))


def _base_params(plan: Plan, model: Any) -> dict[str, Any]:
    return {"model": plan.model, "pretrained": plan.pretrained, "model_name": getattr(model, "name", None),
            "batch_size": plan.batch_size, "max_images": plan.max_images, "seed": plan.seed}


def exp_layers(plan: Plan, model: Any) -> dict[str, Any]:
    from .layers import run_layer_experiments

    kind, names, spec = resolve_classes(plan, plan.imagenet / "val")
    params = {**_base_params(plan, model), "data": os.fspath(plan.imagenet), "classes": kind}

    def compute() -> dict[str, Any]:
        res = run_layer_experiments(model, plan.imagenet / "train", plan.imagenet / "val", names, spec,
                                    means_max_images=plan.max_images, seed=plan.seed, batch_size=plan.batch_size,
                                    progress=plan.progress)
        res["class_texts"] = kind
        return res

    return _cached(plan, "layers", params, compute)


def _textspan_params(plan: Plan, model: Any, pool: str) -> dict[str, Any]:
    return {**_base_params(plan, model), "images": os.fspath(plan.textspan_images), "pool": pool,
            "layers": plan.textspan_layers, "k": plan.textspan_k, "rank": plan.textspan_rank,
            "seed": plan.seed, "random_size": plan.random_size}


def exp_textspan(plan: Plan, model: Any, pool: str) -> tuple[dict[str, Any], Path]:
    """TextSpan results of one pool, saved as ``cache/textspan_POOL.json`` (+ .safetensors)."""
    from ..commands.textspan import run_textspan

    path = plan.cache / f"textspan_{pool}.json"
    n_layers = len(model.visual.transformer.resblocks)
    layers = min(plan.textspan_layers, n_layers)
    params = _textspan_params(plan, model, pool)

    def compute() -> dict[str, Any]:
        res = run_textspan(model, plan.textspan_images, pool=pool, layers=layers, k=plan.textspan_k,
                           rank=plan.textspan_rank, batch_size=plan.batch_size, max_images=plan.max_images, seed=plan.seed,
                           random_size=plan.random_size, model_spec=(plan.model, plan.pretrained),
                           progress=plan.progress)
        res.save(path)
        return {"file": path.name, "layers": res.layers, "n_images": res.n_images, "table": res.table(5)}

    doc = _cached(plan, f"textspan_{pool}_summary", params, compute)
    if not path.is_file():  # results file lost: recompute
        (plan.cache / f"textspan_{pool}_summary.json").unlink()
        doc = _cached(plan, f"textspan_{pool}_summary", params, compute)
    return doc, path


def exp_completeness(plan: Plan, model: Any, spans: Mapping[str, Path]) -> dict[str, Any]:
    from .completeness import run_completeness

    kind, names, spec = resolve_classes(plan, plan.imagenet / "val")
    params = {**_base_params(plan, model), "data": os.fspath(plan.imagenet), "classes": kind, "ks": list(plan.ks),
              "spans": {p: _textspan_params(plan, model, p) for p in spans}}

    def compute() -> list[dict[str, Any]]:
        from ..ablation import compute_means
        from ..images import image_loader

        loader = image_loader(plan.imagenet / "train", model.preprocess, plan.batch_size, max_images=plan.max_images,
                              seed=plan.seed)
        means = compute_means(model, loader, progress=plan.progress)
        return run_completeness(model, plan.imagenet / "val", means, dict(spans), ks=plan.ks,
                                templates=spec, classnames=names, batch_size=plan.batch_size,
                                progress=plan.progress)

    return _cached(plan, "completeness", params, compute)


def exp_waterbirds(plan: Plan, model: Any, general: Path) -> dict[str, Any]:
    from repair.bake import bake_ablation, compute_repair_means
    from repair.select import model_shape, select_by_roles
    from repair.waterbirds_eval import evaluate_waterbirds, waterbirds_loader

    roles = plan.roles or ("background scene" if toy_texts(plan) else "geolocation,background scene")
    params = {**_base_params(plan, model), "data": os.fspath(plan.waterbirds), "roles": roles,
              "score": plan.role_score, "top_n": plan.role_top_n, "random_trials": plan.random_trials,
              "seed": plan.seed, "textspan": _textspan_params(plan, model, "general")}

    def compute() -> dict[str, Any]:
        L, H = model_shape(model)
        selection = select_by_roles(general, roles, L, H, model=model, top_n=plan.role_top_n, score=plan.role_score)
        loader = waterbirds_loader(plan.waterbirds, "val", model.preprocess, batch_size=plan.batch_size)
        means = compute_repair_means(model, loader, progress=plan.progress, split="val")
        heads = selection.pairs()
        baked = bake_ablation(model, means, heads) if heads else None
        report = evaluate_waterbirds(model, plan.waterbirds, heads=heads, means=means, baked=baked, split="test",
                                     random_trials=plan.random_trials if heads else 0, random_seed=plan.seed,
                                     batch_size=plan.batch_size, progress=plan.progress)
        report.meta["selection"] = selection.to_json()
        return {**report.to_json(), "markdown": report.markdown(), "csv": report.csv()}

    return _cached(plan, "waterbirds", params, compute)


def exp_segmentation(plan: Plan, model: Any) -> dict[str, Any]:
    from .segmentation import class_set, evaluate_segmentation, write_results

    spec = "toy" if toy_texts(plan) else "imagenet"
    params = {**_base_params(plan, model), "data": os.fspath(plan.segmentation), "classes": spec, "limit": plan.seg_limit}

    def compute() -> dict[str, Any]:
        classes = class_set(model, spec)
        res = evaluate_segmentation(model, plan.segmentation, classes, batch_size=min(plan.batch_size, 16),
                                    limit=plan.seg_limit, progress=plan.progress)
        res.pop("predictions", None)
        return res

    doc = _cached(plan, "segmentation", params, compute)
    write_results({**doc["result"], "predictions": []}, plan.out / "segmentation")
    return doc


# ----------------------------------------------------------------------------- report


def layers_section(doc: Mapping[str, Any], out: Path) -> str:
    """Markdown of the layer experiments; writes ``layers.csv`` and ``layers.png``."""
    from .layers import SETTINGS, write_csv

    r = doc["result"]
    write_csv(r, out / "layers.csv")
    labels = {"base": "base", "mlps": "all MLPs mean-ablated", "class_token": "class-token direct term mean-ablated",
              "class_token+mlps": "class token + MLPs mean-ablated"}
    curve = r["curve"]

    def draw(ax: Any) -> None:
        ax.plot([c["layers_ablated"] for c in curve], [100 * c["accuracy"] for c in curve], "o-",
                label="heads of layers < l mean-ablated")
        ax.axhline(100 * r["accuracy"]["base"], color="k", ls="--", lw=1, label="base")
        ax.axhline(100 * r["accuracy"]["mlps"], color="C3", ls=":", lw=1, label="all MLPs ablated")
        ax.set_xlabel("l (attention layers 0..l-1 mean-ablated)")
        ax.set_ylabel("zero-shot accuracy (%)")
        ax.legend(fontsize=8)

    _plot(out / "layers.png", draw)
    lines = ["| setting | accuracy (%) |", "|---|---:|"]
    lines += [f"| {labels[s]} | {_pct(r['accuracy'][s])} |" for s in SETTINGS]
    curve_tab = ["| l (layers ablated) | " + " | ".join(str(c["layers_ablated"]) for c in curve) + " |",
                 "|---|" + "---:|" * len(curve),
                 "| accuracy (%) | " + " | ".join(_pct(c["accuracy"]) for c in curve) + " |"]
    return (
        f"Zero-shot accuracy on {r['n_images']} images ({len(r['classnames'])} classes, class texts: "
        f"{r.get('class_texts')}); means over {r['n_means']} images of another split. "
        f"Computed in {doc['seconds']} s.\n\n" + "\n".join(lines) + "\n\nAttention layers 0..l-1 mean-ablated "
        "(`layers.png`):\n\n" + "\n".join(curve_tab) + "\n\n![layer ablations](layers.png)\n\n**Paper:**\n\n"
        + PAPER["layers"]
    )


def completeness_section(doc: Mapping[str, Any], out: Path) -> str:
    from .completeness import write_csv

    rows = doc["result"]
    write_csv(rows, out / "completeness.csv")
    fixed = {r["setting"]: r["accuracy"] for r in rows if r["setting"] != "textspan"}
    pools = list(dict.fromkeys(r["pool"] for r in rows if r["setting"] == "textspan"))
    ks = list(dict.fromkeys(r["k"] for r in rows if r["setting"] == "textspan"))
    acc = {(r["pool"], r["k"]): r["accuracy"] for r in rows if r["setting"] == "textspan"}
    for pool in pools:
        def draw(ax: Any, pool: str = pool) -> None:
            ax.plot(ks, [100 * acc[(pool, k)] for k in ks], "o-", label=f"TextSpan ({pool} pool)")
            ax.axhline(100 * fixed["base"], color="k", ls="--", lw=1, label="base")
            ax.axhline(100 * fixed["ceiling"], color="C2", ls=":", lw=1, label="ceiling (late heads exact)")
            ax.set_xlabel("k (TextSpan texts per head)")
            ax.set_ylabel("zero-shot accuracy (%)")
            ax.set_title(f"completeness: {pool} pool", fontsize=10)
            ax.legend(fontsize=8)

        _plot(out / f"completeness_{pool}.png", draw)
    n = rows[0]["n_images"] if rows else 0
    head = "| pool | " + " | ".join(f"k={k}" for k in ks) + " |"
    lines = [head, "|---|" + "---:|" * len(ks)]
    lines += [f"| {p} | " + " | ".join(_pct(acc[(p, k)]) for k in ks) + " |" for p in pools]
    plots = "\n".join(f"![completeness {p}](completeness_{p}.png)" for p in pools)
    return (
        f"Zero-shot accuracy on {n} images from the first k TextSpan texts of each head of the analysed layers, "
        f"every other part mean-ablated. Base {_pct(fixed['base'])}%, ceiling (analysed heads exact, rest ablated) "
        f"{_pct(fixed['ceiling'])}%, everything ablated {_pct(fixed['ablated'])}%. Computed in {doc['seconds']} s.\n\n"
        + "\n".join(lines) + "\n\n" + plots + "\n\n**Paper:**\n\n" + PAPER["completeness"]
    )


def waterbirds_section(doc: Mapping[str, Any], out: Path) -> str:
    r = doc["result"]
    atomic_write_text(out / "waterbirds.csv", r["csv"])
    sel = r["meta"].get("selection", {})
    q = sel.get("query", {})
    return (
        f"Heads chosen by the role query {q.get('roles')} (score {q.get('score')}, top {q.get('top_n')}) on the "
        f"general-pool TextSpan results; means over the val split. Computed in {doc['seconds']} s.\n\n"
        + r["markdown"] + "\n**Paper:**\n\n" + PAPER["waterbirds"]
    )


def segmentation_section(doc: Mapping[str, Any], out: Path) -> str:
    from .segmentation import table_csv, table_markdown

    r = doc["result"]
    atomic_write_text(out / "segmentation.csv", table_csv(r["metrics"]))
    return (
        f"{r['n_images']} images; classes: {r['classes']}; layers (ours): {r['layers']}. Percent. "
        f"Computed in {doc['seconds']} s.\n\n" + table_markdown(r["metrics"]) + "\n**Paper:**\n\n" + PAPER["segmentation"]
    )


def roles_section(docs: Mapping[str, Mapping[str, Any]], out: Path) -> str:
    rows, parts = [], []
    for pool, doc in docs.items():
        for t in doc["result"]["table"]:
            rows.append([pool, t["layer"], t["head"], t["role"], f"{t['score']:.4f}", " | ".join(t["texts"])])
    atomic_write_text(out / "head_roles.csv", _csv_text(["pool", "layer", "head", "role", "score", "top_texts"], rows))
    for pool, doc in docs.items():
        res = doc["result"]
        esc = lambda s: str(s).replace("|", "/")  # noqa: E731
        lines = [f"**{pool} pool** (layers {res['layers']}, {res['n_images']} images, {doc['seconds']} s):", "",
                 "| layer | head | role | score | top texts |", "|---:|---:|---|---:|---|"]
        lines += [f"| {t['layer']} | {t['head']} | {esc(t['role'])} | {t['score']:.2f} | {esc('; '.join(t['texts']))} |"
                  for t in res["table"]]
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n\n**Paper:** " + PAPER["roles"]


def render_report(plan: Plan, docs: Mapping[str, Any], versions: Mapping[str, str]) -> str:
    """``report.md`` text (also writes each section's CSV and PNG files)."""
    out = plan.out
    cmd = "clipdecomp reproduce " + shlex.join(plan.argv)
    head = [
        "# Reproduction report: Interpreting CLIP's Image Representation via Text-Based Decomposition", "",
        "Command:", "", "```", cmd, "```", "",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()) + ".", "",
        f"Model: {plan.model or 'bundled toy model'}" + (f" ({plan.pretrained})" if plan.pretrained else "")
        + (f"; data: toy data sets generated with seed {plan.seed}, scale {plan.scale} (`data/`)" if plan.toy else "")
        + ". Every number is also in the CSV files beside this report; `cache/` holds the raw results.", "",
    ]
    sections: list[tuple[str, str]] = []
    if "layers" in docs:
        sections.append(("Layer ablations (Section 3)", layers_section(docs["layers"], out)))
    if "completeness" in docs:
        sections.append(("TextSpan completeness (Figure 4)", completeness_section(docs["completeness"], out)))
    if "waterbirds" in docs:
        sections.append(("Waterbirds: removing spurious cues (Table 2)", waterbirds_section(docs["waterbirds"], out)))
    if "segmentation" in docs:
        sections.append(("Zero-shot segmentation", segmentation_section(docs["segmentation"], out)))
    if docs.get("textspan"):
        sections.append(("Head roles (TextSpan)", roles_section(docs["textspan"], out)))
    skipped = docs.get("skipped", [])
    body = [f"## {title}\n\n{text}" for title, text in sections]
    if skipped:
        body.append("## Not run\n\n" + "\n".join(f"- {s}" for s in skipped) + "\n")
    return "\n".join(head) + "\n" + "\n".join(body)


# ----------------------------------------------------------------------------- driver


def run_reproduce(plan: Plan, model: Any) -> dict[str, Any]:
    """Run (or load from cache) every experiment the plan has data for; write the report.

    Returns the per-experiment cache documents (``{"params", "seconds", "result"}``).
    """
    from tqdm.auto import tqdm

    plan.cache.mkdir(parents=True, exist_ok=True)
    if plan.toy:
        prepare_toy_data(plan)
    if plan.textspan_images is None and plan.imagenet is not None:
        plan.textspan_images = plan.imagenet / "train"
    steps: list[str] = []
    skipped: list[str] = []
    if plan.imagenet is not None:
        steps.append("layers")
    if plan.textspan_images is not None:
        steps += [f"textspan:{p}" for p in POOLS]
    else:
        skipped.append("TextSpan, head roles, completeness, Waterbirds repair: no --textspan-images or --imagenet")
    if plan.imagenet is not None and plan.textspan_images is not None:
        steps.append("completeness")
    elif plan.imagenet is None:
        skipped.append("layer ablations and completeness: no --imagenet")
    if plan.waterbirds is not None and plan.textspan_images is not None:
        steps.append("waterbirds")
    elif plan.waterbirds is None:
        skipped.append("Waterbirds: no --waterbirds")
    if plan.segmentation is not None:
        steps.append("segmentation")
    else:
        skipped.append("segmentation: no --segmentation")
    docs: dict[str, Any] = {"textspan": {}, "skipped": skipped}
    spans: dict[str, Path] = {}
    for step in tqdm(steps, desc="reproduce", unit="experiment", disable=not plan.progress):
        if step == "layers":
            docs["layers"] = exp_layers(plan, model)
        elif step.startswith("textspan:"):
            pool = step.split(":", 1)[1]
            docs["textspan"][pool], spans[pool] = exp_textspan(plan, model, pool)
        elif step == "completeness":
            docs["completeness"] = exp_completeness(plan, model, spans)
        elif step == "waterbirds":
            docs["waterbirds"] = exp_waterbirds(plan, model, spans["general"])
        elif step == "segmentation":
            docs["segmentation"] = exp_segmentation(plan, model)
    atomic_write_text(plan.out / "report.md", render_report(plan, docs, package_versions()))
    return docs


def main(argv: Optional[list[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    try:
        from ..loading import load_model

        plan = make_plan(args, argv)  # before loading a possibly large model
        model = load_model(args.model, args.pretrained, device=args.device)
        start = time.perf_counter()
        run_reproduce(plan, model)
    except ClipDecompError as e:
        print(f"clipdecomp reproduce: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {plan.out / 'report.md'} ({time.perf_counter() - start:.0f} s)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
