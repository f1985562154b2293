"""Head roles tab: every late head with its role and top TextSpan texts; one head in detail.

Plain functions (no Gradio):

* :func:`head_table`: rows of :meth:`clipdecomp.textspan_results.TextSpanResults.table`;
* :func:`head_detail`: a head's texts with explained variance, and the per-token maps of
  its TextSpan directions on an image (:func:`clipdecomp.heatmaps.head_direction_heatmaps`),
  for the directions with the largest coefficients on that image;
* :func:`compute_textspan`: TextSpan over a server-side image folder
  (:func:`clipdecomp.commands.textspan.run_textspan`), for a model without precomputed
  results; the results replace the model's and are kept in the cache folder.

Endpoints: ``/head_table``, ``/head_detail``, ``/compute_textspan``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import torch
from PIL import Image

from clipdecomp.errors import InputError

from .limits import MAX_TEXTSPAN_IMAGES, check_folder, check_image, check_int, head_label, parse_head_labels
from .state import DemoState, ModelBundle

__all__ = ["TABLE_HEADERS", "TEXT_HEADERS", "head_table", "head_choices", "HeadDetail", "head_detail",
           "compute_textspan", "build"]

TABLE_HEADERS = ["head", "layer", "index", "role", "role score", "top TextSpan texts"]
TEXT_HEADERS = ["rank", "text", "category", "explained variance", "cumulative fraction"]
MAX_DIRECTIONS = 8
MAX_TEXTSPAN_K = 60


def _results(bundle: ModelBundle) -> Any:
    if bundle.results is None:
        raise InputError(
            "There are no TextSpan results for this model yet: give a folder of images under "
            "'Compute TextSpan' to compute them."
        )
    return bundle.results


def head_table(bundle: ModelBundle, n_texts: int = 5) -> list[list[Any]]:
    """One row per analysed head: label, layer, head, role, role score, first texts."""
    return [
        [head_label(r["layer"], r["head"]), r["layer"], r["head"], r["role"], round(float(r["score"]), 3),
         " | ".join(r["texts"])]
        for r in _results(bundle).table(n_texts)
    ]


def head_choices(bundle: ModelBundle) -> list[tuple[str, str]]:
    """Dropdown choices ``("L5.H2: colours", "L5.H2")`` for the analysed heads."""
    if bundle.results is None:
        return []
    return [(f"{head_label(h.layer, h.head)}: {h.role}", head_label(h.layer, h.head)) for h in bundle.results.heads]


@dataclass
class HeadDetail:
    """Output of :func:`head_detail`.

    Attributes:
        layer, head, role: the head.
        texts: rows ``[rank, text, category, explained variance, cumulative fraction]``.
        maps: ``(overlay, caption)`` for the directions with the largest coefficients on
            the image (empty without an image).
    """

    layer: int
    head: int
    role: str
    texts: list[list[Any]]
    maps: list[tuple[Image.Image, str]]


def head_detail(bundle: ModelBundle, head: Any, image: Optional[Any] = None, n_directions: Any = 4) -> HeadDetail:
    """A head's TextSpan texts and, with an image, its direction maps.

    Args:
        head: ``"L5.H2"`` (or ``"5.2"``), one of the analysed heads.
        image: a PIL image or ``None``.
        n_directions: how many directions to draw (1..8), those with the largest
            coefficient of the image's head output (minus the head's mean) along them.

    Raises:
        InputError: no results, an unknown head, a bad image or count.
    """
    from clipdecomp.decomposition import decompose
    from clipdecomp.heatmaps import head_direction_heatmaps
    from clipdecomp.overlay import render_overlay

    from .heatmap_tab import display_image

    results = _results(bundle)
    pairs = parse_head_labels(head, bundle.n_layers, bundle.n_heads)
    if len(pairs) != 1:
        raise InputError("Pick one head (e.g. L5.H2) from the list.")
    (layer, h), = pairs
    span = results.head(layer, h)
    n = check_int(n_directions, "The number of directions", 1, MAX_DIRECTIONS, default=4)
    texts = [[i + 1, t, c or "", round(float(ev), 5), round(float(cf), 4)]
             for i, (t, c, ev, cf) in enumerate(zip(span.texts, span.categories, span.explained_variance,
                                                      span.cumulative_fraction))]
    maps: list[tuple[Image.Image, str]] = []
    if image is not None and span.k > 0:
        image = check_image(image)
        x, shown = bundle.model_view(image)
        crop = display_image(shown)
        with torch.no_grad():
            dec = decompose(bundle.lm, x, token_layers=[layer])
            d = head_direction_heatmaps(dec, layer, h, span.basis, mean=span.mean, top=min(n, span.k))
        for i in d.largest:
            caption = f"#{i + 1} {span.texts[i]} (coefficient {float(d.coefficients[i]):+.3f})"
            maps.append((render_overlay(crop, d.maps[i].float(), cmap="RdBu_r", symmetric=True), caption))
    return HeadDetail(layer, h, span.role, texts, maps)


def compute_textspan(state: DemoState, folder: Any, max_images: Any = 500, k: Any = MAX_TEXTSPAN_K,
                     *, pool: str = "general", progress: bool = True) -> Any:
    """TextSpan for the current model over a server-side image folder (the last
    ``min(4, L)`` layers, rank 80, the ``general`` text pool unless ``pool`` names another
    one or a pool file); the results become the model's and are saved in the cache folder.

    Raises:
        InputError: a bad folder (see :func:`demo.limits.check_folder`) or numbers.
    """
    from clipdecomp.commands.textspan import run_textspan

    path = check_folder(folder)
    n = check_int(max_images, "The number of images", 1, MAX_TEXTSPAN_IMAGES, default=500)
    k = check_int(k, "Texts per head", 1, MAX_TEXTSPAN_K, default=MAX_TEXTSPAN_K)
    bundle = state.bundle
    results = run_textspan(bundle.lm, path, pool=pool, layers=min(4, bundle.n_layers), k=k, rank=80, max_images=n,
                           model_spec=bundle.spec, progress=progress)
    results.info["source"] = "computed in the demo"
    results.save(state.results_cache_path(bundle))
    with bundle.lock:
        bundle.results, bundle.results_source = results, f"computed over {path} ({results.n_images} images)"
        bundle.memo.clear()  # role-based choices depend on the results
    return results


# ----------------------------------------------------------------------------- UI


def build(state: DemoState, image: Any) -> dict[str, Any]:
    """The tab's components and endpoints (call inside ``gr.Tab``)."""
    import gradio as gr

    from .components import ui_handler

    bundle = state.bundle
    status = gr.Markdown(elem_id="roles-status")
    table = gr.Dataframe(headers=TABLE_HEADERS, label="Late heads: role and top TextSpan texts", interactive=False,
                         wrap=True, max_height=420)
    with gr.Row():
        with gr.Column(scale=1):
            choices = head_choices(bundle)
            head = gr.Dropdown(label="Head", choices=choices, value=choices[0][1] if choices else None,
                               allow_custom_value=True)  # checked by head_detail, with a clearer message
            n_dirs = gr.Slider(1, MAX_DIRECTIONS, value=4, step=1, label="Directions to draw on the image")
            show = gr.Button("Show head", variant="primary")
            texts = gr.Dataframe(headers=TEXT_HEADERS, label="The head's TextSpan texts", interactive=False,
                                 wrap=True, max_height=360)
        with gr.Column(scale=2):
            gr.Markdown("**The head's directions on the image**: per-token maps of the TextSpan directions with "
                        "the largest coefficients for this image (red: the token pushes along the direction)")
            maps = gr.Gallery(label="Direction maps", show_label=False, columns=4, height=220, format="jpeg",
                              object_fit="contain", elem_classes="square-thumbs")
    with gr.Accordion("Compute TextSpan for this model from a folder of images", open=bundle.results is None):
        gr.Markdown(f"A folder on the server, searched recursively; at most {MAX_TEXTSPAN_IMAGES} images "
                    "(a seeded random subset of larger folders). Uses the `general` text pool, the last 4 layers.")
        with gr.Row():
            folder = gr.Textbox(label="Image folder on the server", placeholder="/data/images")
            max_images = gr.Number(label="Images", value=500, precision=0, minimum=1, maximum=MAX_TEXTSPAN_IMAGES)
            k = gr.Number(label="Texts per head", value=MAX_TEXTSPAN_K, precision=0, minimum=1, maximum=MAX_TEXTSPAN_K)
        compute = gr.Button("Compute TextSpan")

    def status_text() -> str:
        b = state.bundle
        if b.results is None:
            return "**No TextSpan results for this model yet.** Compute them from a folder of images below."
        r = b.results
        return (f"TextSpan of layers {r.layers} ({len(r.heads)} heads, {r.n_images} images, pool `{r.pool}`, "
                f"k={r.k}), from `{b.results_source}`.")

    @ui_handler
    def table_fn() -> dict:
        """Every analysed head: label, layer, index, role, role score, top texts."""
        return {"headers": TABLE_HEADERS, "data": head_table(state.bundle)}

    @ui_handler
    def detail_fn(image_value: Any, head_value: str, n_value: float):
        if image_value is None:
            from .components import warn

            warn("No image: showing the head's texts only. Upload or pick an image to see its maps.")
        d = head_detail(state.bundle, head_value, image_value, n_value)
        return {"headers": TEXT_HEADERS, "data": d.texts}, d.maps

    @ui_handler
    def compute_fn(folder_value: str, max_value: float, k_value: float, progress=gr.Progress(track_tqdm=True)):
        compute_textspan(state, folder_value, max_value, k_value, progress=True)
        return {"headers": TABLE_HEADERS, "data": head_table(state.bundle)}

    def refresh():
        """Status, table and head list after a model switch or a new TextSpan run."""
        b = state.bundle
        ch = head_choices(b)
        data = head_table(b) if b.results is not None else []
        return (status_text(), {"headers": TABLE_HEADERS, "data": data},
                gr.update(choices=ch, value=ch[0][1] if ch else None))

    show.click(detail_fn, [image, head, n_dirs], [texts, maps], api_name="head_detail", concurrency_id="fast")
    head.change(detail_fn, [image, head, n_dirs], [texts, maps], api_visibility="private", concurrency_id="fast")
    gr.api(table_fn, api_name="head_table", concurrency_id="fast")
    compute.click(compute_fn, [folder, max_images, k], table, api_name="compute_textspan",
                  concurrency_id="slow").then(refresh, None, [status, table, head], api_visibility="private")
    return {"refresh": refresh, "refresh_outputs": [status, table, head], "detail": detail_fn,
            "detail_inputs": [image, head, n_dirs], "detail_outputs": [texts, maps]}
