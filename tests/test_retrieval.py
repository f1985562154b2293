"""Retrieval by head contributions: neighbours, precision@k, probes, cache, the command."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CUSTOM_CFG, make_images
from PIL import Image

from clipdecomp.errors import InputError, StoreError
from clipdecomp.retrieval import (
    Contributions,
    cosine_topk,
    factor_precision_at_k,
    gallery_contributions,
    nearest,
    parse_head,
    probe_accuracy,
)


@pytest.fixture(scope="module")
def gallery(tiny64) -> Contributions:
    images = make_images(tiny64.visual, 7, seed=11)
    return gallery_contributions(tiny64, images.split(3), layers=[1, 2], total=7, progress=False)


def _brute(q: np.ndarray, g: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    gn = g / np.linalg.norm(g, axis=1, keepdims=True)
    s = qn @ gn.T
    idx = np.argsort(-s, axis=1, kind="stable")[:, :k]
    return idx, np.take_along_axis(s, idx, 1)


def test_gallery_holds_the_decomposition_parts(tiny64, gallery):
    from clipdecomp.decomposition import decompose

    dec = decompose(tiny64, make_images(tiny64.visual, 7, seed=11), token_layers=None)
    assert gallery.layers == (1, 2) and gallery.n_model_layers == 3 and len(gallery) == 7
    assert torch.allclose(gallery.heads.double(), dec.heads[:, [1, 2]], atol=1e-6)
    assert torch.allclose(gallery.embeddings.double(), tiny64.clip.encode_image(make_images(tiny64.visual, 7, seed=11)), atol=1e-6)


def test_full_embedding_finds_the_query_itself_first(gallery):
    idx, scores = nearest(gallery, gallery, None, k=3)
    assert idx[:, 0].tolist() == list(range(7))
    assert torch.allclose(scores[:, 0], torch.ones(7), atol=1e-6)
    assert (scores[:, :-1] >= scores[:, 1:]).all()


def test_head_neighbours_match_a_brute_force_cosine(gallery):
    heads = [(2, 1), (-2, 3)]  # -2 is layer 1 of this 3-layer model
    feats = gallery.heads[:, 1, 1] + gallery.heads[:, 0, 3]
    assert torch.allclose(gallery.features(heads), feats)
    q = Contributions(gallery.heads[[4, 0]], gallery.embeddings[[4, 0]], gallery.layers, n_model_layers=3)
    idx, scores = nearest(q, gallery, heads, k=4)
    bi, bs = _brute(feats[[4, 0]].double().numpy(), feats.double().numpy(), 4)
    assert idx.tolist() == bi.tolist()
    np.testing.assert_allclose(scores.numpy(), bs, atol=1e-6)
    idx_c, _ = nearest(q, gallery, heads, k=4, center=True)
    mu = feats.mean(0, keepdim=True)
    bi_c, _ = _brute((feats[[4, 0]] - mu).double().numpy(), (feats - mu).double().numpy(), 4)
    assert idx_c.tolist() == bi_c.tolist()
    with pytest.raises(InputError, match="not in this gallery"):
        gallery.features([(0, 1)])
    with pytest.raises(InputError):
        gallery.features([(1, 9)])


def test_cosine_topk_leave_one_out_and_errors():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]])
    idx, _ = cosine_topk(x, x, 1, exclude_self=True)
    assert idx[:, 0].tolist() == [1, 0, 1]
    with pytest.raises(InputError):
        cosine_topk(x, x, 3, exclude_self=True)  # only 2 others
    with pytest.raises(InputError):
        cosine_topk(x, torch.zeros(3, 5), 1)


def test_factor_precision_at_k_by_hand():
    x = torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9], [0.6, 0.4]])
    labels = ["a", "a", "b", "b", "b"]
    # k=1 nearest others: 0->1 (a, ok), 1->4? cos(1,4)=0.96 < cos(1,0)=0.99 so 1->0 ok,
    # 2->3 ok, 3->2 ok, 4->1 (cos 0.96) wrong: 4/5
    assert factor_precision_at_k(x, labels, 1) == pytest.approx(4 / 5)
    # k=2: 0->{1,4}: 1/2; 1->{0,4}: 1/2; 2->{3,4}: 2/2; 3->{2,4}: 2/2; 4->{1,0}: 0/2
    assert factor_precision_at_k(x, labels, 2) == pytest.approx((0.5 + 0.5 + 1 + 1 + 0) / 5)
    assert factor_precision_at_k(x, torch.tensor([0, 0, 1, 1, 1]), 1) == pytest.approx(4 / 5)
    with pytest.raises(InputError):
        factor_precision_at_k(x, labels[:3], 1)


def test_probe_accuracy_finds_the_informative_head():
    g = torch.Generator().manual_seed(0)
    n, C, D = 400, 4, 16
    y = torch.randint(0, C, (n,), generator=g)
    means = torch.randn(C, D, generator=g) * 3
    informative = means[y] + torch.randn(n, D, generator=g)
    noise = torch.randn(n, D, generator=g)
    x = torch.stack([informative, noise], 1)[:, None]  # [N, 1, 2, D]
    acc = probe_accuracy(x[:200], y[:200].tolist(), x[200:], y[200:].tolist())
    assert acc.shape == (1, 2)
    assert acc[0, 0] > 0.95 and acc[0, 1] < 0.45


def test_cache_round_trip(gallery, tmp_path):
    gallery.files = [f"img{i}.png" for i in range(7)]
    try:
        path = gallery.save(tmp_path / "g.safetensors")
        back = Contributions.load(path)
    finally:
        gallery.files = []
    assert torch.equal(back.heads, gallery.heads) and torch.equal(back.embeddings, gallery.embeddings)
    assert back.layers == (1, 2) and back.files[3] == "img3.png" and back.n_model_layers == 3
    (tmp_path / "bad.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(StoreError):
        Contributions.load(tmp_path / "bad.safetensors")
    with pytest.raises(StoreError):
        Contributions.load(tmp_path / "missing.safetensors")


def test_parse_head():
    assert parse_head("5.2") == (5, 2) and parse_head("-1.0") == (-1, 0)
    with pytest.raises(InputError):
        parse_head("5")


def _hub(lm, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": TINY_CUSTOM_CFG, "preprocess_cfg": {"size": 32}}))
    save_file({k: v.float().contiguous() for k, v in lm.clip.state_dict().items()}, str(folder / "open_clip_model.safetensors"))
    return folder


def test_retrieve_command(tiny_custom64, tmp_path, monkeypatch):
    from clipdecomp.commands import retrieve as cmd

    hub = _hub(tiny_custom64, tmp_path / "hub")
    rng = np.random.default_rng(0)
    gal = tmp_path / "gallery" / "sub"
    gal.mkdir(parents=True)
    for i in range(6):
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(gal / f"im{i}.png")
    query = gal / "im3.png"
    out = tmp_path / "out"
    args = ["--model", f"local-dir:{hub}", "--gallery", str(tmp_path / "gallery"), "--query", str(query),
            "--head", "1.0", "--head", "0.2", "--k", "3", "--out", str(out), "--quiet"]
    assert cmd.main(args) == 0
    assert {p.name for p in out.iterdir()} == {"grid.png", "neighbours.csv", "gallery.safetensors"}
    rows = list(csv.DictReader((out / "neighbours.csv").read_text().splitlines()))
    assert len(rows) == 6 and rows[0]["representation"] == "L1.H0+L0.H2"
    full = [r for r in rows if r["representation"] == "full embedding"]
    assert full[0]["file"] == str(query) and float(full[0]["cosine"]) == pytest.approx(1.0, abs=1e-5)
    assert Image.open(out / "grid.png").size[0] > 4 * 32
    # a second run reuses the cache instead of decomposing the gallery again
    monkeypatch.setattr(cmd, "gallery_contributions", _counting(cmd.gallery_contributions))
    assert cmd.main(args) == 0 and _counting.calls == 1  # only the query
    bad_head = [a if a != "1.0" else "5.0" for a in args]
    assert cmd.main(bad_head) == 2  # no layer 5 in a 2-layer model
    assert cmd.main(["--model", f"local-dir:{hub}", "--out", str(out)]) == 2  # nothing to do


def _counting(fn):
    _counting.calls = 0

    def wrapper(*a, **k):
        _counting.calls += 1
        return fn(*a, **k)

    return wrapper


def test_evaluate_factor_structure(tiny_custom64):
    from clipdecomp.commands.retrieve import evaluate_factor

    r = evaluate_factor(tiny_custom64, "colour", n_eval=30, n_probe=20, k=3, batch_size=16, progress=False)
    assert r["head_choice"].startswith("best ridge linear probe") and len(r["heads"]) == 1
    assert set(r["precision"]) == {"heads (raw)", "full embedding (raw)", "heads (centred)", "full embedding (centred)"}
    assert all(0.0 <= v <= 1.0 for v in r["precision"].values())
    assert 0.0 < r["chance"] < 0.3  # ten colours, uniform
    given = evaluate_factor(tiny_custom64, "colour", heads=[(1, 2)], n_eval=30, k=3, progress=False)
    assert given["heads"] == ["L1.H2"] and given["precision"]["full embedding (raw)"] == r["precision"]["full embedding (raw)"]
    with pytest.raises(InputError, match="factors"):
        evaluate_factor(tiny_custom64, "size", n_eval=10, k=2, progress=False)
