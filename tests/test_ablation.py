"""Mean-ablation: identities that must hold exactly, and streamed means."""

from __future__ import annotations

import pytest
import torch
from conftest import make_images, rel_err
from torch.utils.data import DataLoader, TensorDataset

from clipdecomp.ablation import PartMeans, ablated_embedding, compute_means
from clipdecomp.decomposition import decompose
from clipdecomp.errors import CheckpointError, InputError


@pytest.fixture(scope="module")
def batch(tiny64):
    x = make_images(tiny64.clip.visual, 7, seed=3)
    return x, decompose(tiny64, x, token_layers=None)


@pytest.fixture(scope="module")
def random_means(batch):
    _, dec = batch
    g = torch.Generator().manual_seed(5)
    L, H, D = dec.layers, dec.n_heads, dec.embed_dim
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return PartMeans(r(D), r(L, D), r(L, H, D), 100)


def test_ablating_nothing_is_total(batch, random_means):
    _, dec = batch
    assert torch.equal(ablated_embedding(dec, random_means), dec.total())


def test_ablating_with_the_part_itself_is_total(tiny64):
    x = make_images(tiny64.clip.visual, 1, seed=4)
    dec = decompose(tiny64, x, token_layers=None)
    own = PartMeans.from_decomposition(dec)  # batch of one: "mean" == the part
    out = ablated_embedding(dec, own, heads="all", mlps="all", embed=True)
    assert rel_err(out, dec.total()) < 1e-12
    out = ablated_embedding(dec, own, heads=[(0, 1), (-1, -1)], layers_up_to=2)
    assert rel_err(out, dec.total()) < 1e-12


def test_ablation_replaces_exactly_the_chosen_parts(batch, random_means):
    _, dec = batch
    m = random_means
    out = ablated_embedding(dec, m, heads=[(1, 2), (2, 0)], mlps=[0], embed=True)
    expect = (
        dec.total()
        - dec.heads[:, 1, 2] + m.heads[1, 2]
        - dec.heads[:, 2, 0] + m.heads[2, 0]
        - dec.mlps[:, 0] + m.mlps[0]
        - dec.embed + m.embed
    )
    assert rel_err(out, expect) < 1e-12
    # duplicates / negative indices select the same part once
    assert torch.allclose(ablated_embedding(dec, m, heads=[(1, 2), (-2, -2)]), ablated_embedding(dec, m, heads=[(1, 2)]))


def test_layers_up_to(batch, random_means):
    _, dec = batch
    m = random_means
    out = ablated_embedding(dec, m, layers_up_to=2)
    expect = dec.total() - dec.heads[:, :2].sum((1, 2)) + m.heads[:2].sum((0, 1)) - dec.mlps[:, :2].sum(1) + m.mlps[:2].sum(0)
    assert rel_err(out, expect) < 1e-12
    assert torch.equal(ablated_embedding(dec, m, layers_up_to=0), dec.total())
    everything = ablated_embedding(dec, m, layers_up_to=dec.layers, embed=True)
    const = m.embed + m.mlps.sum(0) + m.heads.sum((0, 1))
    assert torch.allclose(everything, const.expand_as(everything), atol=1e-12)


def test_streamed_means_equal_one_shot(tiny64, batch):
    x, dec = batch
    labels = torch.arange(x.shape[0])
    loader = DataLoader(TensorDataset(x, labels), batch_size=3)  # batches 3, 3, 1
    means = compute_means(tiny64, loader, progress=False)
    assert means.count == 7
    assert rel_err(means.embed, dec.embed.mean(0)) < 1e-12
    assert rel_err(means.mlps, dec.mlps.mean(0)) < 1e-12
    assert rel_err(means.heads, dec.heads.mean(0)) < 1e-12
    bare = compute_means(tiny64, [x[:4], x[4:]], progress=False)  # plain tensors also accepted
    assert rel_err(bare.heads, means.heads) < 1e-12


def test_save_load_roundtrip(random_means, tmp_path):
    p = tmp_path / "means.safetensors"
    random_means.save(p)
    back = PartMeans.load(p)
    assert back.count == 100
    for k in ("embed", "mlps", "heads"):
        assert torch.equal(getattr(back, k), getattr(random_means, k))
    assert not list(tmp_path.glob("*.tmp-*"))
    (tmp_path / "bad.safetensors").write_bytes(b"garbage!" * 4)
    with pytest.raises(CheckpointError, match="cannot read part means"):
        PartMeans.load(tmp_path / "bad.safetensors")
    with pytest.raises(CheckpointError, match="not found"):
        PartMeans.load(tmp_path / "absent.safetensors")


def test_bad_selections(batch, random_means):
    _, dec = batch
    m = random_means
    with pytest.raises(InputError, match="head index 4"):
        ablated_embedding(dec, m, heads=[(0, 4)])
    with pytest.raises(InputError, match="pairs"):
        ablated_embedding(dec, m, heads=[0])
    with pytest.raises(InputError, match="'all'"):
        ablated_embedding(dec, m, mlps="some")
    with pytest.raises(InputError, match="layers_up_to"):
        ablated_embedding(dec, m, layers_up_to=4)
    wrong = PartMeans(m.embed, m.mlps[:2], m.heads[:2], 1)
    with pytest.raises(InputError, match="another model"):
        ablated_embedding(dec, wrong)


def test_bad_loader(tiny64):
    with pytest.raises(InputError, match="cannot find images"):
        compute_means(tiny64, [["not", "images"]], progress=False)
    with pytest.raises(InputError, match="no images"):
        compute_means(tiny64, [], progress=False)
