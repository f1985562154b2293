"""The demo app (issue 7): launched in-process on the bundled model and driven through
``gradio_client``, plus the plain functions behind the tabs.

One app serves the whole module (tiny gallery, tiny toy Waterbirds set) so the file stays
well under a minute of CPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import zipfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

from gradio_client import Client, handle_file  # noqa: E402

from clipdecomp.errors import InputError  # noqa: E402
from demo import limits  # noqa: E402
from demo.examples import TOY_EXAMPLES  # noqa: E402
from demo.state import DemoConfig, DemoState  # noqa: E402
from demo.ui import build_app, launch  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRIANGLE = next(e for e in TOY_EXAMPLES if e.file == "toy_yellow_triangle_water.png")
TEXTS = ["a triangle", "a square", "on water"]
LATE = [2, 3, 4, 5]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cfg = DemoConfig(cache_dir=tmp_path_factory.mktemp("demo-cache"), gallery_size=24, waterbirds_scale=0.02,
                     random_trials=1)
    state = DemoState(cfg)
    app = build_app(state)
    port = _free_port()
    launch(app, port=port, prevent_thread_lock=True, quiet=True)
    client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp_path_factory.mktemp("dl")))
    yield SimpleNamespace(state=state, client=client, port=port)
    app.close()


def _rows(table: dict) -> list[list]:
    return table["data"]


def _error(served, *args, api_name: str) -> str:
    with pytest.raises(Exception) as info:
        served.client.predict(*args, api_name=api_name)
    return str(info.value)


# ----------------------------------------------------------------------------- heatmaps


def test_heatmap_endpoint_returns_overlays_relative_map_and_true_cosines(served):
    overlays, relative, scores = served.client.predict(
        handle_file(TRIANGLE.path), "\n".join(TEXTS), LATE, False, api_name="/heatmap")
    assert [o["caption"] for o in overlays] == TEXTS
    crop = Image.open(TRIANGLE.path).convert("RGB").resize((288, 288), Image.BICUBIC)
    for o in overlays:
        im = Image.open(o["image"]).convert("RGB")
        assert im.size == (288, 288)
        # the heat colours are blended in: the overlay is not the plain (upscaled) image
        assert np.abs(np.asarray(im, float) - np.asarray(crop, float)).mean() > 10
    assert Image.open(relative).size == (288, 288)
    # the scores are the model's own image-text cosine similarities
    lm = served.state.bundle.lm
    from clipdecomp.zeroshot import text_embeddings

    with torch.no_grad():
        img = F.normalize(lm.clip.encode_image(lm.preprocess(Image.open(TRIANGLE.path).convert("RGB"))[None]), dim=-1)
        expected = (img @ text_embeddings(lm, TEXTS).T)[0]
    rows = _rows(scores)
    assert [r[0] for r in rows] == TEXTS
    assert [r[1] for r in rows] == pytest.approx(expected.tolist(), abs=2e-4)


def test_heatmap_with_one_text_has_no_relative_map(served):
    overlays, relative, scores = served.client.predict(
        handle_file(TRIANGLE.path), "a triangle", [5], False, api_name="/heatmap")
    assert len(overlays) == 1 and relative is None and len(_rows(scores)) == 1


def test_relative_map_localises_the_object(served):
    """Plain function: 'a yellow object' rather than 'a blue object' is stronger on the
    yellow triangle's patches than on the background (the toy scene's mask is known).

    Colour, because the late heads write it at the object's patches. (Not 'a triangle'
    against 'a square': in the bundled model that difference is negative on the object in
    both the triangle and the square example scenes (-0.39 and -0.36); its late heads tell
    these two shapes, the ones tied to the spurious cue, apart only weakly.)
    """
    from clipdecomp.toyworld.world import render, sample_scene
    from demo.heatmap_tab import compute_heatmaps

    image, masks = render(sample_scene(np.random.default_rng(TRIANGLE.seed), spurious=None, fixed=TRIANGLE.factors))
    r = compute_heatmaps(served.state.bundle, image, ["a yellow object", "a blue object"])
    cover = F.avg_pool2d(torch.tensor(masks.any(0), dtype=torch.float32)[None, None], 12)[0, 0]  # 8x8 patches
    rel = r.relative_map
    assert rel.shape == (8, 8) and r.layers == LATE
    assert torch.allclose(rel, r.maps[0] - r.maps[1], atol=1e-5)
    assert rel[cover > 0.3].mean() > rel[cover < 0.05].mean() + 0.05


@pytest.mark.parametrize("case, expected", [
    ("none", "No image"),
    ("garbage", "is not an image"),
    ("truncated", "truncated or corrupt"),
    ("wide", "5000x20 pixels; the limit is 4096x4096"),
    ("no text", "No text"),
    ("17 texts", "the limit is 16"),
    ("long text", "the limit is 200 characters"),
    ("no layer", "No layer chosen"),
])
def test_heatmap_bad_inputs_get_clear_messages(served, tmp_path, case, expected):
    image = handle_file(TRIANGLE.path)
    texts, layers = "a triangle", [5]
    if case == "none":
        image = None
    elif case == "garbage":
        (tmp_path / "x.png").write_bytes(b"not an image " * 20)
        image = handle_file(tmp_path / "x.png")
    elif case == "truncated":
        raw = TRIANGLE.path.read_bytes()
        (tmp_path / "t.png").write_bytes(raw[: len(raw) // 2])
        image = handle_file(tmp_path / "t.png")
    elif case == "wide":
        Image.new("RGB", (5000, 20)).save(tmp_path / "w.png")
        image = handle_file(tmp_path / "w.png")
    elif case == "no text":
        texts = " \n\n "
    elif case == "17 texts":
        texts = "\n".join(f"text {i}" for i in range(17))
    elif case == "long text":
        texts = "x" * 201
    elif case == "no layer":
        layers = []
    message = _error(served, image, texts, layers, False, api_name="/heatmap")
    assert expected in message and "Traceback" not in message


def test_oversized_upload_is_refused(served, tmp_path):
    import httpx

    big = tmp_path / "big.png"
    big.write_bytes(b"\0" * (limits.MAX_IMAGE_BYTES + 1))
    with open(big, "rb") as f:
        r = httpx.post(f"http://127.0.0.1:{served.port}/gradio_api/upload", files={"files": f}, timeout=30)
    assert r.status_code == 413


# ----------------------------------------------------------------------------- head roles


def test_head_table_lists_every_late_head_with_role_and_texts(served):
    from clipdecomp.textspan_results import TextSpanResults

    results = TextSpanResults.load(REPO / "assets" / "toyclip_textspan.json")
    rows = _rows(served.client.predict(api_name="/head_table"))
    assert [r[0] for r in rows] == [f"L{l}.H{h}" for l in LATE for h in range(6)]
    for row, h in zip(rows, results.heads):
        assert (row[1], row[2], row[3]) == (h.layer, h.head, h.role)
        assert row[5] == " | ".join(h.texts[:5])


def test_head_detail_shows_texts_and_direction_maps(served):
    span = served.state.bundle.results.head(5, 1)
    texts, maps = served.client.predict(handle_file(TRIANGLE.path), "L5.H1", 3, api_name="/head_detail")
    rows = _rows(texts)
    assert [r[1] for r in rows] == span.texts
    assert [r[3] for r in rows] == pytest.approx(span.explained_variance, abs=1e-5)
    assert len(maps) == 3
    for m in maps:
        assert Image.open(m["image"]).size == (288, 288)
        assert any(t in m["caption"] for t in span.texts)
    assert "out of range" in _error(served, handle_file(TRIANGLE.path), "L9.H0", 3, api_name="/head_detail")


def test_compute_textspan_refuses_a_missing_folder(served, tmp_path):
    message = _error(served, str(tmp_path / "nope"), 10, 5, api_name="/compute_textspan")
    assert "does not exist" in message


def test_compute_textspan_plain_function(tmp_path):
    """A small pool and folder: the results replace the model's and are cached on disk."""
    from clipdecomp.toyworld.world import render, sample_scene
    from demo.roles_tab import compute_textspan, head_table

    rng = np.random.default_rng(1)
    for i in range(6):
        render(sample_scene(rng, spurious=None))[0].save(tmp_path / f"{i}.png")
    pool = tmp_path / "pool.txt"
    pool.write_text("# category: colours\nred\nblue\ngreen\n# category: shapes\na circle\na square\na star\n")
    state = DemoState(DemoConfig(cache_dir=tmp_path / "cache"))
    compute_textspan(state, tmp_path, 6, 3, pool=str(pool), progress=False)
    rows = head_table(state.bundle)
    assert len(rows) == 24 and all(r[3] in ("colours", "shapes") for r in rows)
    assert state.bundle.results.n_images == 6 and state.results_cache_path(state.bundle).is_file()


# ----------------------------------------------------------------------------- retrieval


def test_retrieval_finds_the_query_itself_first(served, tmp_path):
    from demo.retrieval_tab import toy_gallery

    st = served.state
    gallery = toy_gallery(st.bundle, st.config.gallery_size, st.config.gallery_seed, st.cache_dir)
    gallery.images[5].save(tmp_path / "q.png")
    used, by_heads, by_full = served.client.predict(
        handle_file(tmp_path / "q.png"), ["L5.H1"], "colours", 1, 4, True, "", api_name="/retrieve")
    from clipdecomp.roles import heads_for_role

    best = heads_for_role(st.bundle.results, "colours", top_n=1)[0]
    assert "L5.H1: picked" in used and f"L{best.layer}.H{best.head}: role 'colours'" in used
    for neighbours in (by_heads, by_full):
        assert len(neighbours) == 4
        first = neighbours[0]["caption"]
        assert first.startswith("1. 1.000") and first.endswith(gallery.captions[5])
        assert Image.open(neighbours[1]["image"]).size == (96, 96)


def test_retrieval_bad_inputs(served):
    img = handle_file(TRIANGLE.path)
    assert "at least one head" in _error(served, img, [], "", 1, 4, True, "", api_name="/retrieve")
    assert "not in the gallery's layers" in _error(served, img, ["L0.H1"], "", 1, 4, True, "", api_name="/retrieve")
    assert "between 1 and 24" in _error(served, img, ["L5.H1"], "", 1, 30, True, "", api_name="/retrieve")


# ----------------------------------------------------------------------------- repair


def test_repair_evaluation_and_export(served, tmp_path):
    from repair.select import select_by_roles

    args = (["scenes and settings"], [], 0.5, 0)
    expected = select_by_roles(served.state.bundle.results, ["scenes and settings"], 6, 6, threshold=0.5).pairs()
    chosen = _rows(served.client.predict(*args, api_name="/select_heads"))
    assert [r[0] for r in chosen] == [f"L{l}.H{h}" for l, h in expected]

    chosen, summary, table = served.client.predict(*args, api_name="/repair_eval")
    assert "| square |" in summary and "| triangle |" in summary and "→" in summary
    assert table["headers"][1:5] == ["square on land", "square on water", "triangle on land", "triangle on water"]
    rows = {r[0]: r[1:] for r in _rows(table)}
    assert list(rows)[:3] == ["base", f"exact repair ({len(expected)} heads)", f"baked repair ({len(expected)} heads)"]
    for groups_worst_avg in rows.values():
        groups, worst = groups_worst_avg[:4], groups_worst_avg[4]
        assert all(0 <= v <= 100 for v in groups) and worst == min(groups)

    archive = served.client.predict(*args, api_name="/repair_export")
    with zipfile.ZipFile(archive) as zf:
        names = set(zf.namelist())
        assert {"open_clip_config.json", "open_clip_model.safetensors", "README.md", "repair.json"} <= names
        record = json.loads(zf.read("repair.json"))
        assert "## Evaluation" in zf.read("README.md").decode()  # the evaluation above went into the card
    assert [(c["layer"], c["head"]) for c in record["selection"]["heads"]] == expected


def test_repair_bad_inputs(served):
    assert "at least one role or one head" in _error(served, [], [], 0.5, 0, api_name="/repair_eval")
    assert "No head has a role score" in _error(served, ["colours"], [], 1.0, 0, api_name="/select_heads")


# ----------------------------------------------------------------------------- model loading


@pytest.mark.parametrize("name, expected", [("NOPE-1", "unknown model name"), ("RN50", "ModifiedResNet")])
def test_loading_a_bad_model_is_refused_and_keeps_the_current_one(served, name, expected):
    assert expected in _error(served, name, "", api_name="/load_model")
    assert served.state.bundle.is_bundled


def test_app_command_line(monkeypatch, capsys):
    spec = importlib.util.spec_from_file_location("clipdecomp_app", REPO / "app.py")
    app = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(app)
    monkeypatch.setenv("CLIPDECOMP_MODEL", "ViT-B-16")
    monkeypatch.setenv("SPACE_ID", "user/space")
    args = app.build_parser().parse_args(["--port", "7999"])
    cfg = app.config_from_args(args)
    assert (cfg.model, args.port, cfg.allow_model_switch) == ("ViT-B-16", 7999, False)
    assert app.main(["--model", "NOPE-1"]) == 2
    assert "unknown model name 'NOPE-1'" in capsys.readouterr().err


# ----------------------------------------------------------------------------- limits


def test_limits_plain_functions(tmp_path):
    assert limits.parse_texts(" a  red circle \n\n a red circle\nsand") == ["a red circle", "sand"]
    with pytest.raises(InputError, match="limit is 4096"):
        limits.check_image(Image.new("RGB", (4097, 16)))
    with pytest.raises(InputError, match="at least 8 pixels"):
        limits.check_image(Image.new("RGB", (7, 64)))
    Image.new("RGBA", (20, 10)).save(tmp_path / "a.png")
    assert limits.load_image(tmp_path / "a.png").mode == "RGB"
    assert limits.parse_head_labels(["L5.H2", "4.0"], 6, 6) == [(5, 2), (4, 0)]
    with pytest.raises(InputError, match="out of range"):
        limits.parse_head_labels("L6.H0", 6, 6)
    with pytest.raises(InputError, match="between 1 and 10"):
        limits.check_int(float("inf"), "n", 1, 10)
