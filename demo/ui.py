"""The Gradio app: one shared image on the left, four tabs on the right.

:func:`build_app` lays out the page and wires every tab (each tab module holds its plain
functions and its endpoints); :func:`launch` starts the server with the demo's limits.
Endpoints (``gradio_client``): ``/heatmap``, ``/head_table``, ``/head_detail``,
``/compute_textspan``, ``/retrieve``, ``/select_heads``, ``/repair_eval``,
``/repair_export``, ``/load_model``.
"""

from __future__ import annotations

import logging
import threading
from typing import Any, Optional

import gradio as gr

from . import heatmap_tab, repair_tab, retrieval_tab, roles_tab
from .components import BoundedImage, ui_handler
from .examples import default_example, examples
from .limits import MAX_IMAGE_BYTES
from .state import DemoState

__all__ = ["build_app", "warm_up", "launch", "TITLE"]

TITLE = "clipdecomp: CLIP's image representation, decomposed by text"

_INTRO = (
    "Exact decomposition of a CLIP-ViT image embedding into attention heads and image patches, read with text "
    "(Gandelsman, Efros & Steinhardt, *Interpreting CLIP's Image Representation via Text-Based Decomposition*, "
    "ICLR 2024). "
)


# Galleries show square images whole (Gradio's thumbnails are wide boxes that crop them).
CSS = ".square-thumbs .thumbnail-item { aspect-ratio: 1 / 1; } .square-thumbs .thumbnail-item img { object-fit: contain; }"


def _header(state: DemoState) -> str:
    return f"# {TITLE}\n{_INTRO}**Model:** {state.bundle.describe()}."


def build_app(state: DemoState) -> gr.Blocks:
    """The app for ``state``'s model (loads it now, so a bad model fails before serving)."""
    bundle = state.bundle
    ex = default_example(bundle.is_bundled)
    # uploads and results older than a day are removed from Gradio's cache every hour
    with gr.Blocks(title=TITLE, analytics_enabled=False, delete_cache=(3600, 86400)) as app:
        header = gr.Markdown(_header(state))
        with gr.Accordion("Model", open=False):
            with gr.Row():
                name = gr.Textbox(label="open_clip ViT name (empty: the bundled toy model)",
                                  placeholder="ViT-B-16", interactive=state.config.allow_model_switch)
                pretrained = gr.Textbox(label="Pretrained tag or weights file", placeholder="laion2b_s34b_b88k",
                                        interactive=state.config.allow_model_switch)
                load = gr.Button("Load model", interactive=state.config.allow_model_switch)
            model_status = gr.Markdown("" if state.config.allow_model_switch else
                                       "Loading another model is disabled on this deployment.")
        texts = heatmap_tab.texts_box(ex.texts if ex else "")
        with gr.Row():
            with gr.Column(scale=1, min_width=260):
                image = BoundedImage(label="Image (shared by all tabs)", value=str(ex.path) if ex else None,
                                     type="pil", height=300, sources=["upload", "clipboard"], elem_id="input-image")
                found = examples(bundle.is_bundled)
                if found:
                    picker = gr.Examples([[str(e.path)] for e in found], [image], label="Examples (click one)",
                                         examples_per_page=len(found))

                    def texts_for(evt: gr.SelectData) -> str:
                        i = evt.index[0] if isinstance(evt.index, (list, tuple)) else evt.index
                        return found[int(i)].texts

                    picker.dataset.select(texts_for, None, texts, api_visibility="private")
            with gr.Column(scale=3):
                with gr.Tabs():
                    with gr.Tab("Heatmaps", id="heatmaps"):
                        hm = heatmap_tab.build(state, image, texts)
                    with gr.Tab("Head roles", id="roles"):
                        ro = roles_tab.build(state, image)
                    with gr.Tab("Retrieval by head", id="retrieval"):
                        rt = retrieval_tab.build(state, image)
                    with gr.Tab("Repair", id="repair"):
                        rp = repair_tab.build(state)

        tabs = (hm, ro, rt, rp)
        refresh_outputs = [header] + [c for t in tabs for c in t["refresh_outputs"]]

        def refresh_all():
            out: list[Any] = [_header(state)]
            for t in tabs:
                r = t["refresh"]()
                out.extend(r if isinstance(r, tuple) else (r,))
            return out

        @ui_handler
        def load_model_fn(name_value: Optional[str], pretrained_value: Optional[str]) -> str:
            b = state.switch_model(name_value, pretrained_value)
            return f"Loaded {b.describe()}."

        load.click(load_model_fn, [name, pretrained], model_status, api_name="load_model",
                   concurrency_id="slow").success(refresh_all, None, refresh_outputs, api_visibility="private")
        app.load(refresh_all, None, refresh_outputs, api_visibility="private")
        app.load(hm["fn"], hm["inputs"], hm["outputs"], api_visibility="private", concurrency_id="fast")
    return app


def warm_up(state: DemoState) -> threading.Thread:
    """Compute the default retrieval gallery in a background thread, so the first
    retrieval request does not wait for it (errors are logged, not raised)."""

    def work() -> None:
        try:
            cfg = state.config
            retrieval_tab.toy_gallery(state.bundle, cfg.gallery_size, cfg.gallery_seed, state.cache_dir)
        except Exception:  # the request that needs the gallery will report the problem
            logging.getLogger("clipdecomp.demo").exception("warm-up of the retrieval gallery failed")

    thread = threading.Thread(target=work, name="clipdecomp-demo-warm-up", daemon=True)
    thread.start()
    return thread


def launch(app: gr.Blocks, *, host: str = "127.0.0.1", port: Optional[int] = None, share: bool = False,
           prevent_thread_lock: bool = False, quiet: bool = False) -> Any:
    """Queue (one request at a time per kind: fast views, slow jobs; at most 32 waiting)
    and serve; uploads larger than :data:`demo.limits.MAX_IMAGE_BYTES` are refused."""
    app.queue(max_size=32, default_concurrency_limit=1)
    return app.launch(server_name=host, server_port=port, share=share, prevent_thread_lock=prevent_thread_lock,
                      max_file_size=MAX_IMAGE_BYTES, theme=gr.themes.Soft(), css=CSS, ssr_mode=False, quiet=quiet,
                      footer_links=["api"])
