"""Layer ablations (Gandelsman et al., ICLR 2024, Section 3 and Appendix A.2): zero-shot
accuracy when parts of the residual stream's direct contributions are mean-ablated.

Settings (rows of :func:`run_layer_experiments`):

* ``base``: the model's own embedding (``Decomposition.total()``);
* ``mlps``: every MLP's direct contribution replaced by its mean;
* ``class_token``: the class token's direct term replaced by its mean (see below);
* ``class_token+mlps``: both;
* the curve ``heads_up_to[l]`` for ``l = 0 .. L``: every attention head of layers
  ``0 .. l-1`` replaced by its mean (``l = 0`` ablates nothing, i.e. equals ``base``).

The class token's direct term. Each head's direct contribution is a sum over source
tokens (:meth:`~clipdecomp.decomposition.Decomposition.head_tokens`, token 0 = the
class token). The class-token direct term is the part whose source token is the class
token, summed over all layers and heads::

    cls = sum_l head_tokens(l)[:, 0].sum(heads)          # [B, D]

and ablating it replaces ``cls`` by its mean over the means split
(``total - cls + mean(cls)``). This is the paper's "direct effect of the class token":
the paper (Sec. 3, App. A.2) mean-ablates, in every attention layer, the contribution
that flows from the class-token position into the output (the ``i = 0`` term of the
sum over tokens), and reports that this costs little accuracy (ViT-L-14: 75.25 ->
74.38, and 73.87 with the MLPs also ablated). Note ``cls`` includes the class-token
shares of the attention output biases (the decomposition spreads them evenly over
tokens); their mean equals themselves, so they cancel in the ablation.

Means come from a separate split (``train_folder``) in one streaming pass; the
evaluation pass streams batches and counts correct predictions of every setting at once,
so memory does not grow with the data set.

    python -m clipdecomp.experiments.layers --help
"""

from __future__ import annotations

import argparse
import csv
import io
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import torch

from ..ablation import PartMeans, ablated_embedding, batch_images
from ..decomposition import Decomposition
from ..commands.common import add_model_arguments
from ..errors import ClipDecompError, InputError
from ..io import atomic_write_text
from ..zeroshot import TemplatesOrPromptSets, class_embeddings

__all__ = [
    "SETTINGS",
    "LayerMeans",
    "class_token_term",
    "stream_layer_means",
    "setting_embeddings",
    "run_layer_experiments",
    "layer_rows",
    "write_csv",
    "main",
]

#: The fixed settings, in table order (the curve comes after them).
SETTINGS: tuple[str, ...] = ("base", "mlps", "class_token", "class_token+mlps")
FIELDS = ("setting", "layers_ablated", "accuracy", "correct", "n_images")



@dataclass
class LayerMeans:
    """Part means plus the mean class-token direct term ``cls [D]`` of one split."""

    parts: PartMeans
    cls: torch.Tensor
    count: int


def class_token_term(dec: Decomposition) -> torch.Tensor:
    """The class token's direct term ``[B, D]``: ``sum_l head_tokens(l)[:, 0].sum(heads)``.

    Raises:
        InputError: the decomposition was made without per-token values for every layer
            (``decompose(..., token_layers="all")``).
    """
    missing = sorted(set(range(dec.layers)) - set(dec.token_layers))
    if missing:
        raise InputError(
            f"the class-token term needs per-token values of every layer; layers {missing} are missing: "
            "decompose with token_layers='all'."
        )
    return sum(dec.head_tokens(l)[:, 0].sum(1) for l in range(dec.layers))


def stream_layer_means(model: Any, loader: Iterable[Any], *, progress: bool = True) -> LayerMeans:
    """One pass over ``loader``: the part means and the class-token term's mean (float64
    running sums, weighted by batch size; memory does not grow with the data)."""
    from tqdm.auto import tqdm

    from ..decomposition import decompose

    sums: Optional[list[torch.Tensor]] = None
    count, dtype = 0, None
    total = len(loader) if hasattr(loader, "__len__") else None
    for batch in tqdm(loader, total=total, desc="layer means", unit="batch", disable=not progress):
        images = batch_images(batch).to(model.device)
        dec = decompose(model, images, token_layers="all")
        m = PartMeans.from_decomposition(dec)
        b = dec.batch_size
        parts = [t.to(torch.float64) * b for t in (m.embed, m.mlps, m.heads, class_token_term(dec).mean(0))]
        sums = parts if sums is None else [s + p for s, p in zip(sums, parts)]
        count += b
        dtype = dec.dtype
    if sums is None or count == 0:
        raise InputError("the means loader yielded no images; cannot compute means.")
    embed, mlps, heads, cls = (s.div(count).to(dtype) for s in sums)
    return LayerMeans(PartMeans(embed, mlps, heads, count), cls, count)


def setting_embeddings(dec: Decomposition, means: LayerMeans) -> dict[str, torch.Tensor]:
    """Embeddings ``[B, D]`` of every setting: the :data:`SETTINGS` and ``heads_up_to[l]``
    for ``l = 0 .. L`` (keys ``"heads_up_to:l"``). Needs ``token_layers="all"``."""
    parts = means.parts
    cls_diff = means.cls.to(dec.device, dec.dtype) - class_token_term(dec)
    mlps = ablated_embedding(dec, parts, mlps="all")
    out = {
        "base": ablated_embedding(dec, parts),
        "mlps": mlps,
        "class_token": dec.total() + cls_diff,
        "class_token+mlps": mlps + cls_diff,
    }
    for l in range(dec.layers + 1):
        heads = [(i, h) for i in range(l) for h in range(dec.n_heads)]
        out[f"heads_up_to:{l}"] = ablated_embedding(dec, parts, heads=heads)
    return out


def run_layer_experiments(
    model: Any,
    train_folder: Union[str, os.PathLike],
    eval_folder: Union[str, os.PathLike],
    classnames: Optional[Sequence[str]] = None,
    templates_or_prompt_sets: Optional[TemplatesOrPromptSets] = None,
    *,
    means: Optional[LayerMeans] = None,
    means_max_images: Optional[int] = None,
    seed: int = 0,
    batch_size: int = 64,
    progress: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy on an ImageFolder under every layer ablation.

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel`.
        train_folder: images for the means (searched recursively, labels ignored).
        eval_folder: ImageFolder ``ROOT/CLASS/*`` to classify.
        classnames: a name per class folder in ImageFolder order (default: the folder
            names, underscores -> spaces).
        templates_or_prompt_sets: templates, or ``{class name: [prompts]}``.
        means: precomputed :class:`LayerMeans` (then ``train_folder`` is not read).
        means_max_images, seed: take the means over a seeded random subset of at most
            this many ``train_folder`` images (:func:`~clipdecomp.images.image_loader`).

    Returns:
        ``{"accuracy": {setting: fraction}, "correct": {setting: int}, "curve":
        [{"layers_ablated": l, "accuracy": a}, ...], "n_images", "n_means", "n_layers",
        "classnames"}``.
    """
    from tqdm.auto import tqdm

    from ..data.imagefolder import classnames as folder_classnames
    from ..data.imagefolder import image_folder
    from ..decomposition import decompose
    from ..images import image_loader
    from ..zeroshot import predict

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be an int >= 1, got {batch_size!r}.")
    dataset = image_folder(eval_folder, transform=model.preprocess)
    names = list(classnames) if classnames is not None else folder_classnames(eval_folder)
    if len(names) != len(dataset.classes):
        raise InputError(f"{len(names)} class names for {len(dataset.classes)} class folders in {eval_folder}.")
    classifier = class_embeddings(model, names, templates_or_prompt_sets)
    if means is None:
        loader = image_loader(train_folder, model.preprocess, batch_size, max_images=means_max_images, seed=seed)
        means = stream_layer_means(model, loader, progress=progress)
    correct: dict[str, int] = {}
    n = 0
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=False)
    for images, labels in tqdm(loader, desc="layer ablations", unit="batch", disable=not progress):
        dec = decompose(model, images.to(model.device), token_layers="all")
        labels = labels.to(model.device)
        for key, emb in setting_embeddings(dec, means).items():
            correct[key] = correct.get(key, 0) + int((predict(emb, classifier) == labels).sum())
        n += dec.batch_size
    if n == 0:
        raise InputError(f"{eval_folder} holds no images.")
    L = means.parts.layers
    return {
        "accuracy": {s: correct[s] / n for s in SETTINGS},
        "correct": {s: correct[s] for s in SETTINGS},
        "curve": [{"layers_ablated": l, "accuracy": correct[f"heads_up_to:{l}"] / n,
                   "correct": correct[f"heads_up_to:{l}"]} for l in range(L + 1)],
        "n_images": n,
        "n_means": means.count,
        "n_layers": L,
        "classnames": names,
    }


def layer_rows(result: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Flat rows of a :func:`run_layer_experiments` result (the CSV's rows)."""
    n = result["n_images"]
    rows = [{"setting": s, "layers_ablated": "", "accuracy": result["accuracy"][s], "correct": result["correct"][s],
             "n_images": n} for s in SETTINGS]
    rows += [{"setting": "heads_up_to", "layers_ablated": r["layers_ablated"], "accuracy": r["accuracy"],
              "correct": r["correct"], "n_images": n} for r in result["curve"]]
    return rows


def write_csv(result: Mapping[str, Any], path: Union[str, os.PathLike]) -> None:
    """Write :func:`layer_rows` as CSV (atomically)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=FIELDS, lineterminator="\n")
    w.writeheader()
    for r in layer_rows(result):
        w.writerow(r)
    atomic_write_text(path, buf.getvalue())


def main(argv: Optional[list[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m clipdecomp.experiments.layers", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(p)
    p.add_argument("--train", type=Path, required=True, help="folder of images (another split) for the means")
    p.add_argument("--eval", type=Path, required=True, help="ImageFolder ROOT/CLASS/* to classify")
    p.add_argument("--template", action="append", default=None, help="prompt template with {} (repeatable; default OpenAI's 80)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--csv", type=Path, default=None, help="write the table as CSV")
    args = p.parse_args(argv)
    try:
        from ..loading import load_model

        lm = load_model(args.model, args.pretrained, device=args.device)
        result = run_layer_experiments(lm, args.train, args.eval, None, args.template, batch_size=args.batch_size)
        if args.csv is not None:
            write_csv(result, args.csv)
    except ClipDecompError as e:
        print(f"layers: error: {e}", file=sys.stderr)
        return 2
    for r in layer_rows(result):
        print(f"{r['setting']:<17} {r['layers_ablated']!s:>3}  {r['accuracy']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
