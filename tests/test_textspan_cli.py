"""`clipdecomp textspan` end to end on a few rendered toy scenes with a random-init toy
model in hub layout; the results file; the image-folder helper; bad inputs."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipdecomp.cli import main as cli_main
from clipdecomp.errors import InputError
from clipdecomp.images import ImageFiles, image_loader, list_image_files
from clipdecomp.textspan_results import HeadSpan, TextSpanResults

POOL_TEXT = """# category: colours
a red object
a blue object
something green
a yellow thing
# category: shapes
a circle
a square
a star shape
a triangle
# category: scenes and settings
on water
on grass
on snow
in a forest
"""


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random-init toy model exported in hub layout, 10 toy scenes in two sub-folders, a pool file."""
    from clipdecomp.toyworld.train import build_model, export_hub_folder
    from clipdecomp.toyworld.world import render, sample_scene

    root = tmp_path_factory.mktemp("textspan_cli")
    export_hub_folder(build_model(0).eval(), root / "assets" / "toyclip", half=False)
    rng = np.random.default_rng(0)
    for i in range(10):
        folder = root / "images" / ("b" if i % 2 else "a")
        folder.mkdir(parents=True, exist_ok=True)
        render(sample_scene(rng, spurious=None))[0].save(folder / f"{i:02d}.png")
    (root / "pool.txt").write_text(POOL_TEXT)
    return root


def run(*args: str) -> int:
    return cli_main(["textspan", *map(str, args)])


def test_cli_matches_a_direct_computation(setup, capsys):
    from clipdecomp.decomposition import decompose
    from clipdecomp.loading import load_model
    from clipdecomp.pools import load_pool
    from clipdecomp.textspan import textspan
    from clipdecomp.zeroshot import text_embeddings

    out = setup / "res.json"
    model = f"local-dir:{setup / 'assets' / 'toyclip'}"
    rc = run("--model", model, "--images", setup / "images", "--pool", setup / "pool.txt", "--layers", 2,
             "--k", 4, "--rank", 16, "--batch-size", 4, "--out", out)
    assert rc == 0
    assert "layer head" in capsys.readouterr().out
    res = TextSpanResults.load(out)
    assert (res.model, res.pretrained, res.pool, res.layers, res.k, res.rank, res.n_images, res.seed) == (
        model, None, "pool", [4, 5], 4, 16, 10, 0)
    assert [h.key for h in res.heads] == [(l, h) for l in (4, 5) for h in range(6)]

    # the same computation by hand: images in sorted order, unnormalised head parts, TextSpan
    lm = load_model(model)
    files = list_image_files(setup / "images")
    assert [f.parent.name for f in files] == ["a"] * 5 + ["b"] * 5
    ds = ImageFiles(setup / "images", lm.preprocess)
    images = torch.stack([ds[i] for i in range(len(ds))])
    heads = decompose(lm, images, token_layers=None).heads
    pool = load_pool(str(setup / "pool.txt"))
    X = text_embeddings(lm, pool.texts)
    for h in res.heads:
        ref = textspan(heads[:, h.layer, h.head], X, 4, 16)
        assert h.indices == ref.indices
        assert h.texts == [pool.texts[i] for i in ref.indices]
        assert h.categories == [pool.categories[i] for i in ref.indices]
        np.testing.assert_allclose(h.explained_variance, ref.explained_variance.numpy(), rtol=1e-3)
        torch.testing.assert_close(h.basis, ref.basis.float(), atol=1e-4, rtol=0)
        torch.testing.assert_close(h.basis @ h.basis.T, torch.eye(4), atol=1e-5, rtol=0)
        assert h.role in {"colours", "shapes", "scenes and settings"} and 0 < h.role_score <= 1
        assert h.role == h.top_roles[0][0]


def test_bundled_model_random_pool_and_subset(setup, monkeypatch):
    monkeypatch.setenv("CLIPDECOMP_ASSETS", str(setup / "assets"))
    out = setup / "random.json"
    rc = run("--images", setup / "images", "--pool", "random", "--random-size", 40, "--layers", 1, "--k", 3,
             "--rank", 0, "--max-images", 6, "--seed", 3, "--quiet", "--out", out)
    assert rc == 0
    res = TextSpanResults.load(out)
    assert (res.model, res.pool, res.layers, res.rank, res.n_images, res.seed) == (None, "random", [5], None, 6, 3)
    for h in res.heads:
        assert all(t.startswith("random ") for t in h.texts) and set(h.categories) == {"random"}
        assert h.role == h.texts[0]  # a pool without categories: the role is the first text
    assert res.info["roles"]["method"] == "first text"


@pytest.mark.parametrize("args, message", [
    (["--pool", "nonsense-pool"], "unknown text pool 'nonsense-pool'"),
    (["--k", "0"], "--k must be an int >= 1"),
    (["--rank", "-1"], "--rank must be >= 0"),
    (["--images", "EMPTY"], "no image files under"),
    (["--images", "MISSING"], "image folder not found"),
    (["--out", "results.txt"], "--out must name a .json file"),
    (["--layers", "7"], "the model has 6 layers"),
])
def test_cli_bad_inputs(setup, capsys, args, message):
    (setup / "empty" / "sub").mkdir(parents=True, exist_ok=True)
    base = {"--model": f"local-dir:{setup / 'assets' / 'toyclip'}", "--images": str(setup / "images"),
            "--pool": str(setup / "pool.txt"), "--out": str(setup / "bad.json"), "--k": "2"}
    paths = {"EMPTY": str(setup / "empty"), "MISSING": str(setup / "missing")}
    for flag, value in zip(args[::2], args[1::2]):
        base[flag] = paths.get(value, value)
    assert run(*[x for kv in base.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("clipdecomp textspan: error: ") and message in err
    assert not (setup / "bad.json").exists()


def test_cli_help(capsys):
    with pytest.raises(SystemExit) as e:
        run("--help")
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--pool" in out and "unnormalised" in out


# ------------------------------------------------------------------ results file


def small_results() -> TextSpanResults:
    g = torch.Generator().manual_seed(0)
    heads = []
    for l, h in [(2, 1), (2, 0), (3, 0)]:
        basis = torch.linalg.qr(torch.randn(5, 3, generator=g)).Q.T.contiguous()  # [3, 5]
        heads.append(HeadSpan(l, h, ["a", "b ünïcode", "c"], ["x", "y", ""], [7, 1, 3], [3.0, 1.0, 2.0],
                              [0.5, 2 / 3, 1.0], 6.0, basis, torch.randn(5, generator=g),
                              role="x", role_score=0.5, top_roles=[("x", 0.5), ("", 0.33)]))
    return TextSpanResults(model="ViT-B-16", pretrained="laion2b_s34b_b88k", pool="general", layers=[2, 3], k=3,
                           rank=None, n_images=12, seed=7, embed_dim=5, heads=heads, info={"images": "/data"})


def test_results_round_trip(tmp_path):
    res = small_results()
    path = res.save(tmp_path / "r.json")
    assert path == tmp_path / "r.json" and (tmp_path / "r.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.json", "r.safetensors"]  # no temporaries left
    for p in (path, tmp_path / "r.safetensors"):  # either file name loads the pair
        back = TextSpanResults.load(p)
        assert back.to_json() == res.to_json()
        assert [h.key for h in back.heads] == [(2, 0), (2, 1), (3, 0)]
        for a, b in zip(res.heads, back.heads):
            assert torch.equal(a.basis, b.basis) and torch.equal(a.mean, b.mean)
            assert (a.texts, a.categories, a.role, a.top_roles) == (b.texts, b.categories, b.role, b.top_roles)
    assert back.head(3, 0).texts[1] == "b ünïcode"
    assert back.table(2)[0] == {"layer": 2, "head": 0, "role": "x", "score": 0.5, "texts": ["a", "b ünïcode"]}
    with pytest.raises(InputError, match="no TextSpan result for layer 9, head 0"):
        back.head(9, 0)


def test_head_reconstruct_projects_onto_mean_plus_span():
    h = small_results().heads[0]
    C = torch.randn(4, 5)
    full = h.reconstruct(C)
    expected = h.mean + (C - h.mean) @ h.basis.T @ h.basis
    torch.testing.assert_close(full, expected)
    torch.testing.assert_close(h.reconstruct(C, 0), h.mean.expand(4, 5))
    with pytest.raises(InputError, match="k must be in"):
        h.reconstruct(C, 4)


def test_results_load_errors(tmp_path):
    res = small_results()
    with pytest.raises(InputError, match="not found"):
        TextSpanResults.load(tmp_path / "missing.json")
    with pytest.raises(InputError, match="named FILE.json"):
        res.save(tmp_path / "r.txt")
    path = res.save(tmp_path / "r.json")
    other = small_results()
    other.heads[0].mean = other.heads[0].mean + 1
    other.save(tmp_path / "o.json")
    (tmp_path / "o.safetensors").replace(tmp_path / "r.safetensors")
    with pytest.raises(InputError, match="does not belong"):
        TextSpanResults.load(path)
    (tmp_path / "r.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="corrupt"):
        TextSpanResults.load(path)
    (tmp_path / "r.safetensors").unlink()
    with pytest.raises(InputError, match="no tensors file"):
        TextSpanResults.load(path)
    res.save(path)
    path.write_text(path.read_text()[:50])
    with pytest.raises(InputError, match="not valid JSON"):
        TextSpanResults.load(path)
    res.save(path)
    doc = json.loads(path.read_text())
    del doc["heads"][0]["texts"]
    path.write_text(json.dumps(doc))
    with pytest.raises(InputError, match="malformed"):
        TextSpanResults.load(path)
    path.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(InputError, match="not a TextSpan results file"):
        TextSpanResults.load(path)


def test_results_reject_inconsistent_heads():
    h = small_results().heads[0]
    with pytest.raises(InputError, match="3 texts"):
        HeadSpan(0, 0, ["a", "b", "c"], ["x"], [0, 1, 2], [1.0] * 3, [1.0] * 3, 1.0, h.basis, h.mean)
    with pytest.raises(InputError, match="twice"):
        TextSpanResults("m", None, "p", [2], 3, None, 1, 0, 5, [h, h])


# ------------------------------------------------------------------ image folder helper


def test_image_files_recursive_sorted_and_subsets(tmp_path):
    from PIL import Image

    for rel in ["b/2.png", "a/10.jpg", "a/9.PNG", ".hidden/x.png", "c/.y.png", "notes.txt"]:
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith("txt"):
            (tmp_path / rel).write_text("not an image")
        else:
            Image.new("RGB", (4, 3), (len(rel), 0, 0)).save(tmp_path / rel, format="PNG")
    ds = ImageFiles(tmp_path, lambda im: im.size)
    assert [f.relative_to(tmp_path).as_posix() for f in ds.files] == ["a/10.jpg", "a/9.PNG", "b/2.png"]
    assert ds[0] == (4, 3)
    to_t = lambda im: torch.tensor(np.asarray(im), dtype=torch.float32)  # noqa: E731
    one = image_loader(tmp_path, to_t, 2, max_images=2, seed=5)
    two = image_loader(tmp_path, to_t, 2, max_images=2, seed=5)
    assert one.dataset.files == two.dataset.files and len(one.dataset) == 2
    assert one.dataset.files == sorted(one.dataset.files, key=ds.files.index)  # subset kept in file order
    assert len(image_loader(tmp_path, to_t, 2, max_images=10).dataset) == 3
    assert [b.shape for b in image_loader(tmp_path, to_t, 2)] == [(2, 3, 4, 3), (1, 3, 4, 3)]


def test_image_files_errors(tmp_path):
    with pytest.raises(InputError, match="image folder not found"):
        ImageFiles(tmp_path / "nope")
    (tmp_path / "f.png").write_bytes(b"not a png")
    with pytest.raises(InputError, match="is not a folder"):
        ImageFiles(tmp_path / "f.png")
    with pytest.raises(InputError, match="cannot read image"):
        ImageFiles(tmp_path)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match="no image files under"):
        ImageFiles(tmp_path / "empty")
    with pytest.raises(InputError, match="batch_size"):
        image_loader(tmp_path, lambda x: x, 0)
    with pytest.raises(InputError, match="max_images"):
        image_loader(tmp_path, lambda x: x, 1, max_images=0)
