"""Heatmaps tab: where in the image each text's score comes from.

:func:`compute_heatmaps` is the plain function (no Gradio): one decomposition of the
image (:func:`clipdecomp.decomposition.decompose`), the text embeddings
(:func:`clipdecomp.zeroshot.text_embeddings`), the per-patch maps
(:func:`clipdecomp.heatmaps.text_heatmaps`, :func:`~clipdecomp.heatmaps.relative_heatmap`)
and the overlays (:func:`clipdecomp.overlay.render_overlay`). :func:`build` puts it in
the UI as the ``/heatmap`` API endpoint.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
from PIL import Image

from clipdecomp.errors import InputError

from .limits import check_image, parse_texts
from .state import DemoState, ModelBundle

__all__ = ["DISPLAY_SIZE", "HeatmapResult", "check_layers", "display_image", "compute_heatmaps", "texts_box", "build"]

#: Width in pixels of the images the tab shows (the model's input crop, upscaled).
DISPLAY_SIZE = 288

SCORE_HEADERS = ["text", "cosine similarity", "from the chosen layers' patches"]


@dataclass
class HeatmapResult:
    """Output of :func:`compute_heatmaps`.

    Attributes:
        crop: the model's input crop, upscaled to the display size.
        overlays: ``(overlay, caption)`` per text, each map on its own colour scale (as in the
            paper's figures; the scores give the magnitudes).
        relative: ``(overlay, caption)`` of the first text minus the second (red: first),
            or ``None`` with a single text.
        scores: per text ``[text, cosine, patch part]``: the cosine similarity of the image
            and text embeddings, and the part of it that the chosen layers' heads write
            from the image patches (the sum of the text's map over the patches, divided by
            the embedding's norm).
        layers: the layers summed over.
        maps: ``[T, gh, gw]`` the raw maps (before normalisation across texts).
        relative_map: ``[gh, gw]`` the first text's map minus the second's, or ``None``.
    """

    crop: Image.Image
    overlays: list[tuple[Image.Image, str]]
    relative: Optional[tuple[Image.Image, str]]
    scores: list[list[Any]]
    layers: list[int]
    maps: torch.Tensor
    relative_map: Optional[torch.Tensor] = None


def check_layers(layers: Any, n_layers: int) -> list[int]:
    """Layer indices from the UI (ints or digit strings; negatives count from the end).

    Raises:
        InputError: none chosen, or an index outside the model.
    """
    if layers is None or (isinstance(layers, (list, tuple)) and not layers):
        raise InputError("No layer chosen: tick at least one layer (the last layers carry most of the signal).")
    if isinstance(layers, (int, str)):
        layers = [layers]
    out = set()
    for l in layers:
        try:
            i = int(l)
        except (TypeError, ValueError):
            raise InputError(f"Layer {l!r} is not a layer index (0..{n_layers - 1}).") from None
        if (isinstance(l, float) and l != i) or not -n_layers <= i < n_layers:
            raise InputError(f"Layer {l!r} does not exist: this model has layers 0..{n_layers - 1}.")
        out.add(i % n_layers)
    return sorted(out)


def display_image(crop: Image.Image, width: int = DISPLAY_SIZE) -> Image.Image:
    """The model's crop scaled to ``width`` pixels (never shrunk)."""
    if crop.width >= width:
        return crop
    return crop.resize((width, round(crop.height * width / crop.width)), Image.BICUBIC)


def compute_heatmaps(
    bundle: ModelBundle,
    image: Any,
    texts: Any,
    layers: Any = None,
    *,
    normalize: bool = False,
    alpha: float = 0.5,
) -> HeatmapResult:
    """Text heatmaps of one image.

    Args:
        bundle: the model (:attr:`demo.state.DemoState.bundle`).
        image: a PIL image (checked against :mod:`demo.limits`).
        texts: one text per line, or a list (see :func:`demo.limits.parse_texts`).
        layers: layers whose heads' per-patch contributions are summed (default: the late
            layers TextSpan analysed, else the last four).
        normalize: show each map minus the mean map of all the texts (the paper's
            normalisation; signed colours). Needs at least two texts.
        alpha: heatmap opacity.

    Raises:
        InputError: a missing or oversized image, bad texts or layers.
    """
    from clipdecomp.decomposition import decompose
    from clipdecomp.heatmaps import relative_heatmap, text_heatmaps
    from clipdecomp.overlay import render_overlay

    image = check_image(image)
    texts = parse_texts(texts)
    layers = check_layers(bundle.late_layers() if layers is None else layers, bundle.n_layers)
    if normalize and len(texts) < 2:
        raise InputError("Normalising subtracts the mean map of the texts: give at least two texts, or untick it.")
    x, shown = bundle.model_view(image)
    crop = display_image(shown)
    emb = bundle.text_embeddings(texts)
    with torch.no_grad():
        dec = decompose(bundle.lm, x, token_layers=layers)
        raw = text_heatmaps(dec, emb, layers)[0].float()  # [T, gh, gw]
        maps = text_heatmaps(dec, emb, layers, normalizer=emb)[0].float() if normalize else raw
        cos = dec.normalized(dec.total_scores(emb))[0].float()
        part = dec.normalized(raw.sum((-1, -2))[None])[0]
        rel = relative_heatmap(dec, emb[0], emb[1], layers)[0].float() if len(texts) >= 2 else None
    style: dict[str, Any] = dict(cmap="RdBu_r", symmetric=True) if normalize else dict(cmap="jet")
    overlays = [(render_overlay(crop, maps[i], alpha=alpha, **style), t) for i, t in enumerate(texts)]
    relative = None
    if rel is not None:
        img = render_overlay(crop, rel, cmap="RdBu_r", alpha=alpha, symmetric=True)
        relative = (img, f"red: '{texts[0]}' rather than '{texts[1]}'; blue: the reverse")
    scores = [[t, round(float(c), 4), round(float(p), 4)] for t, c, p in zip(texts, cos, part)]
    return HeatmapResult(crop, overlays, relative, scores, layers, raw, rel)


# ----------------------------------------------------------------------------- UI


def layer_choices(bundle: ModelBundle) -> list[tuple[str, int]]:
    return [(str(l), l) for l in range(bundle.n_layers)]


def texts_box(default_texts: str) -> Any:
    """The texts input, made unrendered so the examples beside the image can fill it."""
    import gradio as gr

    return gr.Textbox(label="Texts, one per line (at most 16, 200 characters each)", value=default_texts,
                      lines=4, max_lines=16, render=False, elem_id="heatmap-texts")


def build(state: DemoState, image: Any, texts: Any) -> dict[str, Any]:
    """The tab's components and its ``/heatmap`` endpoint (call inside ``gr.Tab``; ``texts``
    from :func:`texts_box`)."""
    import gradio as gr

    from .components import ui_handler

    bundle = state.bundle
    with gr.Row():
        with gr.Column(scale=1):
            texts.render()
            layers = gr.CheckboxGroup(label="Layers (heads' per-patch contributions summed over these)",
                                      choices=layer_choices(bundle), value=bundle.late_layers())
            normalize = gr.Checkbox(label="Subtract the mean map of the texts (paper's normalisation)", value=False)
            run = gr.Button("Show heatmaps", variant="primary")
            scores = gr.Dataframe(headers=SCORE_HEADERS, label="Image-text scores", interactive=False, wrap=True)
        with gr.Column(scale=2):
            gr.Markdown("**Heatmap per text**: where the chosen layers' heads write the text's score from "
                        "(each map on its own colour scale, red high, blue low)")
            overlays = gr.Gallery(label="Heatmap per text", show_label=False, columns=3, height=250,
                                  format="jpeg", object_fit="contain", elem_id="heatmap-overlays",
                                  elem_classes="square-thumbs")
            relative = gr.Image(label="Relative map: first text minus second", format="jpeg", height=DISPLAY_SIZE,
                                interactive=False)

    @ui_handler
    def heatmap(image_value: Any, texts_value: str, layers_value: Sequence[int], normalize_value: bool):
        r = compute_heatmaps(state.bundle, image_value, texts_value, layers_value, normalize=bool(normalize_value))
        rel = r.relative[0] if r.relative is not None else None
        return r.overlays, rel, {"headers": SCORE_HEADERS, "data": r.scores}

    inputs = [image, texts, layers, normalize]
    outputs = [overlays, relative, scores]
    run.click(heatmap, inputs, outputs, api_name="heatmap", concurrency_id="fast")

    def refresh():
        b = state.bundle
        return gr.update(choices=layer_choices(b), value=b.late_layers())

    return {"fn": heatmap, "inputs": inputs, "outputs": outputs, "refresh": refresh, "refresh_outputs": [layers]}
