"""Command lines of the repair front end.

    clipdecomp repair --textspan FILE --roles "geolocation,background scene" --threshold 0.5 \\
        --data WATERBIRDS_DIR --out FOLDER [--evaluate]
    clipdecomp repair --heads 5.2,5.4 --data WATERBIRDS_DIR --out FOLDER --evaluate
    clipdecomp waterbirds-eval --data WATERBIRDS_DIR [--heads 5.2,5.4 | --textspan FILE --roles ...]

``main`` is ``clipdecomp repair``; ``waterbirds_eval_main`` is ``clipdecomp waterbirds-eval``
(reached through :func:`repair.waterbirds_eval.main`). Both print the chosen heads and
why, stream the means over a split other than the evaluated one, and exit with status 2
and a one-line message on a bad argument or input.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Optional


from clipdecomp.commands.common import add_model_arguments
from clipdecomp.errors import ClipDecompError, InputError
from clipdecomp.loading import LoadedModel, load_model

from .bake import RepairMeans, bake_ablation, compute_repair_means, measure_agreement
from .select import HeadSelection, model_shape, select_by_roles, select_explicit
from .waterbirds_eval import (
    check_means_split,
    evaluate_waterbirds,
    resolve_classnames,
    resolve_templates,
    waterbirds_loader,
)

__all__ = ["main", "waterbirds_eval_main", "build_repair_parser", "build_eval_parser"]

_SPLITS = ("train", "val", "test")


# ---------------------------------------------------------------------------- arguments


def _add_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    add_model_arguments(g)


def _add_selection_args(p: argparse.ArgumentParser, required: bool) -> None:
    g = p.add_argument_group("head selection" + ("" if required else " (optional: without it only the base model is evaluated)"))
    g.add_argument("--heads", default=None, metavar="L.H,...", help="explicit heads to ablate, 0-based, e.g. '5.2,5.4' (instead of --roles)")
    g.add_argument("--textspan", type=Path, default=None, metavar="FILE", help="TextSpan results file of this model (for --roles)")
    g.add_argument("--roles", default=None, help="comma-separated role queries, e.g. 'geolocation,background scene'")
    g.add_argument("--threshold", type=float, default=None, help="minimum role score for a head to be chosen")
    g.add_argument("--top-n", type=int, default=None, help="at most this many heads per role query")
    g.add_argument("--score", choices=("share", "variance"), default="variance",
                   help="role score: 'variance' (default, as in `clipdecomp reproduce`) = the fraction of the head's "
                        "top-10 TextSpan variance from the role's texts times that variance, so heads that write "
                        "much of the role rank first (use with --top-n); 'share' = the fraction alone")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, required=True, metavar="DIR", help="Waterbirds folder: metadata.csv (img_id,img_filename,y,split,place,place_filename) + images")
    g.add_argument("--means-split", choices=_SPLITS, default="val", help="split the ablation means are taken over (default val)")
    g.add_argument("--allow-eval-split-means", action="store_true", help="allow --means-split to equal the evaluated split (leaks test data; off by default)")
    g.add_argument("--classes", default=None, metavar="Y0,Y1", help="class names for y=0,y=1 (default: DIR/classes.json, else landbird,waterbird)")
    g.add_argument("--templates", default=None, help="'openai' (80 ImageNet templates, default), 'simple', or a file with one '{}' template per line")
    g.add_argument("--random-trials", type=int, default=5, help="random-heads baseline draws, best by worst-group (default 5; 0 to skip)")
    g.add_argument("--seed", type=int, default=0, help="first seed of the random-heads draws")
    g.add_argument("--batch-size", type=int, default=64)
    g.add_argument("--num-workers", type=int, default=0)
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")


def build_repair_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipdecomp repair",
        description=(
            "Mean-ablate attention heads chosen by TextSpan role (or listed), bake the ablation into a stock "
            "open_clip model, and export it in open_clip's hub layout (open_clip_config.json, "
            "open_clip_model.safetensors with provenance metadata, README.md model card)."
        ),
        epilog=__doc__.split("\n\n")[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_model_args(p)
    _add_selection_args(p, required=True)
    _add_data_args(p)
    g = p.add_argument_group("output")
    g.add_argument("--out", type=Path, required=True, metavar="FOLDER", help="export folder (written whole or not at all)")
    g.add_argument("--evaluate", action="store_true", help="evaluate base / exact / baked / random heads on the test split and put the table in the model card")
    g.add_argument("--eval-split", choices=_SPLITS, default="test", help="split evaluated with --evaluate (default test)")
    g.add_argument("--base-model-id", default=None, help="Hub id for the model card's base_model (default: derived from the base model)")
    g.add_argument("--push-to-hub", default=None, metavar="REPO", help="upload the folder to this Hugging Face model repo (needs a token)")
    g.add_argument("--private", action="store_true", help="create the Hub repo as private")
    g.add_argument("--no-verify", action="store_true", help="skip reloading the export with stock open_clip before renaming it into place")
    return p


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipdecomp waterbirds-eval",
        description=(
            "Zero-shot Waterbirds group accuracies (4 groups, worst group, average) of a model and, with "
            "--heads or --roles, of its exact and baked head-ablation repairs and the random-heads baseline."
        ),
    )
    _add_model_args(p)
    _add_selection_args(p, required=False)
    _add_data_args(p)
    p.add_argument("--split", choices=_SPLITS, default="test", help="split to evaluate (default test)")
    p.add_argument("--no-baked", action="store_true", help="skip the baked-repair row")
    p.add_argument("--ablate-mlps", action="store_true", help="exact and random rows also mean-ablate every MLP's direct contribution (paper's fuller ablation; not baked)")
    p.add_argument("--ablate-layers-before", type=int, default=None, metavar="K", help="exact and random rows also mean-ablate all direct contributions of layers < K (not baked)")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write waterbirds_eval.{md,csv,json} here")
    return p


# ---------------------------------------------------------------------------- steps


def _load(args: argparse.Namespace) -> LoadedModel:
    return load_model(args.model, args.pretrained, device=args.device)


def _select(args: argparse.Namespace, model: LoadedModel, required: bool) -> Optional[HeadSelection]:
    L, H = model_shape(model)
    has_roles = args.roles is not None or args.textspan is not None
    if args.heads is not None and has_roles:
        raise InputError("pass either --heads or --textspan/--roles, not both.")
    if args.heads is not None:
        return select_explicit(args.heads, L, H)
    if not has_roles:
        if required:
            raise InputError("choose the heads: --textspan FILE --roles 'q1,q2' (with --threshold or --top-n), or --heads L.H,...")
        return None
    if args.textspan is None or args.roles is None:
        raise InputError("role selection needs both --textspan FILE and --roles 'q1,q2'.")
    if not args.textspan.is_file():
        raise InputError(f"--textspan {args.textspan}: file not found.")
    return select_by_roles(args.textspan, args.roles, L, H, model=model, top_n=args.top_n, threshold=args.threshold, score=args.score)


def _means(args: argparse.Namespace, model: LoadedModel, eval_split: str) -> RepairMeans:
    split = check_means_split(args.means_split, eval_split, args.allow_eval_split_means)
    loader = waterbirds_loader(args.data, split, model.preprocess, batch_size=args.batch_size, num_workers=args.num_workers)
    means = compute_repair_means(model, loader, progress=not args.no_progress, split=split)
    print(f"means over the {split!r} split: {means.count} images", file=sys.stderr)
    return means


def _check_common(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}.")
    if args.random_trials < 0:
        raise InputError(f"--random-trials must be >= 0, got {args.random_trials}.")
    if args.top_n is not None and args.top_n < 1:
        raise InputError(f"--top-n must be >= 1, got {args.top_n}.")


def _print_agreement(a: dict[str, Any]) -> None:
    print(
        f"baked vs exact embeddings ({a['n']} images): mean cosine {a['mean_cos']:.4f} (min {a['min_cos']:.4f}), "
        f"relative L2 {a['rel_l2']:.4f} (max {a['max_rel_l2']:.4f})"
    )


def _run(fn, argv: Optional[list[str]]) -> int:
    try:
        return fn(argv)
    except ClipDecompError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


# ---------------------------------------------------------------------------- commands


def _repair(argv: Optional[list[str]]) -> int:
    from .export import export_repaired, push_to_hub

    args = build_repair_parser().parse_args(argv)
    _check_common(args)
    if args.evaluate:
        check_means_split(args.means_split, args.eval_split, args.allow_eval_split_means)
    # validate the data folder and text options before the slow steps
    classnames = resolve_classnames(args.data, args.classes)
    templates = resolve_templates(args.templates)
    model = _load(args)
    selection = _select(args, model, required=True)
    print(selection.describe())
    means = _means(args, model, args.eval_split if args.evaluate else "test")
    heads = selection.pairs()
    baked = bake_ablation(model, means, heads)
    report = None
    if args.evaluate:
        report = evaluate_waterbirds(
            model, args.data, heads=heads, means=means, baked=baked, classnames=classnames, templates=templates,
            split=args.eval_split, random_trials=args.random_trials, random_seed=args.seed,
            batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress,
        )
        agreement = report.agreement
        print(report.markdown())
    else:
        loader = waterbirds_loader(args.data, means.split, model.preprocess, batch_size=args.batch_size, num_workers=args.num_workers)
        agreement = measure_agreement(model, baked, means, heads, loader, progress=not args.no_progress)
        agreement["split"] = means.split
        _print_agreement(agreement)
    out = export_repaired(
        args.out, baked, base=model, selection=selection, means=means, evaluation=report, agreement=agreement,
        base_model_id=args.base_model_id, verify=not args.no_verify,
        extra_files=None if report is None else {"waterbirds_eval.md": report.markdown(), "waterbirds_eval.csv": report.csv()},
    )
    print(f"exported: {out}  (open_clip.create_model_and_transforms('local-dir:{out}'))")
    if args.push_to_hub:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
        print(f"pushed: {url}")
    return 0


def _waterbirds_eval(argv: Optional[list[str]]) -> int:
    args = build_eval_parser().parse_args(argv)
    _check_common(args)
    classnames = resolve_classnames(args.data, args.classes)
    templates = resolve_templates(args.templates)
    model = _load(args)
    selection = _select(args, model, required=False)
    exact_options: dict[str, Any] = {}
    if args.ablate_mlps:
        exact_options["mlps"] = "all"
    if args.ablate_layers_before is not None:
        exact_options["layers_up_to"] = args.ablate_layers_before
    means = baked = None
    heads: list[tuple[int, int]] = []
    if selection is not None:
        print(selection.describe())
        heads = selection.pairs()
    if selection is not None or exact_options:
        means = _means(args, model, args.split)
        if not args.no_baked and selection is not None:
            baked = bake_ablation(model, means, heads)
    report = evaluate_waterbirds(
        model, args.data, heads=heads, means=means, baked=baked, classnames=classnames, templates=templates,
        split=args.split, random_trials=args.random_trials, random_seed=args.seed, exact_options=exact_options,
        batch_size=args.batch_size, num_workers=args.num_workers, progress=not args.no_progress,
    )
    if selection is not None:
        report.meta["selection"] = selection.to_json()
    print(report.markdown())
    if args.out is not None:
        paths = report.write(args.out)
        print("wrote " + ", ".join(str(p) for p in paths.values()))
    return 0


def main(argv: Optional[list[str]] = None) -> int:
    """``clipdecomp repair``."""
    return _run(_repair, argv)


def waterbirds_eval_main(argv: Optional[list[str]] = None) -> int:
    """``clipdecomp waterbirds-eval``."""
    return _run(_waterbirds_eval, argv)


if __name__ == "__main__":
    sys.exit(main())
