"""Zero-shot segmentation on ImageNet-segmentation (``gtsegs_ijcv.mat``): ours vs baselines.

Protocol (``shared/notes/protocols.md``):

1. Each image and its mask go through the SAME resize-shorter-side + centre crop to the
   model's square input (:func:`~clipdecomp.data.imagenet_seg.square_crop_pair`); the mask
   is scored at the model's input resolution.
2. The model's zero-shot prediction over the class set picks the class text.
3. Each method gives a patch-grid map (``ours``: per-patch direct contributions summed over
   the chosen layers and all heads, class token excluded, predicted class minus the mean
   over all classes; ``raw_attention``, ``rollout``, ``gradcam``: :mod:`clipdecomp.baselines`),
   upsampled bilinearly to the mask, binarised and scored by
   :class:`~clipdecomp.segmentation_metrics.SegmentationMeter`.

Class sets (:func:`class_set`):

* ``imagenet``: the 1000 ImageNet class names x the 80 OpenAI templates.
* ``toy``: the toy world's shapes (the classes of the toy classification set), each the
  normalised mean of the toy world's own zero-shot prompt ensemble for shape
  (:func:`clipdecomp.toyworld.captions.zero_shot_prompts` ``("shape")``, e.g. "a circle",
  "two circles", ...), the phrasing of the toy captions; the shapes rather than all toy
  descriptions, because a class text should name the object the mask outlines.
* a text file: one class name per line, with the OpenAI templates (or ``templates``).
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import torch
from tqdm import tqdm

from ..baselines import attention_rollout, gradcam_maps, raw_attention_map
from ..data.imagenet_seg import ImageNetSegmentation, square_crop_pair
from ..decomposition import decompose
from ..errors import InputError
from ..heatmaps import class_heatmaps, upsample
from ..io import atomic_write_text
from ..segmentation_metrics import SegmentationMeter
from ..zeroshot import IMAGENET_CLASSNAMES, OPENAI_IMAGENET_TEMPLATES, prompt_set_classifier, zero_shot_classifier, zero_shot_logits

__all__ = [
    "METHODS",
    "ClassSet",
    "class_set",
    "method_maps",
    "evaluate_segmentation",
    "table_markdown",
    "table_csv",
    "write_results",
]

METHODS: tuple[str, ...] = ("ours", "raw_attention", "rollout", "gradcam")
_METRICS = (("pixel_accuracy", "pixel acc"), ("miou", "mIoU"), ("map", "mAP"))


@dataclass
class ClassSet:
    """Class names and their zero-shot text embeddings ``[C, D]`` (unit rows)."""

    names: list[str]
    embeddings: torch.Tensor
    description: str


def class_set(model: Any, spec: str, templates: Optional[Sequence[Any]] = None) -> ClassSet:
    """Build the class set ``spec``: ``"toy"``, ``"imagenet"`` or a path to a text file with
    one class name per line (blank lines and ``#`` comments skipped)."""
    if spec == "toy":
        from ..toyworld.captions import zero_shot_prompts

        prompts = zero_shot_prompts("shape")
        names = list(prompts)
        return ClassSet(names, prompt_set_classifier(model, prompts), f"toy shapes ({len(names)}), each the mean of {len(prompts[names[0]])} prompts")
    if spec == "imagenet":
        names = list(IMAGENET_CLASSNAMES)
        source = "ImageNet classes"
    else:
        path = Path(spec)
        if not path.is_file():
            raise InputError(f"--classes must be 'toy', 'imagenet' or a text file with one class name per line; {spec!r} is none of these.")
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and not ln.strip().startswith("#")]
        if len(names) < 2:
            raise InputError(f"{path}: need at least 2 class names (one per line), found {len(names)}.")
        source = f"classes of {path}"
    templates = list(templates) if templates is not None else list(OPENAI_IMAGENET_TEMPLATES)
    embs = zero_shot_classifier(model, names, templates)
    return ClassSet(names, embs, f"{source} ({len(names)}) x {len(templates)} templates")


def _check_methods(methods: Sequence[str]) -> list[str]:
    methods = list(methods)
    bad = [m for m in methods if m not in METHODS]
    if bad or not methods:
        raise InputError(f"unknown method(s) {bad}; accepted: {', '.join(METHODS)}.")
    return methods


def method_maps(
    model: Any,
    images: torch.Tensor,
    classes: torch.Tensor,
    methods: Sequence[str] = METHODS,
    layers: Union[str, Sequence[int]] = "all",
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Zero-shot predictions ``[B]`` and each method's patch-grid maps ``{method: [B, gh, gw]}``.

    Args:
        images: preprocessed ``[B, 3, H, W]``.
        classes: class text embeddings ``[C, D]``.
        layers: the layers ``ours`` sums over (``"all"`` or indices).
    """
    methods = _check_methods(methods)
    dec = decompose(model, images, token_layers=layers if "ours" in methods else None)
    pred = zero_shot_logits(dec.total(), classes.to(dec.device, dec.dtype)).argmax(-1)
    maps: dict[str, torch.Tensor] = {}
    for m in methods:
        if m == "ours":
            maps[m] = class_heatmaps(dec, classes, pred)
        elif m == "raw_attention":
            maps[m] = raw_attention_map(dec)
        elif m == "rollout":
            maps[m] = attention_rollout(model, images)
        elif m == "gradcam":
            maps[m] = gradcam_maps(model, images, classes, pred.tolist())
    return pred, maps


def evaluate_segmentation(
    model: Any,
    data: Union[str, os.PathLike, ImageNetSegmentation],
    classes: ClassSet,
    *,
    methods: Sequence[str] = METHODS,
    layers: Union[str, Sequence[int]] = "all",
    batch_size: int = 16,
    limit: Optional[int] = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run the protocol over a ``gtsegs_ijcv.mat`` file.

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel` (its ``preprocess`` is applied to the
            square crop).
        data: path of ``gtsegs_ijcv.mat`` or an :class:`ImageNetSegmentation`.
        classes: the class set (:func:`class_set`).
        limit: evaluate only the first ``limit`` images.

    Returns:
        ``{"metrics": {method: SegmentationMeter.compute()}, "predictions": [class index per
        image], "n_images", "methods", "layers", "classes"}``.
    """
    methods = _check_methods(methods)
    visual_size = tuple(model.image_size)
    if visual_size[0] != visual_size[1]:
        raise InputError(f"the segmentation protocol needs a square model input, got {visual_size}.")
    size = int(visual_size[0])
    ds = data if isinstance(data, ImageNetSegmentation) else ImageNetSegmentation(data)
    n = len(ds) if limit is None else min(len(ds), int(limit))
    if n < 1:
        raise InputError(f"nothing to evaluate: {len(ds)} images, limit={limit}.")
    meters = {m: SegmentationMeter() for m in methods}
    preds: list[int] = []
    bar = tqdm(total=n, desc="segment-eval", unit="img", dynamic_ncols=True, disable=not progress)
    for start in range(0, n, batch_size):
        items = [ds[i] for i in range(start, min(n, start + batch_size))]
        crops = [square_crop_pair(img, mask, size) for img, mask in items]
        images = torch.stack([model.preprocess(c.image) for c in crops]).to(model.device, model.dtype)
        pred, maps = method_maps(model, images, classes.embeddings, methods, layers)
        preds += pred.tolist()
        for m in methods:
            up = upsample(maps[m].to(torch.float64).cpu(), (size, size))
            for b, c in enumerate(crops):
                meters[m].update(up[b], c.mask)
        bar.update(len(items))
    bar.close()
    return {
        "metrics": {m: meters[m].compute() for m in methods},
        "predictions": preds,
        "n_images": n,
        "methods": methods,
        "layers": layers if isinstance(layers, str) else list(layers),
        "classes": classes.description,
    }


def table_markdown(metrics: dict[str, dict[str, float]]) -> str:
    """Markdown table, one row per method, metrics in percent (2 decimals)."""
    lines = ["| method | " + " | ".join(h for _, h in _METRICS) + " |", "|---|" + "---:|" * len(_METRICS)]
    for m, r in metrics.items():
        lines.append(f"| {m} | " + " | ".join(f"{100 * r[k]:.2f}" for k, _ in _METRICS) + " |")
    return "\n".join(lines) + "\n"


def table_csv(metrics: dict[str, dict[str, float]]) -> str:
    """CSV with columns ``method,pixel_accuracy,miou,map,n_images`` (fractions in [0, 1])."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["method", *(k for k, _ in _METRICS), "n_images"])
    for m, r in metrics.items():
        w.writerow([m, *(f"{r[k]:.6f}" for k, _ in _METRICS), r["n_images"]])
    return buf.getvalue()


def write_results(result: dict[str, Any], out: Union[str, os.PathLike]) -> dict[str, Path]:
    """Write ``table.md``, ``table.csv`` and ``results.json`` into ``out`` (each atomically)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"markdown": out / "table.md", "csv": out / "table.csv", "json": out / "results.json"}
    header = f"Zero-shot segmentation, {result['n_images']} images; classes: {result['classes']}; layers (ours): {result['layers']}\n\n"
    atomic_write_text(paths["markdown"], header + table_markdown(result["metrics"]))
    atomic_write_text(paths["csv"], table_csv(result["metrics"]))
    atomic_write_text(paths["json"], json.dumps(result, indent=2) + "\n")
    return paths
