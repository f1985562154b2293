"""Zero-shot Waterbirds evaluation of a model and its head-ablation repairs.

Protocol (``shared/notes/protocols.md``): classes "landbird" / "waterbird" (or the
folder's ``classes.json``, or ``--classes``), each embedded with the 80 OpenAI ImageNet
templates and averaged; accuracy per ``(y, place)`` group on the test split; report
the four groups, the worst group and the average.

Rows of the report (:func:`evaluate_waterbirds`):

* ``base``: the model as it is;
* ``exact repair``: the chosen heads' direct contributions replaced by their means in
  the decomposition;
* ``baked repair``: the weight-edited stock model (:func:`repair.bake.bake_ablation`);
* ``random heads (best of N)``: as many random heads from the same layers, exact
  ablation, the best of ``N`` seeded draws by worst-group accuracy (every draw is kept
  in the JSON).

The test split is streamed once: every row's logits come from the same decomposition
of each batch, plus one forward pass of the baked model.

The command line is ``clipdecomp waterbirds-eval`` (:func:`main`, in :mod:`repair.cli`).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence, Union

import torch

from clipdecomp.data.waterbirds import (
    EXPECTED_LAYOUT,
    WaterbirdsDataset,
    group_accuracies,
    group_table_csv,
    group_table_markdown,
    split_code,
)
from clipdecomp.decomposition import decompose
from clipdecomp.errors import InputError
from clipdecomp.loading import LoadedModel
from clipdecomp.zeroshot import OPENAI_IMAGENET_TEMPLATES, zero_shot_classifier, zero_shot_logits

from .bake import AgreementMeter, RepairMeans, exact_embeddings
from .select import format_heads, random_heads

__all__ = [
    "DEFAULT_CLASSNAMES",
    "SIMPLE_TEMPLATES",
    "resolve_classnames",
    "resolve_templates",
    "check_means_split",
    "waterbirds_loader",
    "WaterbirdsReport",
    "evaluate_waterbirds",
    "main",
]

DEFAULT_CLASSNAMES: tuple[str, str] = ("landbird", "waterbird")
SIMPLE_TEMPLATES: tuple[str, ...] = ("a photo of a {}.",)
_SPLIT_NAMES = {0: "train", 1: "val", 2: "test"}

Template = Union[str, Callable[[str], str]]
Head = tuple[int, int]


def resolve_classnames(root: Union[str, os.PathLike], classes: Optional[Union[str, Sequence[str]]] = None) -> list[str]:
    """The two class names, for ``y = 0`` and ``y = 1``.

    Precedence: ``classes`` (a list or ``"a,b"``), else ``ROOT/classes.json``
    (``{"0": name, "1": name}``) if present, else ``("landbird", "waterbird")``.

    Raises:
        InputError: not exactly two non-empty names, or a malformed ``classes.json``.
    """
    if classes is not None:
        names = [c.strip() for c in classes.split(",")] if isinstance(classes, str) else [str(c).strip() for c in classes]
        if len(names) != 2 or not all(names):
            raise InputError(f"--classes needs exactly two non-empty names (y=0 first, then y=1), got {classes!r}.")
        return names
    path = Path(root) / "classes.json"
    if path.is_file():
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
            names = [str(obj["0"]).strip(), str(obj["1"]).strip()]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise InputError(
                f"{path}: expected a JSON object {{\"0\": NAME, \"1\": NAME}} naming the y=0 and y=1 classes "
                f"({type(e).__name__}: {e})."
            ) from e
        if not all(names):
            raise InputError(f"{path}: class names must be non-empty, got {names}.")
        return names
    return list(DEFAULT_CLASSNAMES)


def resolve_templates(spec: Optional[Union[str, os.PathLike, Sequence[Template]]] = None) -> list[Template]:
    """Prompt templates: ``None`` / ``"openai"`` (the 80 OpenAI ImageNet templates),
    ``"simple"`` (``"a photo of a {}."``), a path to a text file with one ``{}`` template
    per line, or a sequence of templates.

    Raises:
        InputError: unknown name, unreadable file, or a template without ``{}``.
    """
    if spec is None or (isinstance(spec, str) and spec.strip().lower() == "openai"):
        return list(OPENAI_IMAGENET_TEMPLATES)
    if isinstance(spec, str) and spec.strip().lower() == "simple":
        return list(SIMPLE_TEMPLATES)
    if isinstance(spec, (str, os.PathLike)):
        path = Path(spec)
        if not path.is_file():
            raise InputError(
                f"--templates {os.fspath(spec)!r}: expected 'openai', 'simple' or a text file with one template "
                "per line, each containing '{}' where the class name goes."
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise InputError(f"cannot read templates file {path}: {e}") from e
        templates: list[Template] = [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
        source = str(path)
    else:
        templates = list(spec)
        source = "templates"
    if not templates:
        raise InputError(f"{source}: no templates.")
    bad = [t for t in templates if isinstance(t, str) and "{}" not in t]
    if bad:
        raise InputError(f"{source}: templates must contain '{{}}' for the class name, e.g. 'a photo of a {{}}.'; got {bad[0]!r}.")
    return templates


def check_means_split(means_split: Union[str, int], eval_split: Union[str, int], allow_eval_split: bool = False) -> str:
    """Refuse means taken over the evaluation split (the public code's pitfall) unless
    explicitly allowed; return the means split's name."""
    m, e = split_code(means_split), split_code(eval_split)
    if m == e and not allow_eval_split:
        raise InputError(
            f"the ablation means would be computed on the evaluation split ({_SPLIT_NAMES[e]!r}), which leaks "
            "test information into the repair; use --means-split train or val "
            "(or pass --allow-eval-split-means to do it anyway)."
        )
    return _SPLIT_NAMES[m]


def waterbirds_loader(
    root: Union[str, os.PathLike], split: Union[str, int], preprocess: Callable, *, batch_size: int = 64, num_workers: int = 0
) -> torch.utils.data.DataLoader:
    """An in-order DataLoader over one split yielding ``(images [B,3,H,W], y [B], place [B])``.

    Raises:
        InputError: a missing or malformed ``metadata.csv``, missing images, or an empty split.
    """
    ds = WaterbirdsDataset(root, split, transform=preprocess)
    if len(ds) == 0:
        raise InputError(f"{root}: the {_SPLIT_NAMES[split_code(split)]!r} split is empty; {EXPECTED_LAYOUT}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    return torch.utils.data.DataLoader(ds, batch_size=batch_size, shuffle=False, num_workers=num_workers)


@dataclass
class WaterbirdsReport:
    """Results of :func:`evaluate_waterbirds`.

    Attributes:
        rows: row name -> :func:`clipdecomp.data.waterbirds.group_accuracies` result, in
            table order.
        random_trials: every random-heads draw: ``{"seed", "heads", "result"}``.
        agreement: baked vs exact embeddings on the evaluated images
            (:func:`repair.bake.embedding_agreement`), or ``None``.
        meta: split, sizes, class names, template count, heads, means provenance.
    """

    rows: dict[str, dict[str, Any]]
    random_trials: list[dict[str, Any]] = field(default_factory=list)
    agreement: Optional[dict[str, float]] = None
    meta: dict[str, Any] = field(default_factory=dict)

    def markdown(self) -> str:
        """The group table (percentages) plus notes on heads, means and agreement."""
        out = [group_table_markdown(self.rows)]
        m = self.meta
        notes = [
            f"Zero-shot, {m.get('split')} split ({m.get('n')} images), classes {m.get('classnames')}, "
            f"{m.get('n_templates')} template(s)."
        ]
        if m.get("heads"):
            notes.append(f"Ablated heads ({len(m['heads'])}): {format_heads(m['heads'])}.")
        if m.get("means_split"):
            notes.append(f"Means over the {m['means_split']!r} split ({m.get('means_count')} images).")
        if m.get("exact_options"):
            notes.append(f"Exact-repair options: {m['exact_options']}.")
        if self.random_trials:
            best = m.get("random_best_seed")
            trials = ", ".join(
                f"seed {t['seed']}: {format_heads(t['heads'])} -> worst {100 * t['result']['worst']:.1f}"
                for t in self.random_trials
            )
            notes.append(f"Random heads: best seed {best} of {len(self.random_trials)} ({trials}).")
        if self.agreement:
            a = self.agreement
            notes.append(
                f"Baked vs exact embeddings: mean cosine {a['mean_cos']:.4f} (min {a['min_cos']:.4f}), "
                f"relative L2 {a['rel_l2']:.4f} (max {a['max_rel_l2']:.4f}) over {a['n']} images."
            )
        return out[0] + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"

    def csv(self) -> str:
        """The group table as CSV (percentages, per-group counts)."""
        return group_table_csv(self.rows)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "random_trials": self.random_trials, "agreement": self.agreement, "meta": self.meta}

    def write(self, out_dir: Union[str, os.PathLike], stem: str = "waterbirds_eval") -> dict[str, Path]:
        """Write ``STEM.md``, ``STEM.csv`` and ``STEM.json`` into ``out_dir`` (atomically, file by file)."""
        from clipdecomp.io import atomic_write_text

        out = Path(out_dir)
        paths = {"markdown": out / f"{stem}.md", "csv": out / f"{stem}.csv", "json": out / f"{stem}.json"}
        atomic_write_text(paths["markdown"], self.markdown())
        atomic_write_text(paths["csv"], self.csv())
        atomic_write_text(paths["json"], json.dumps(self.to_json(), indent=2) + "\n")
        return paths


def _best_trial(trials: list[dict[str, Any]]) -> dict[str, Any]:
    return max(trials, key=lambda t: (t["result"]["worst"], t["result"]["average"]))


def evaluate_waterbirds(
    model: LoadedModel,
    root: Union[str, os.PathLike],
    *,
    heads: Sequence[Head] = (),
    means: Optional[RepairMeans] = None,
    baked: Optional[torch.nn.Module] = None,
    classnames: Optional[Sequence[str]] = None,
    templates: Optional[Sequence[Template]] = None,
    split: Union[str, int] = "test",
    random_trials: int = 5,
    random_seed: int = 0,
    exact_options: Optional[dict[str, Any]] = None,
    batch_size: int = 64,
    num_workers: int = 0,
    progress: bool = True,
) -> WaterbirdsReport:
    """Zero-shot group accuracies of the base model and its repairs on one split.

    Args:
        model: the base model (its text tower embeds the class prompts for every row;
            baking changes only the image tower).
        root: the Waterbirds folder (``metadata.csv`` + images).
        heads: the chosen ``(layer, head)`` pairs; with ``means`` they give the exact
            repair and the random baseline rows.
        means: from :func:`repair.bake.compute_repair_means` (on another split).
        baked: the baked model (:func:`repair.bake.bake_ablation`) for the baked row.
        classnames: two names (y=0, y=1); default :func:`resolve_classnames`.
        templates: default the 80 OpenAI templates.
        split: the evaluated split (default test).
        random_trials: random-head draws (0 to skip); seeds ``random_seed + i``.
        exact_options: extra arguments to :func:`clipdecomp.ablation.ablated_embedding`
            for the exact and random rows (e.g. ``{"mlps": "all"}``).
        batch_size, num_workers: data loading.
        progress: show a tqdm bar.

    Returns:
        A :class:`WaterbirdsReport`.
    """
    from tqdm.auto import tqdm

    heads = [(int(l), int(h)) for l, h in heads]
    if heads and means is None:
        raise InputError("heads were given without means: compute them with repair.bake.compute_repair_means.")
    exact_options = dict(exact_options or {})
    names = list(classnames) if classnames is not None else resolve_classnames(root)
    tmpl = list(templates) if templates is not None else resolve_templates(None)
    loader = waterbirds_loader(root, split, model.preprocess, batch_size=batch_size, num_workers=num_workers)
    classifier = zero_shot_classifier(model, names, tmpl)

    n_heads = int(model.visual.transformer.resblocks[0].attn.num_heads)
    layers = sorted({l for l, _ in heads})
    trials = []
    if heads and random_trials > 0:
        trials = [{"seed": random_seed + i, "heads": random_heads(layers, n_heads, len(heads), random_seed + i)} for i in range(random_trials)]
    variants: dict[str, Optional[list[Head]]] = {"base": None}
    if means is not None and (heads or exact_options):
        variants["exact"] = heads
    for i, t in enumerate(trials):
        variants[f"random{i}"] = t["heads"]
    logits: dict[str, list[torch.Tensor]] = {k: [] for k in variants}
    if baked is not None:
        logits["baked"] = []
    ys, places = [], []
    meter = AgreementMeter() if baked is not None and "exact" in variants else None
    baked_visual = baked.visual if hasattr(baked, "visual") else baked
    dev, dt = model.device, model.dtype
    with torch.no_grad():
        for images, y, place in tqdm(loader, disable=not progress, desc=f"waterbirds {_SPLIT_NAMES[split_code(split)]}", unit="batch", dynamic_ncols=True):
            images = images.to(device=dev, dtype=dt)
            dec = decompose(model, images, token_layers=None)
            embs: dict[str, torch.Tensor] = {}
            for name, hs in variants.items():
                embs[name] = dec.total() if hs is None else exact_embeddings(dec, means, hs, **exact_options)
                logits[name].append(zero_shot_logits(embs[name], classifier).cpu())
            if baked is not None:
                b = baked_visual(images)
                logits["baked"].append(zero_shot_logits(b, classifier).cpu())
                if meter is not None:
                    meter.update(b, embs["exact"])
            ys.append(y)
            places.append(place)
    y_all, p_all = torch.cat(ys), torch.cat(places)
    res = {k: group_accuracies(torch.cat(v), y_all, p_all) for k, v in logits.items()}
    for i, t in enumerate(trials):
        t["result"] = res.pop(f"random{i}")

    k = len(heads)
    rows: dict[str, dict[str, Any]] = {"base": res["base"]}
    if "exact" in res:
        rows[f"exact repair ({k} heads)"] = res["exact"]
    if "baked" in res:
        rows[f"baked repair ({k} heads)"] = res["baked"]
    meta: dict[str, Any] = {
        "split": _SPLIT_NAMES[split_code(split)],
        "n": int(len(y_all)),
        "classnames": names,
        "n_templates": len(tmpl),
        "heads": heads,
        "exact_options": exact_options or None,
    }
    if trials:
        best = _best_trial(trials)
        rows[f"random heads (best of {len(trials)})"] = best["result"]
        meta["random_best_seed"] = best["seed"]
        meta["random_layers"] = layers
    if means is not None:
        meta["means_split"] = means.split
        meta["means_count"] = means.count
    return WaterbirdsReport(rows=rows, random_trials=trials, agreement=None if meter is None else meter.result(), meta=meta)


def main(argv: Optional[list[str]] = None) -> int:
    """``clipdecomp waterbirds-eval`` (see :func:`repair.cli.waterbirds_eval_main`)."""
    from .cli import waterbirds_eval_main

    return waterbirds_eval_main(argv)
