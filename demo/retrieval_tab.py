"""Retrieval-by-head tab: the query image's nearest neighbours by chosen heads' direct
contributions, next to its neighbours by the full image embedding (paper Sec. 5.3).

Plain functions (no Gradio):

* :func:`toy_gallery`: the default gallery, rendered toy-world scenes with their factors as
  captions; contributions of the late layers' heads from
  :func:`clipdecomp.retrieval.gallery_contributions`, cached in memory and on disk;
* :func:`folder_gallery`: a server-side image folder instead (at most
  :data:`MAX_GALLERY_IMAGES` images, cached in memory);
* :func:`resolve_heads`: heads picked explicitly and/or by role
  (:func:`clipdecomp.roles.heads_for_role`);
* :func:`retrieve`: :func:`clipdecomp.retrieval.nearest` by the heads and by the full
  embedding.

Endpoint: ``/retrieve``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from PIL import Image

from clipdecomp.errors import ClipDecompError, InputError

from .limits import MAX_NEIGHBOURS, check_folder, check_image, check_int, head_label, load_image, parse_head_labels
from .state import DemoState, ModelBundle

__all__ = ["MAX_GALLERY_IMAGES", "Gallery", "toy_gallery", "folder_gallery", "resolve_heads", "RetrievalResult",
           "retrieve", "build"]

MAX_GALLERY_IMAGES = 500
_THUMB = 128
_BATCH = 64


@dataclass
class Gallery:
    """Images to search, their captions and their decomposed contributions."""

    name: str
    images: list[Image.Image]
    captions: list[str]
    contributions: Any  # clipdecomp.retrieval.Contributions

    def __len__(self) -> int:
        return len(self.images)


def _contributions(bundle: ModelBundle, images: list[Image.Image], layers: list[int]) -> Any:
    from clipdecomp.retrieval import gallery_contributions

    x = torch.stack([bundle.lm.preprocess(im) for im in images]).to(bundle.lm.device, bundle.lm.dtype)
    with torch.no_grad():
        return gallery_contributions(bundle.lm, x.split(_BATCH), layers=layers, total=len(images), progress=False)


def _scene_caption(f: dict) -> str:
    from clipdecomp.toyworld.captions import noun_phrase

    return f"{noun_phrase(f['shape'], f['colour'], f['texture'], f['count'])}, {f['region']}, {f['background']}"


def toy_gallery(bundle: ModelBundle, size: int, seed: int, cache_dir: Path) -> Gallery:
    """``size`` toy-world scenes (every factor uniform, seeded), decomposed once per model
    (``cache_dir/gallery-*.safetensors``; images are re-rendered, which is cheap)."""
    from clipdecomp.retrieval import Contributions
    from clipdecomp.toyworld.world import render, sample_scene
    import numpy as np

    def make() -> Gallery:
        rng = np.random.default_rng([seed, 909])
        scenes = [sample_scene(rng, spurious=None) for _ in range(size)]
        images = [render(s)[0] for s in scenes]
        captions = [_scene_caption(s.factors()) for s in scenes]
        layers = bundle.late_layers()
        path = cache_dir / f"gallery-{bundle.key}-toy{size}-seed{seed}-layers{'_'.join(map(str, layers))}.safetensors"
        contrib = None
        if path.is_file():
            try:
                contrib = Contributions.load(path)
                if len(contrib) != size or list(contrib.layers) != layers:
                    contrib = None
            except ClipDecompError:
                contrib = None  # stale or foreign file: recompute and replace
        if contrib is None:
            contrib = _contributions(bundle, images, layers)
            contrib.save(path)
        return Gallery(f"{size} rendered toy-world scenes", images, captions, contrib)

    return bundle.cached(("toy-gallery", size, seed), make)


def folder_gallery(bundle: ModelBundle, folder: Any) -> Gallery:
    """The images of a server-side folder (recursive, at most :data:`MAX_GALLERY_IMAGES`),
    decomposed once per model and folder listing (kept in memory).

    Raises:
        InputError: a bad folder, too many images, or an unreadable image.
    """
    from clipdecomp.images import list_image_files

    path = check_folder(folder, "gallery folder")
    files = list_image_files(path)
    if len(files) > MAX_GALLERY_IMAGES:
        raise InputError(f"The gallery folder holds {len(files)} images; the limit is {MAX_GALLERY_IMAGES}.")
    stamp = tuple((str(f), f.stat().st_mtime_ns) for f in files)

    def make() -> Gallery:
        images = [load_image(f) for f in files]
        contrib = _contributions(bundle, images, bundle.late_layers())
        thumbs = []
        for im in images:
            im.thumbnail((_THUMB, _THUMB))
            thumbs.append(im)
        return Gallery(f"{len(files)} images from {path}", thumbs, [f.relative_to(path).as_posix() for f in files],
                       contrib)

    key = ("folder-gallery", stamp)
    with bundle.lock:  # keep one other folder's gallery at most: folders can be large
        others = [k for k in bundle.memo if isinstance(k, tuple) and k[0] == "folder-gallery" and k != key]
        for k in others[:-1]:
            del bundle.memo[k]
    return bundle.cached(key, make)


def resolve_heads(bundle: ModelBundle, heads: Any = None, role: Optional[str] = None,
                  top_n: Any = 1) -> list[tuple[tuple[int, int], str]]:
    """The heads to retrieve by, each with why: the listed ones, plus the ``top_n`` best
    matches of ``role`` (a role of the TextSpan results, an alias, or free text).

    Raises:
        InputError: neither heads nor a role, a role without TextSpan results, bad labels.
    """
    from clipdecomp.roles import heads_for_role

    picked = [(p, "picked") for p in parse_head_labels(heads, bundle.n_layers, bundle.n_heads)]
    role = (role or "").strip()
    if role:
        if bundle.results is None:
            raise InputError("Choosing heads by role needs TextSpan results for this model (see the Head roles tab).")
        n = check_int(top_n, "Heads per role", 1, 16, default=1)
        for m in heads_for_role(bundle.results, role, model=bundle.lm, top_n=n):
            if (m.layer, m.head) not in [p for p, _ in picked]:
                picked.append(((m.layer, m.head), f"role '{role}' (score {m.score:.3f}; the head's role: {m.role})"))
    if not picked:
        raise InputError("Choose at least one head, or a role (e.g. 'colours').")
    return picked


@dataclass
class RetrievalResult:
    """Output of :func:`retrieve`: the heads used (with why) and the neighbours
    ``(image, caption)`` by the heads and by the full embedding."""

    heads: list[tuple[tuple[int, int], str]]
    by_heads: list[tuple[Image.Image, str]]
    by_full: list[tuple[Image.Image, str]]


def retrieve(bundle: ModelBundle, gallery: Gallery, image: Any, heads: Any = None, role: Optional[str] = None, *,
             top_n: Any = 1, k: Any = 8, center: bool = True) -> RetrievalResult:
    """Nearest gallery images to ``image`` by the chosen heads' summed contributions and by
    the full embedding (cosine similarity; ``center``: minus the gallery mean first)."""
    from clipdecomp.retrieval import gallery_contributions, nearest

    image = check_image(image)
    chosen = resolve_heads(bundle, heads, role, top_n)
    k = check_int(k, "The number of neighbours", 1, min(MAX_NEIGHBOURS, len(gallery)), default=8)
    g = gallery.contributions
    outside = [head_label(l, h) for (l, h), _ in chosen if l not in g.layers]
    if outside:
        raise InputError(f"Head {outside[0]} is not in the gallery's layers {list(g.layers)}; pick a late head.")
    x, _ = bundle.model_view(image)
    with torch.no_grad():
        q = gallery_contributions(bundle.lm, [x], layers=list(g.layers), progress=False)
    out = []
    for sel in ([p for p, _ in chosen], None):
        idx, scores = nearest(q, g, sel, k, center=center)
        out.append([(gallery.images[i], f"{r + 1}. {s:.3f} · {gallery.captions[i]}")
                    for r, (i, s) in enumerate(zip(idx[0].tolist(), scores[0].tolist()))])
    return RetrievalResult(chosen, out[0], out[1])


# ----------------------------------------------------------------------------- UI


def head_options(bundle: ModelBundle) -> list[tuple[str, str]]:
    """Every head of the late layers, labelled with its role when known."""
    roles = {h.key: h.role for h in bundle.results.heads} if bundle.results is not None else {}
    return [(f"{head_label(l, h)}" + (f": {roles[(l, h)]}" if (l, h) in roles else ""), head_label(l, h))
            for l in bundle.late_layers() for h in range(bundle.n_heads)]


def role_options(bundle: ModelBundle) -> list[str]:
    from clipdecomp.roles import known_categories

    return known_categories(bundle.results) if bundle.results is not None else []


def build(state: DemoState, image: Any) -> dict[str, Any]:
    """The tab's components and the ``/retrieve`` endpoint (call inside ``gr.Tab``)."""
    import gradio as gr

    from .components import ui_handler

    bundle = state.bundle
    cfg = state.config
    with gr.Row():
        heads = gr.Dropdown(label="Heads (summed)", choices=head_options(bundle), multiselect=True,
                            allow_custom_value=True)  # checked by retrieve, with a clearer message
        roles = role_options(bundle)
        role = gr.Dropdown(label="...or a role (or any text)", choices=roles, allow_custom_value=True,
                           value="colours" if "colours" in roles else None)
        top_n = gr.Number(label="Heads per role", value=1, precision=0, minimum=1, maximum=16)
        k = gr.Slider(1, MAX_NEIGHBOURS, value=8, step=1, label="Neighbours")
    with gr.Row():
        center = gr.Checkbox(label="Subtract the gallery mean before cosine similarity", value=True)
        folder = gr.Textbox(label=f"Gallery folder on the server (empty: {cfg.gallery_size} rendered toy scenes)",
                            placeholder="empty = toy scenes")
        run = gr.Button("Find neighbours", variant="primary")
    used = gr.Markdown()
    gr.Markdown("**Neighbours by the heads** (their summed direct contributions)")
    by_heads = gr.Gallery(label="Neighbours by the heads", show_label=False, columns=8, height=260, format="png",
                          elem_classes="square-thumbs")
    gr.Markdown("**Neighbours by the full image embedding** (ordinary CLIP retrieval)")
    by_full = gr.Gallery(label="Neighbours by the full image embedding", show_label=False, columns=8, height=260,
                         format="png", elem_classes="square-thumbs")

    @ui_handler
    def retrieve_fn(image_value: Any, heads_value: Any, role_value: Optional[str], top_n_value: float,
                    k_value: float, center_value: bool, folder_value: Optional[str]):
        b = state.bundle
        if folder_value and folder_value.strip():
            gal = folder_gallery(b, folder_value)
        else:
            gal = toy_gallery(b, cfg.gallery_size, cfg.gallery_seed, state.cache_dir)
        r = retrieve(b, gal, image_value, heads_value, role_value, top_n=top_n_value, k=k_value,
                     center=bool(center_value))
        lines = [f"Gallery: {gal.name}. Heads used:"] + [f"- {head_label(*p)}: {why}" for p, why in r.heads]
        return "\n".join(lines), r.by_heads, r.by_full

    run.click(retrieve_fn, [image, heads, role, top_n, k, center, folder], [used, by_heads, by_full],
              api_name="retrieve", concurrency_id="fast")

    def refresh():
        b = state.bundle
        rs = role_options(b)
        return (gr.update(choices=head_options(b), value=[]),
                gr.update(choices=rs, value="colours" if "colours" in rs else None))

    return {"refresh": refresh, "refresh_outputs": [heads, role]}
