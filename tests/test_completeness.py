"""Completeness experiment (clipdecomp.experiments.completeness) on a tiny random-init
ViT: k = 0 is the full mean ablation, a spanning basis gives the ceiling, in the pure
functions and in the accuracies of run_completeness."""

from __future__ import annotations

import csv

import numpy as np
import pytest
import torch

from clipdecomp.ablation import PartMeans, ablated_embedding
from clipdecomp.decomposition import decompose
from clipdecomp.errors import InputError
from clipdecomp.experiments.completeness import (
    ablated_constant,
    ceiling_embedding,
    completeness_embeddings,
    run_completeness,
)
from conftest import make_images

LATE = [1, 2]  # of the tiny model's 3 layers


@pytest.fixture(scope="module")
def parts(tiny64):
    means = PartMeans.from_decomposition(decompose(tiny64, make_images(tiny64.visual, 12, seed=1), token_layers=None))
    dec = decompose(tiny64, make_images(tiny64.visual, 5, seed=2), token_layers=None)
    g = torch.Generator().manual_seed(0)
    D = dec.embed_dim
    bases = {(l, h): torch.linalg.qr(torch.randn(D, D, generator=g, dtype=torch.float64)).Q.T
             for l in LATE for h in range(dec.n_heads)}
    return dec, means, bases


def test_k0_is_the_full_mean_ablation(parts):
    dec, means, bases = parts
    k0 = completeness_embeddings(dec, means, LATE, bases, [0])[0]
    ref = ablated_embedding(dec, means, heads="all", mlps="all", embed=True)
    torch.testing.assert_close(k0, ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ablated_constant(means).expand_as(ref), ref, rtol=1e-10, atol=1e-10)


def test_spanning_basis_gives_the_ceiling(parts):
    dec, means, bases = parts
    D = dec.embed_dim
    full = completeness_embeddings(dec, means, LATE, bases, [D, D + 5])  # k beyond k_lh uses all directions
    early = [(0, h) for h in range(dec.n_heads)]
    ref = ablated_embedding(dec, means, heads=early, mlps="all", embed=True)
    torch.testing.assert_close(ceiling_embedding(dec, means, LATE), ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full[0], ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(full[1], ref, rtol=1e-10, atol=1e-10)


def test_partial_basis_projects_each_late_head(parts):
    dec, means, bases = parts
    k = 3
    got = completeness_embeddings(dec, means, LATE, bases, [k])[0]
    expected = ablated_constant(means).clone().expand(dec.batch_size, -1).clone()
    for (l, h), b in bases.items():
        Q = b[:k].T  # [D, k] orthonormal columns; projection Q Q^+ written with a solve
        coef = torch.linalg.lstsq(Q, (dec.heads[:, l, h] - means.heads[l, h]).T).solution  # [k, B]
        expected += (Q @ coef).T
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-9)
    # and it lies between: more directions -> closer to the ceiling
    ceiling = ceiling_embedding(dec, means, LATE)
    errs = [float((e - ceiling).norm()) for e in completeness_embeddings(dec, means, LATE, bases, [0, 3, 10, 24])]
    assert errs == sorted(errs, reverse=True) and errs[-1] < 1e-9 < errs[0]


def test_bad_inputs(parts):
    dec, means, bases = parts
    with pytest.raises(InputError, match="k values"):
        completeness_embeddings(dec, means, LATE, bases, [-1])
    with pytest.raises(InputError, match="no TextSpan basis for layer 0"):
        completeness_embeddings(dec, means, [0], bases, [1])
    with pytest.raises(InputError, match="absolute layer indices"):
        completeness_embeddings(dec, means, [-1], bases, [1])
    wrong = PartMeans(means.embed, means.mlps[:2], means.heads[:2], 1)
    with pytest.raises(InputError, match="means of another model"):
        ceiling_embedding(dec, wrong, LATE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """eval/ (3 classes x 3 toy scenes) and means/ (6 other scenes)."""
    from clipdecomp.toyworld.world import render, sample_scene

    root = tmp_path_factory.mktemp("completeness")
    rng = np.random.default_rng(1)
    for shape in ("circle", "square", "star"):
        for i in range(3):
            (root / "eval" / shape).mkdir(parents=True, exist_ok=True)
            render(sample_scene(rng, spurious=None, fixed={"shape": shape}))[0].save(root / "eval" / shape / f"{i}.png")
    (root / "means").mkdir()
    for i in range(6):
        render(sample_scene(rng, spurious=None))[0].save(root / "means" / f"{i}.png")
    return root


def test_run_completeness_accuracies(tiny64, folders):
    from clipdecomp.commands.textspan import run_textspan

    D = tiny64.visual.output_dim
    # A random pool without rank reduction: TextSpan picks D directions, a basis of the whole space.
    spans = run_textspan(tiny64, folders / "means", pool="random", random_size=3 * D, layers=2, k=D, rank=None,
                         batch_size=4, progress=False)
    assert spans.layers == LATE and all(h.k == D for h in spans.heads)
    rows = run_completeness(tiny64, folders / "eval", folders / "means", {"random": spans}, ks=[0, 2, D],
                            templates=["a photo of a {}."], batch_size=4, csv_path=folders / "table.csv",
                            progress=False)
    table = {(r["setting"], r["pool"], r["k"]): r["accuracy"] for r in rows}
    assert list(table) == [("base", "", ""), ("ceiling", "", ""), ("ablated", "", ""),
                           ("textspan", "random", 0), ("textspan", "random", 2), ("textspan", "random", D)]
    assert all(r["n_images"] == 9 for r in rows)
    assert table[("textspan", "random", 0)] == table[("ablated", "", "")]
    assert table[("textspan", "random", D)] == table[("ceiling", "", "")]
    # a constant embedding predicts one class for all 9 images: 3 of them are right
    assert table[("ablated", "", "")] == pytest.approx(1 / 3)
    with open(folders / "table.csv", newline="") as f:
        back = list(csv.DictReader(f))
    assert [(r["setting"], r["pool"], r["k"], float(r["accuracy"])) for r in back] == [
        (s, p, str(k), a) for (s, p, k), a in table.items()]


def test_run_completeness_bad_inputs(tiny64, folders):
    from clipdecomp.textspan_results import TextSpanResults

    with pytest.raises(InputError, match="spans is empty"):
        run_completeness(tiny64, folders / "eval", folders / "means", {})
    with pytest.raises(InputError, match="not found"):
        run_completeness(tiny64, folders / "eval", folders / "means", {"general": folders / "missing.json"})
    a = TextSpanResults("m", None, "p", [1], 1, None, 1, 0, 24, [])
    b = TextSpanResults("m", None, "p", [2], 1, None, 1, 0, 24, [])
    with pytest.raises(InputError, match="different layers"):
        run_completeness(tiny64, folders / "eval", folders / "means", {"a": a, "b": b})
    with pytest.raises(InputError, match="ks is empty"):
        run_completeness(tiny64, folders / "eval", folders / "means", {"a": a}, ks=[])


def test_command_line_checks_spans_before_loading(tmp_path, capsys):
    from clipdecomp.experiments.completeness import main

    assert main(["--eval", str(tmp_path), "--means", str(tmp_path), "--spans", "general"]) == 2
    assert "--spans entries are POOL=FILE.json, got 'general'" in capsys.readouterr().err
