"""The toy model's training term on direct paths (clipdecomp.toyworld.direct_paths):
the class-token writes recorded by hooks are the engine's decomposition, and the
share it penalises is what its docstring says."""

from __future__ import annotations

import pytest
import torch

from clipdecomp.decomposition import decompose
from clipdecomp.toyworld.direct_paths import (
    ClassTokenWrites,
    direct_contributions,
    direct_share_of_model,
    early_direct_share,
    penalised_writes,
    write_names,
)

from conftest import make_images


@pytest.mark.parametrize("fixture", ["tiny64", "tiny_custom64"])
def test_recorded_writes_are_the_decomposition(fixture, request):
    """Hooked writes, folded through ln_post, equal the engine's embed / per-layer head sums /
    MLP terms (less their bias shares) and sum to the model's own embedding (float64)."""
    lm = request.getfixturevalue(fixture)
    visual = lm.visual
    x = make_images(visual, 3, seed=4)
    with ClassTokenWrites(visual) as rec:
        emb = visual(x)
    ln = visual.ln_post
    contrib = direct_contributions(rec.writes(), ln.weight, ln.eps, visual.proj)
    bias = ln.bias @ visual.proj
    torch.testing.assert_close(contrib.sum(1) + bias, emb, rtol=0, atol=1e-10)

    dec = decompose(lm, x, token_layers=None)
    share = bias / dec.n_terms  # the engine spreads ln_post's bias evenly over its terms
    L, H = dec.layers, dec.n_heads
    assert contrib.shape[1] == 1 + 2 * L == len(write_names(L))
    torch.testing.assert_close(contrib[:, 0] + share, dec.embed, rtol=0, atol=1e-10)
    for layer in range(L):
        torch.testing.assert_close(contrib[:, 1 + 2 * layer] + H * share, dec.heads[:, layer].sum(1), rtol=0, atol=1e-10)
        torch.testing.assert_close(contrib[:, 2 + 2 * layer] + share, dec.mlps[:, layer], rtol=0, atol=1e-10)


def test_hooks_are_removed_and_need_one_pass(tiny64):
    visual = tiny64.visual
    x = make_images(visual, 2)
    n_hooks = sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in visual.modules())
    with ClassTokenWrites(visual) as rec:
        visual(x)
        visual(x)
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in visual.modules()) == n_hooks
    with pytest.raises(RuntimeError, match="exactly one forward pass"):
        rec.writes()


def test_penalised_writes_leave_only_the_late_attention_layers_free():
    names = write_names(6)
    free = [n for n, p in zip(names, penalised_writes(6, 4).tolist()) if not p]
    assert free == ["attn2", "attn3", "attn4", "attn5"]
    assert penalised_writes(6, 0).all()
    with pytest.raises(ValueError, match="late_layers"):
        penalised_writes(6, 7)


def test_share_is_zero_or_one_when_only_one_kind_of_path_writes():
    g = torch.Generator().manual_seed(0)
    B, D = 32, 5
    writes = torch.randn(B, D, generator=g)
    nothing = torch.zeros(B, D)
    mask = torch.tensor([True, False])
    only_free = torch.stack([nothing, writes], 1)
    only_penalised = torch.stack([writes, nothing], 1)
    assert float(early_direct_share(only_free, mask, only_free.sum(1))) == 0.0
    assert float(early_direct_share(only_penalised, mask, only_penalised.sum(1))) == pytest.approx(1.0, rel=1e-12)
    halves = torch.stack([writes, writes], 1)  # equal writes: each has a quarter of the sum's variance
    assert float(early_direct_share(halves, mask, halves.sum(1))) == pytest.approx(0.25, rel=1e-12)


def test_share_trains_the_paths_it_penalises(tiny_configs):
    """The penalty's gradient reaches the penalised MLPs, and a few steps on it alone lower it."""
    import open_clip

    torch.manual_seed(0)
    visual = open_clip.create_model("cdtest-tiny-vit").visual.double().train()
    x = make_images(visual, 16, seed=1)
    opt = torch.optim.SGD(visual.parameters(), lr=0.05)
    shares = []
    for _ in range(5):
        with ClassTokenWrites(visual) as rec:
            visual(x)
        share = direct_share_of_model(visual, rec, late_layers=1)
        opt.zero_grad()
        share.backward()
        assert visual.transformer.resblocks[0].mlp.c_fc.weight.grad.abs().sum() > 0
        opt.step()
        shares.append(share.item())
    assert shares[-1] < shares[0]
