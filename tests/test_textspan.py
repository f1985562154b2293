"""Tests for clipdecomp.textspan: the fast TextSpan against the direct reference."""

from __future__ import annotations

import pytest
import torch

from clipdecomp.textspan import TextSpanResult, direct_textspan, textspan, textspan_heads

D = 64
N = 2000
N_DISTRACTORS = 300
PLANTED_STD = torch.tensor([10.0, 7.0, 5.0, 3.5, 2.5])
NOISE_STD = 0.05


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The problems here are tiny; one thread avoids oversubscription stalls on a busy CPU."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def planted_problem(seed: int = 0, orthogonal: bool = False):
    """Outputs C: [N, D] built from a few text directions with distinct variances.

    Returns (C, X, planted_rows): texts X: [T, D] are the planted directions
    plus random distractors, unit-normalised and shuffled; ``planted_rows[j]``
    is the row of X holding the j-th planted direction (decreasing variance).
    """
    g = torch.Generator().manual_seed(seed)
    P = torch.randn(len(PLANTED_STD), D, generator=g)
    if orthogonal:
        P = torch.linalg.qr(P.T).Q.T
    P = torch.nn.functional.normalize(P, dim=1)
    z = torch.randn(N, len(PLANTED_STD), generator=g) * PLANTED_STD
    C = 3.0 + z @ P + NOISE_STD * torch.randn(N, D, generator=g)
    X = torch.cat([P, torch.randn(N_DISTRACTORS, D, generator=g)])
    X = torch.nn.functional.normalize(X, dim=1)
    perm = torch.randperm(X.shape[0], generator=g)
    X = X[perm]
    planted_rows = [int((perm == j).nonzero()) for j in range(len(PLANTED_STD))]
    return C, X, planted_rows


@pytest.mark.parametrize("rank", [None, 16])
@pytest.mark.parametrize("normalize", [True, False])
def test_fast_matches_direct(rank, normalize):
    C, X, _ = planted_problem()
    k = 12
    fast = textspan(C, X, k, rank, normalize=normalize)
    ref = direct_textspan(C, X, k, rank, normalize=normalize)
    assert fast.indices == ref.indices
    torch.testing.assert_close(fast.explained_variance, ref.explained_variance, rtol=1e-4, atol=0)
    torch.testing.assert_close(fast.cumulative_fraction, ref.cumulative_fraction, rtol=1e-4, atol=0)
    assert fast.total_variance == pytest.approx(ref.total_variance, rel=1e-10)
    # Same directions up to sign.
    torch.testing.assert_close((fast.basis * ref.basis).sum(1).abs(),
                               torch.ones(k, dtype=torch.float64), rtol=0, atol=1e-8)


def test_rank_above_data_rank_matches_direct():
    # Head outputs have rank <= head_dim + 1 (< the default rank 80 for ViT-L-14);
    # the surplus (null-space) singular vectors are arbitrary and must be dropped,
    # or the eigh-based and SVD-based rank reductions pick different texts.
    g = torch.Generator().manual_seed(6)
    C = (torch.randn(N, 10, generator=g) * torch.logspace(0, -1, 10)) @ torch.randn(10, D, generator=g)
    X = torch.nn.functional.normalize(torch.randn(400, D, generator=g), dim=1)
    fast = textspan(C, X, k=8, rank=16)
    ref = direct_textspan(C, X, k=8, rank=16)
    assert fast.indices == ref.indices
    torch.testing.assert_close(fast.explained_variance, ref.explained_variance, rtol=1e-4, atol=0)
    assert len(textspan(C, X, k=30, rank=16).indices) == 10  # only 10 real directions


@pytest.mark.parametrize("rank", [None, 16])
@pytest.mark.parametrize("orthogonal", [True, False])
def test_planted_texts_found_first_in_order(rank, orthogonal):
    C, X, planted = planted_problem(seed=1, orthogonal=orthogonal)
    res = textspan(C, X, k=8, rank=rank)
    assert res.indices[: len(planted)] == planted
    ev = res.explained_variance[: len(planted)]
    assert torch.all(ev[:-1] > ev[1:])
    if orthogonal:  # each planted direction explains its own variance
        torch.testing.assert_close(ev, PLANTED_STD.double() ** 2, rtol=0.1, atol=0)


@pytest.mark.parametrize("rank", [None, 16])
def test_result_invariants(rank):
    C, X, _ = planted_problem(seed=2)
    res = textspan(C, X, k=16, rank=rank)
    assert isinstance(res, TextSpanResult)
    k = len(res.indices)
    assert k == 16 and len(set(res.indices)) == k
    assert res.basis.shape == (k, D) and res.mean.shape == (D,)
    frac = res.cumulative_fraction
    assert torch.all(frac[1:] >= frac[:-1]) and float(frac[-1]) <= 1 + 1e-12
    assert torch.all(res.explained_variance >= 0)
    torch.testing.assert_close(res.basis @ res.basis.T, torch.eye(k, dtype=torch.float64),
                               rtol=0, atol=1e-10)
    torch.testing.assert_close(res.mean, C.double().mean(0))
    assert res.total_variance == pytest.approx(float(C.double().var(0, unbiased=False).sum()))


def test_reconstruction():
    C, X, planted = planted_problem(seed=3)
    # All planted directions chosen: the residual is at noise level.
    res = textspan(C, X, k=len(planted), rank=None)
    assert res.indices == planted
    rec = res.reconstruct(C)
    assert rec.shape == C.shape and rec.dtype == C.dtype
    rms = (C - rec).pow(2).mean().sqrt()
    assert rms < 1.5 * NOISE_STD
    assert float(res.cumulative_fraction[-1]) > 0.999
    coef = res.coefficients(C)
    assert coef.shape == (N, len(planted))
    torch.testing.assert_close(res.mean.float() + coef @ res.basis.float(), rec, rtol=0, atol=1e-4)
    # A full basis (k = D, no rank reduction) reconstructs exactly.
    full = textspan(C.double(), X.double(), k=D, rank=None)
    assert len(full.indices) == D
    torch.testing.assert_close(full.reconstruct(C.double()), C.double(), rtol=0, atol=1e-9)
    assert float(full.cumulative_fraction[-1]) == pytest.approx(1.0, abs=1e-10)


def test_stops_early_when_span_exhausted():
    C, X, _ = planted_problem(seed=4)
    res = textspan(C, X, k=30, rank=6)  # at most 6 independent directions
    assert len(res.indices) == 6
    assert res.explained_variance.shape == (6,) and res.basis.shape == (6, D)


def test_textspan_heads_tensor_and_dict():
    C, X, _ = planted_problem(seed=5)
    g = torch.Generator().manual_seed(0)
    contribs = torch.stack([C, C.flip(1), torch.randn(N, D, generator=g), C * 2], 1)
    contribs = contribs.reshape(N, 2, 2, D)  # [N, L, H, D]
    out = textspan_heads(contribs, X, k=5, rank=16, layers=[10, 11])
    assert set(out) == {(10, 0), (10, 1), (11, 0), (11, 1)}
    for (layer, head), res in out.items():
        single = textspan(contribs[:, layer - 10, head], X, k=5, rank=16)
        assert res.indices == single.indices
    dict_out = textspan_heads({(3, 7): C}, X, k=5, rank=16)
    assert dict_out[(3, 7)].indices == out[(10, 0)].indices


@pytest.mark.parametrize(
    "C_shape, X_shape, kwargs, match",
    [
        ((10, 8), (5, 9), {}, "embedding dims differ"),
        ((10, 8), (5, 8), {"k": 0}, "k .* must be an int >= 1"),
        ((10, 8), (5, 8), {"k": -3}, "k .* must be an int >= 1"),
        ((10, 8), (0, 8), {}, "texts X are empty"),
        ((0, 8), (5, 8), {}, "head outputs C are empty"),
        ((10,), (5, 8), {}, r"C must be \[N, D\]"),
        ((10, 8), (8,), {}, r"X must be \[T, D\]"),
        ((10, 8), (5, 8), {"rank": 0}, "rank must be None or an int >= 1"),
        ((10, 8), (5, 8), {"tol": -1.0}, "tol must be >= 0"),
        ((10, 8), (5, 8), {"rank_rtol": -1.0}, "rank_rtol must be >= 0"),
    ],
)
@pytest.mark.parametrize("fn", [textspan, direct_textspan])
def test_bad_inputs(fn, C_shape, X_shape, kwargs, match):
    with pytest.raises(ValueError, match=match):
        fn(torch.randn(C_shape), torch.randn(X_shape), **kwargs)


def test_textspan_heads_bad_shape():
    with pytest.raises(ValueError, match=r"\[N, L, H, D\]"):
        textspan_heads(torch.randn(10, 4, 8), torch.randn(3, 8))
    with pytest.raises(ValueError, match="layers has 1 labels"):
        textspan_heads(torch.randn(10, 2, 1, 8), torch.randn(3, 8), layers=[0])
