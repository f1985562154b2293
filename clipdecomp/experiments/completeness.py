"""Completeness of the TextSpan bases: zero-shot accuracy from the first k texts per head
(Gandelsman et al., ICLR 2024, Figure 4).

For every head ``(l, h)`` of the analysed (late) layers, its direct contribution
``c`` is replaced by ``mu + P_k (c - mu)``, where ``P_k`` projects onto the span of
the head's first ``k`` TextSpan directions and ``mu`` is the head's mean from the
mean split; every other part (the class-token embedding term, all MLPs, all heads of
earlier layers) is replaced by its mean. Taking ``mu`` from the same means as the
ablation makes ``k = 0`` exactly the all-parts mean ablation, and a basis that spans
the head's outputs gives back the ceiling. A head whose TextSpan stopped after
``k_lh < k`` texts uses all ``k_lh``.

Reported settings (rows of :func:`run_completeness`):

* ``base``: the model's own embedding (``Decomposition.total()``);
* ``ceiling``: late heads kept exactly, everything else mean-ablated;
* ``ablated``: everything mean-ablated (a constant embedding; equals ``k = 0``);
* ``textspan``: one row per pool and k.

All parts are the unnormalised direct contributions (they sum to ``encode_image``);
the zero-shot classifier normalises the resulting embedding. Means come from a
separate image folder, as in the paper.

    python -m clipdecomp.experiments.completeness --help
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..ablation import PartMeans
from ..decomposition import Decomposition
from ..commands.common import add_model_arguments
from ..errors import ClipDecompError, InputError
from ..io import atomic_write_text
from ..zeroshot import TemplatesOrPromptSets
from ..textspan_results import TextSpanResults

__all__ = [
    "DEFAULT_KS",
    "ablated_constant",
    "ceiling_embedding",
    "completeness_embeddings",
    "bases_from_results",
    "run_completeness",
    "write_csv",
    "main",
]

#: Values of k of the paper's Figure 4 (k = 0: every part mean-ablated).
DEFAULT_KS: tuple[int, ...] = (0, 1, 2, 5, 10, 20, 40, 60)
FIELDS = ("setting", "pool", "k", "accuracy", "n_images")

Bases = Mapping[tuple[int, int], torch.Tensor]


def ablated_constant(means: PartMeans) -> torch.Tensor:
    """The embedding with every part replaced by its mean ``[D]``:
    ``embed + sum_l mlp_l + sum_{l,h} head_{l,h}`` means."""
    return means.embed + means.mlps.sum(0) + means.heads.sum((0, 1))


def _check(dec: Decomposition, means: PartMeans, layers: Sequence[int]) -> list[int]:
    if means.heads.shape != (dec.layers, dec.n_heads, dec.embed_dim):
        raise InputError(
            f"means have heads {list(means.heads.shape)} but the decomposition needs "
            f"[{dec.layers}, {dec.n_heads}, {dec.embed_dim}] (means of another model?)."
        )
    out = []
    for l in layers:
        if isinstance(l, bool) or not isinstance(l, int) or not 0 <= l < dec.layers:
            raise InputError(f"layers must be absolute layer indices in [0, {dec.layers}), got {l!r}.")
        out.append(l)
    if len(set(out)) != len(out):
        raise InputError(f"layers lists a layer twice: {list(layers)}.")
    return out


def ceiling_embedding(dec: Decomposition, means: PartMeans, layers: Sequence[int]) -> torch.Tensor:
    """Heads of ``layers`` kept exactly, every other part mean-ablated ``[B, D]``."""
    layers = _check(dec, means, layers)
    mu = means.heads[layers].to(dec.device, dec.dtype)  # [nl, H, D]
    late = (dec.heads[:, layers] - mu).sum((1, 2))  # [B, D]
    return ablated_constant(means).to(dec.device, dec.dtype) + late


def completeness_embeddings(
    dec: Decomposition, means: PartMeans, layers: Sequence[int], bases: Bases, ks: Sequence[int]
) -> torch.Tensor:
    """Embeddings with each head of ``layers`` reconstructed from its first k directions
    (``mu + P_k (c - mu)``) and every other part mean-ablated, for each k ``[len(ks), B, D]``.

    Args:
        dec: decomposition of a batch of ``B`` images.
        means: part means (the ``mu`` of each head, and the ablation values).
        layers: absolute indices of the reconstructed layers.
        bases: ``(layer, head) -> [k_lh, D]`` orthonormal TextSpan directions, in order,
            for every head of ``layers``.
        ks: numbers of directions (>= 0); ``k > k_lh`` uses all ``k_lh``.
    """
    layers = _check(dec, means, layers)
    for k in ks:
        if isinstance(k, bool) or not isinstance(k, int) or k < 0:
            raise InputError(f"k values must be ints >= 0, got {k!r}.")
    B, D = dec.batch_size, dec.embed_dim
    out = ablated_constant(means).to(dec.device, dec.dtype).expand(len(ks), B, D).clone()
    heads = dec.heads
    for l in layers:
        for h in range(dec.n_heads):
            if (l, h) not in bases:
                raise InputError(f"no TextSpan basis for layer {l}, head {h}; bases must cover every head of {layers}.")
            b = bases[(l, h)].to(dec.device, dec.dtype)
            if b.ndim != 2 or b.shape[1] != D:
                raise InputError(f"basis of layer {l}, head {h} has shape {list(b.shape)}; expected [k, {D}].")
            coef = (heads[:, l, h] - means.heads[l, h].to(dec.device, dec.dtype)) @ b.T  # [B, k_lh]
            for i, k in enumerate(ks):
                kk = min(k, b.shape[0])
                if kk:
                    out[i] += coef[:, :kk] @ b[:kk]
    return out


def bases_from_results(results: TextSpanResults) -> dict[tuple[int, int], torch.Tensor]:
    """``(layer, head) -> basis [k_lh, D]`` of TextSpan results."""
    return {h.key: h.basis for h in results.heads}


def _load_spans(spans: Mapping[str, Union[TextSpanResults, str, os.PathLike]]) -> dict[str, TextSpanResults]:
    if not spans:
        raise InputError("spans is empty: pass {pool name: TextSpanResults or results FILE.json}.")
    out = {name: s if isinstance(s, TextSpanResults) else TextSpanResults.load(s) for name, s in spans.items()}
    layer_sets = {name: tuple(r.layers) for name, r in out.items()}
    if len(set(layer_sets.values())) != 1:
        raise InputError(f"the TextSpan results cover different layers: {layer_sets}; compute them with the same --layers.")
    return out


def run_completeness(
    model: Any,
    eval_folder: Union[str, os.PathLike],
    means: Union[PartMeans, str, os.PathLike],
    spans: Mapping[str, Union[TextSpanResults, str, os.PathLike]],
    *,
    ks: Sequence[int] = DEFAULT_KS,
    templates: Optional[TemplatesOrPromptSets] = None,
    classnames: Optional[Sequence[str]] = None,
    batch_size: int = 64,
    csv_path: Optional[Union[str, os.PathLike]] = None,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """Zero-shot accuracy on an ImageFolder for the base model, the ceiling, the full
    ablation and each (pool, k).

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel`.
        eval_folder: ``ROOT/CLASS/*.png``; class names are the folder names
            (underscores -> spaces) unless ``classnames`` is given.
        means: :class:`~clipdecomp.ablation.PartMeans`, or a folder of images (a separate
            split; searched recursively, labels ignored) to compute them from.
        spans: ``{pool name: TextSpanResults or FILE.json}``, all on the same layers.
        ks: numbers of TextSpan directions per head.
        templates: prompt templates (``"a photo of a {}."`` or callables) or per-class prompt
            sets; default: OpenAI's ImageNet templates (see :func:`~clipdecomp.zeroshot.class_embeddings`).
        csv_path: also write the table there (atomically).

    Returns:
        Rows ``{"setting", "pool", "k", "accuracy", "n_images"}``: ``base``, ``ceiling``,
        ``ablated``, then ``textspan`` rows in pool order and ``ks`` order.
    """
    from tqdm.auto import tqdm

    from ..ablation import compute_means
    from ..data.imagefolder import classnames as folder_classnames
    from ..data.imagefolder import image_folder
    from ..decomposition import decompose
    from ..images import image_loader
    from ..zeroshot import class_embeddings, predict

    ks = list(ks)
    if not ks:
        raise InputError("ks is empty; e.g. ks=(0, 1, 2, 5, 10, 20, 40, 60).")
    results = _load_spans(spans)
    layers = next(iter(results.values())).layers
    dataset = image_folder(eval_folder, transform=model.preprocess)
    names = list(classnames) if classnames is not None else folder_classnames(eval_folder)
    if len(names) != len(dataset.classes):
        raise InputError(f"{len(names)} class names for {len(dataset.classes)} class folders in {eval_folder}.")
    classifier = class_embeddings(model, names, templates)
    if not isinstance(means, PartMeans):
        means = compute_means(model, image_loader(means, model.preprocess, batch_size), progress=progress)
    bases = {name: bases_from_results(r) for name, r in results.items()}

    correct: dict[tuple[str, str, Any], int] = {}
    n = 0

    def count(key: tuple[str, str, Any], emb: torch.Tensor, labels: torch.Tensor) -> None:
        correct[key] = correct.get(key, 0) + int((predict(emb, classifier) == labels).sum())

    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels in tqdm(loader, desc="completeness", unit="batch", disable=not progress):
        dec = decompose(model, images.to(model.device), token_layers=None)
        labels = labels.to(model.device)
        count(("base", "", ""), dec.total(), labels)
        count(("ceiling", "", ""), ceiling_embedding(dec, means, layers), labels)
        count(("ablated", "", ""), ablated_constant(means).expand(dec.batch_size, -1), labels)
        for pool, b in bases.items():
            embs = completeness_embeddings(dec, means, layers, b, ks)
            for k, emb in zip(ks, embs):
                count(("textspan", pool, k), emb, labels)
        n += dec.batch_size
    rows = [{"setting": s, "pool": p, "k": k, "accuracy": c / n, "n_images": n} for (s, p, k), c in correct.items()]
    if csv_path is not None:
        write_csv(rows, csv_path)
    return rows


def write_csv(rows: Iterable[Mapping[str, Any]], path: Union[str, os.PathLike]) -> None:
    """Write completeness rows as CSV (atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def _parse_spans(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise InputError(f"--spans entries are POOL=FILE.json, got {item!r}.")
        out[name] = path
    return out


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipdecomp.experiments.completeness", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--eval", type=Path, required=True, help="ImageFolder ROOT/CLASS/*.png to classify")
    p.add_argument("--means", type=Path, required=True, help="folder of images (another split) for the part means")
    p.add_argument("--spans", nargs="+", required=True, metavar="POOL=FILE.json", help="TextSpan results per pool")
    p.add_argument("--ks", type=int, nargs="+", default=list(DEFAULT_KS), help="numbers of directions per head")
    p.add_argument("--template", action="append", default=None, help="prompt template with {} (repeatable)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--csv", type=Path, default=None, help="write the table as CSV")
    args = p.parse_args(argv)
    try:
        from ..loading import load_model

        spans = _parse_spans(args.spans)  # before loading a possibly large model
        lm = load_model(args.model, args.pretrained, device=args.device)
        rows = run_completeness(lm, args.eval, args.means, spans, ks=args.ks,
                                templates=args.template, batch_size=args.batch_size, csv_path=args.csv)
    except ClipDecompError as e:
        print(f"completeness: error: {e}", file=sys.stderr)
        return 2
    for r in rows:
        print(f"{r['setting']:<9} {r['pool']!s:<10} {r['k']!s:>3}  {r['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
