"""Repair tab: choose heads by role or by name, mean-ablate them, evaluate on a toy
Waterbirds set, and download the repaired model.

Plain functions (no Gradio), all built on :mod:`repair`:

* :func:`select_heads`: :func:`repair.select.select_by_roles` and/or
  :func:`repair.select.select_explicit`;
* :func:`toy_waterbirds`: a small toy Waterbirds folder made on demand
  (:func:`clipdecomp.toyworld.datasets.make_waterbirds`, cached);
* :func:`evaluate_repair`: means over the val split (:func:`repair.bake.compute_repair_means`,
  cached per model), the baked model (:func:`repair.bake.bake_ablation`) and
  :func:`repair.waterbirds_eval.evaluate_waterbirds` on the test split (base, exact repair,
  baked repair, random heads);
* :func:`export_zip`: :func:`repair.export.export_repaired` (hub layout, verified by
  reloading with stock open_clip), zipped.

Endpoints: ``/select_heads``, ``/repair_eval``, ``/repair_export``.
"""

from __future__ import annotations

import shutil
import zipfile
from pathlib import Path
from typing import Any, Optional, Sequence

from clipdecomp.errors import InputError

from .limits import check_int, head_label, parse_head_labels
from .state import DemoState, ModelBundle

__all__ = ["SELECTION_HEADERS", "select_heads", "selection_rows", "toy_waterbirds", "evaluate_repair",
           "report_rows", "two_by_two", "export_zip", "build"]

SELECTION_HEADERS = ["head", "why", "the head's role", "score"]
_WB_SEED = 0


def _roles(roles: Any) -> list[str]:
    if roles is None:
        return []
    items = roles.split(",") if isinstance(roles, str) else list(roles)
    return [" ".join(str(r).split()) for r in items if str(r).strip()]


def select_heads(bundle: ModelBundle, roles: Any = None, heads: Any = None, *, threshold: Any = 0.5,
                 top_n: Any = None) -> Any:
    """The heads to ablate: every head whose role score for one of ``roles`` is at least
    ``threshold`` (and/or the ``top_n`` best per role), plus the listed ``heads``.

    Returns:
        a :class:`repair.select.HeadSelection`.

    Raises:
        InputError: nothing chosen, roles without TextSpan results, no head matching.
    """
    from repair.select import HeadSelection, select_by_roles, select_explicit

    L, H = bundle.n_layers, bundle.n_heads
    role_list = _roles(roles)
    explicit = select_explicit(parse_head_labels(heads, L, H), L, H)
    if not role_list:
        if not len(explicit):
            raise InputError("Choose at least one role or one head to ablate.")
        return explicit
    if bundle.results is None:
        raise InputError("Choosing heads by role needs TextSpan results for this model (see the Head roles tab).")
    thr = None if threshold is None or threshold == "" else float(threshold)
    if thr is not None and not 0.0 <= thr <= 1.0:
        raise InputError(f"The role-score threshold must be between 0 and 1, got {threshold!r}.")
    n = None if top_n in (None, "", 0) else check_int(top_n, "Heads per role", 1, L * H)
    if thr is None and n is None:
        raise InputError("Give a role-score threshold or a number of heads per role.")
    sel = select_by_roles(bundle.results, role_list, L, H, model=bundle.lm, top_n=n, threshold=thr)
    if len(explicit):
        chosen = {c.label: c for c in sel.heads}
        chosen.update({c.label: c for c in explicit.heads})
        sel = HeadSelection(sorted(chosen.values(), key=lambda c: (c.layer, c.head)), "roles+explicit", L, H,
                            {**sel.query, "heads": explicit.spec()})
    if not len(sel):
        raise InputError(f"No head has a role score of at least {thr} for {role_list}; lower the threshold "
                         "or give a number of heads per role.")
    return sel


def selection_rows(selection: Any, results: Any = None) -> list[list[Any]]:
    """Rows ``[head, why, the head's role, score]`` of a HeadSelection (the head's role from
    the selection, else from the TextSpan ``results``)."""
    roles = {head_label(h.layer, h.head): h.role for h in results.heads} if results is not None else {}
    return [[head_label(c.layer, c.head), c.why(), getattr(c, "head_role", None) or roles.get(c.label, ""),
             None if c.score is None else round(float(c.score), 3)] for c in selection.heads]


def toy_waterbirds(state: DemoState) -> Path:
    """A toy Waterbirds folder at ``config.waterbirds_scale`` (made once, in the cache folder)."""
    from clipdecomp.toyworld.datasets import make_waterbirds

    scale = float(state.config.waterbirds_scale)
    root = state.cache_dir / f"toy-waterbirds-scale{scale:g}-seed{_WB_SEED}"
    with state.files_lock:
        if not (root / "metadata.csv").is_file():
            make_waterbirds(root, _WB_SEED, scale)
    return root


def _means(state: DemoState, bundle: ModelBundle, root: Path) -> Any:
    from repair.bake import compute_repair_means
    from repair.waterbirds_eval import waterbirds_loader

    def make() -> Any:
        loader = waterbirds_loader(root, "val", bundle.lm.preprocess, batch_size=64)
        return compute_repair_means(bundle.lm, loader, progress=False, split="val")

    return bundle.cached(("repair-means", str(root)), make)


def _repaired(state: DemoState, selection: Any) -> tuple[ModelBundle, Path, Any, Any]:
    from repair.bake import bake_ablation

    bundle = state.bundle
    root = toy_waterbirds(state)
    means = _means(state, bundle, root)
    return bundle, root, means, bake_ablation(bundle.lm, means, selection.pairs())


def evaluate_repair(state: DemoState, selection: Any) -> Any:
    """Base vs repaired zero-shot group accuracies on the toy Waterbirds test split
    (a :class:`repair.waterbirds_eval.WaterbirdsReport`; kept for :func:`export_zip`)."""
    from repair.waterbirds_eval import evaluate_waterbirds

    bundle, root, means, baked = _repaired(state, selection)
    heads = selection.pairs()
    report = evaluate_waterbirds(bundle.lm, root, heads=heads, means=means, baked=baked, split="test",
                                 random_trials=state.config.random_trials, progress=False)
    with bundle.lock:
        bundle.memo[("repair-report", tuple(heads))] = report
    return report


def _group_labels(report: Any) -> list[str]:
    c = report.meta.get("classnames") or ["landbird", "waterbird"]
    return [f"{c[0]} on land", f"{c[0]} on water", f"{c[1]} on land", f"{c[1]} on water"]


def report_rows(report: Any) -> tuple[list[str], list[list[Any]]]:
    """Headers and rows (percentages) of the full table: one row per model."""
    from clipdecomp.data.waterbirds import GROUP_NAMES

    headers = ["model", *_group_labels(report), "worst group", "average"]
    rows = []
    for name, res in report.rows.items():
        vals = [res["groups"][g]["accuracy"] for g in GROUP_NAMES] + [res["worst"], res["average"]]
        rows.append([name] + [round(100.0 * float(v), 1) for v in vals])
    return headers, rows


def two_by_two(report: Any) -> str:
    """Markdown 2x2 (class x place) of base -> baked repair accuracies (%)."""
    from clipdecomp.data.waterbirds import GROUP_NAMES

    base = report.rows["base"]
    rep_name = next((n for n in report.rows if n.startswith("baked")), None) or next(
        (n for n in report.rows if n != "base"), "base")
    rep = report.rows[rep_name]
    c = report.meta.get("classnames") or ["landbird", "waterbird"]
    cell = {g: f"{100 * base['groups'][g]['accuracy']:.1f} → {100 * rep['groups'][g]['accuracy']:.1f}"
            for g in GROUP_NAMES}
    return "\n".join([
        f"**Accuracy (%), base → {rep_name}**, toy Waterbirds test split ({report.meta.get('n')} images)",
        "",
        "| class | on land | on water |",
        "|---|---:|---:|",
        f"| {c[0]} | {cell[GROUP_NAMES[0]]} | {cell[GROUP_NAMES[1]]} |",
        f"| {c[1]} | {cell[GROUP_NAMES[2]]} | {cell[GROUP_NAMES[3]]} |",
        "",
        f"Worst group: {100 * base['worst']:.1f} → {100 * rep['worst']:.1f}.",
    ])


def export_zip(state: DemoState, selection: Any) -> Path:
    """The repaired model in open_clip's hub layout (verified by reloading it), zipped;
    the model card includes the evaluation if :func:`evaluate_repair` ran for these heads."""
    from repair.export import export_repaired

    bundle, _, means, baked = _repaired(state, selection)
    report = bundle.memo.get(("repair-report", tuple(selection.pairs())))
    out = state.new_output_dir("repair-")
    heads = "_".join(f"L{l}H{h}" for l, h in selection.pairs())[:80]
    folder = export_repaired(out / "model", baked, base=bundle.lm, selection=selection, means=means,
                             evaluation=report)
    archive = _zip_folder(folder, out / f"clipdecomp-repaired-{heads}.zip")
    shutil.rmtree(folder, ignore_errors=True)
    return archive


def _zip_folder(folder: Path, path: Path) -> Path:
    """Zip ``folder``'s files at the archive root; weights stored uncompressed (deflating
    float weights takes seconds per 10 MB and saves little)."""
    with zipfile.ZipFile(path, "w") as zf:
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            method = zipfile.ZIP_STORED if f.suffix == ".safetensors" else zipfile.ZIP_DEFLATED
            zf.write(f, f.relative_to(folder).as_posix(), compress_type=method)
    return path


# ----------------------------------------------------------------------------- UI


def build(state: DemoState) -> dict[str, Any]:
    """The tab's components and endpoints (call inside ``gr.Tab``)."""
    import gradio as gr

    from .components import ui_handler
    from .retrieval_tab import role_options

    bundle = state.bundle
    gr.Markdown("Mean-ablate heads (replace their direct contribution by its mean over the toy Waterbirds val "
                "split), then compare zero-shot accuracy per (class, place) group on its test split. On the toy "
                "world the classes are squares and triangles, and the spurious cue is the background.")
    with gr.Row():
        roles_opts = role_options(bundle)
        roles = gr.Dropdown(label="Roles", choices=roles_opts, multiselect=True, allow_custom_value=True,
                            value=["scenes and settings"] if "scenes and settings" in roles_opts else [])
        threshold = gr.Slider(0, 1, value=0.5, step=0.05, label="Minimum role score")
        top_n = gr.Number(label="...or heads per role (0: use the threshold)", value=0, precision=0, minimum=0)
        heads = gr.Dropdown(label="Heads (in addition)", multiselect=True, allow_custom_value=True,
                            choices=[head_label(l, h) for l in range(bundle.n_layers) for h in range(bundle.n_heads)])
    with gr.Row():
        select = gr.Button("Select heads")
        evaluate = gr.Button("Evaluate on toy Waterbirds", variant="primary")
        export = gr.Button("Export repaired model (.zip)")
    chosen = gr.Dataframe(headers=SELECTION_HEADERS, label="Selected heads", interactive=False, wrap=True)
    summary = gr.Markdown()
    table = gr.Dataframe(label="Group accuracies (%)", interactive=False, wrap=True)
    download = gr.File(label="Repaired model (open_clip hub layout)", interactive=False)

    def _select(roles_value: Any, heads_value: Any, threshold_value: float, top_n_value: float) -> Any:
        return select_heads(state.bundle, roles_value, heads_value, threshold=threshold_value,
                            top_n=top_n_value or None)

    @ui_handler
    def select_fn(roles_value: Any, heads_value: Any, threshold_value: float, top_n_value: float):
        sel = _select(roles_value, heads_value, threshold_value, top_n_value)
        return {"headers": SELECTION_HEADERS, "data": selection_rows(sel, state.bundle.results)}

    @ui_handler
    def evaluate_fn(roles_value: Any, heads_value: Any, threshold_value: float, top_n_value: float,
                    progress=gr.Progress()):
        sel = _select(roles_value, heads_value, threshold_value, top_n_value)
        progress(0.1, desc="toy Waterbirds, means, evaluation")
        report = evaluate_repair(state, sel)
        headers, rows = report_rows(report)
        return ({"headers": SELECTION_HEADERS, "data": selection_rows(sel, state.bundle.results)}, two_by_two(report),
                {"headers": headers, "data": rows})

    @ui_handler
    def export_fn(roles_value: Any, heads_value: Any, threshold_value: float, top_n_value: float,
                  progress=gr.Progress()):
        sel = _select(roles_value, heads_value, threshold_value, top_n_value)
        progress(0.1, desc="baking and exporting")
        return str(export_zip(state, sel))

    inputs = [roles, heads, threshold, top_n]
    select.click(select_fn, inputs, chosen, api_name="select_heads", concurrency_id="fast")
    evaluate.click(evaluate_fn, inputs, [chosen, summary, table], api_name="repair_eval", concurrency_id="slow")
    export.click(export_fn, inputs, download, api_name="repair_export", concurrency_id="slow")

    def refresh():
        b = state.bundle
        rs = role_options(b)
        return (gr.update(choices=rs, value=["scenes and settings"] if "scenes and settings" in rs else []),
                gr.update(choices=[head_label(l, h) for l in range(b.n_layers) for h in range(b.n_heads)], value=[]))

    return {"refresh": refresh, "refresh_outputs": [roles, heads]}
