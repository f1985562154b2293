"""Heatmaps, baselines and overlays on tiny random-init open_clip towers (float64)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import make_images
from PIL import Image

from clipdecomp.baselines import attention_matrices, attention_rollout, gradcam_maps, raw_attention_map, rollout
from clipdecomp.decomposition import decompose
from clipdecomp.errors import InputError
from clipdecomp.heatmaps import class_heatmaps, head_direction_heatmaps, relative_heatmap, text_heatmaps, upsample
from clipdecomp.overlay import colorize, image_grid, render_overlay, save_png

TOL = 1e-10


def _texts(D: int, T: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(T, D, generator=g, dtype=torch.float64), dim=-1)


@pytest.fixture(scope="module")
def dec64(tiny64):
    return decompose(tiny64, make_images(tiny64.visual, 3), token_layers="all")


# ----------------------------------------------------------------------------- heatmaps


def test_patch_layout_follows_the_grid(dec64):
    gh, gw = dec64.grid
    assert (gh, gw) == (4, 6)  # non-square, so rows and columns cannot be swapped silently
    t = _texts(dec64.embed_dim, 2)
    maps = text_heatmaps(dec64, t)
    scores = dec64.token_scores(t)
    assert maps.shape == (3, 2, gh, gw)
    for r, c in [(0, 0), (0, 5), (3, 0), (2, 4)]:
        assert torch.allclose(maps[:, :, r, c], scores[:, 1 + r * gw + c, :], atol=TOL, rtol=0)


@pytest.mark.parametrize("layers", [[0], [2], [0, 1, 2], None])
def test_patches_plus_class_token_sum_to_the_layer_heads(dec64, layers):
    t = _texts(dec64.embed_dim, 4)
    maps = text_heatmaps(dec64, t, layers)
    cls = dec64.token_scores(t, layers)[:, 0]  # the class token's own share, excluded from the map
    ls = layers if layers is not None else list(dec64.token_layers)
    expect = dec64.heads[:, ls].sum((1, 2)) @ t.T  # [B, T]: the layers' total head contribution
    assert torch.allclose(maps.sum((-2, -1)) + cls, expect, atol=TOL, rtol=0)
    # and the layers add up
    if layers is None:
        per_layer = sum(text_heatmaps(dec64, t, [l]) for l in dec64.token_layers)
        assert torch.allclose(maps, per_layer, atol=TOL, rtol=0)


def test_normalizer_subtracts_the_mean_class_map(dec64):
    t = _texts(dec64.embed_dim, 3, seed=2)
    classes = _texts(dec64.embed_dim, 7, seed=3)
    got = text_heatmaps(dec64, t, normalizer=classes)
    mean_map = text_heatmaps(dec64, classes).mean(1, keepdim=True)
    assert torch.allclose(got, text_heatmaps(dec64, t) - mean_map, atol=TOL, rtol=0)
    # normalising a class set by itself leaves maps that average to zero over the classes
    assert text_heatmaps(dec64, classes, normalizer=classes).mean(1).abs().max() < TOL


def test_class_heatmaps_pick_each_images_own_class(dec64):
    classes = _texts(dec64.embed_dim, 5, seed=4)
    targets = [3, 0, 3]
    got = class_heatmaps(dec64, classes, targets)
    full = text_heatmaps(dec64, classes, normalizer=classes)
    for b, c in enumerate(targets):
        assert torch.allclose(got[b], full[b, c], atol=TOL, rtol=0)
    with pytest.raises(InputError):
        class_heatmaps(dec64, classes, [0, 1])  # one target per image
    with pytest.raises(InputError):
        class_heatmaps(dec64, classes, [0, 1, 5])


def test_relative_heatmap_is_the_difference(dec64):
    a, b = _texts(dec64.embed_dim, 2, seed=5)
    rel = relative_heatmap(dec64, a, b, [1, 2])
    m = text_heatmaps(dec64, torch.stack([a, b]), [1, 2])
    assert torch.allclose(rel, m[:, 0] - m[:, 1], atol=TOL, rtol=0)


def test_head_direction_maps_sum_to_the_heads_coefficients(dec64):
    basis = torch.linalg.qr(torch.randn(dec64.embed_dim, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(6))).Q.T
    mean = dec64.heads[:, 1, 2].mean(0)
    r = head_direction_heatmaps(dec64, -2, 2, basis, image_index=1, mean=mean, top=2)
    assert r.layer == 1 and r.maps.shape == (5, *dec64.grid)
    raw = dec64.heads[1, 1, 2] @ basis.T  # this image's head contribution along each direction
    assert torch.allclose(r.coefficients, raw - mean @ basis.T, atol=TOL, rtol=0)
    cls = dec64.head_token_scores(basis, [1])[1, 0, 0, 2]  # class-token share of each direction
    assert torch.allclose(r.maps.sum((-2, -1)) + cls, raw, atol=TOL, rtol=0)
    order = torch.argsort(r.coefficients, descending=True).tolist()
    assert r.largest == order[:2] and r.most_negative == order[::-1][:2]
    assert r.coefficients[r.largest[0]] >= r.coefficients[r.most_negative[0]]


def test_heatmap_input_errors(tiny64, dec64):
    with pytest.raises(InputError, match=r"\[T, 24\]"):
        text_heatmaps(dec64, torch.zeros(2, 5, dtype=torch.float64))
    with pytest.raises(InputError):
        text_heatmaps(dec64, [[0.0] * 24])
    head_only = decompose(tiny64, make_images(tiny64.visual, 1), token_layers=[2])
    with pytest.raises(InputError, match="token_layers"):
        text_heatmaps(head_only, _texts(24, 1), [0])
    with pytest.raises(InputError):
        head_direction_heatmaps(dec64, 0, 9, _texts(24, 2))


def test_upsample_keeps_leading_dims_and_matches_bilinear():
    x = torch.arange(2 * 3 * 4 * 6, dtype=torch.float64).reshape(2, 3, 4, 6)
    up = upsample(x, (8, 12))
    assert up.shape == (2, 3, 8, 12)
    ref = F.interpolate(x[1, 2][None, None], size=(8, 12), mode="bilinear", align_corners=False)[0, 0]
    assert torch.allclose(up[1, 2], ref)
    assert torch.allclose(upsample(torch.full((4, 6), 2.5), (7, 9)), torch.full((7, 9), 2.5))
    with pytest.raises(InputError):
        upsample(x, (0, 3))


# ----------------------------------------------------------------------------- baselines


def _hooked_attention(lm, images):
    """Full attention matrices [B, L, H, N, N] from the model's own nn.MultiheadAttention,
    asked to return its weights through forward hooks."""
    captured, handles = [], []
    for blk in lm.visual.transformer.resblocks:
        def pre(mod, args, kwargs):
            kwargs = dict(kwargs, need_weights=True, average_attn_weights=False)
            return args, kwargs

        def post(mod, args, kwargs, out):
            captured.append(out[1].detach())

        handles += [blk.attn.register_forward_pre_hook(pre, with_kwargs=True),
                    blk.attn.register_forward_hook(post, with_kwargs=True)]
    try:
        with torch.no_grad():
            emb = lm.clip.encode_image(images)
    finally:
        for h in handles:
            h.remove()
    return torch.stack(captured, 1), emb


def test_attention_matrices_are_the_models_own(tiny64):
    images = make_images(tiny64.visual, 2, seed=3)
    full, _ = _hooked_attention(tiny64, images)
    ours = attention_matrices(tiny64, images)
    assert ours.shape == full.shape == (2, 3, 4, 25, 25)
    assert torch.allclose(ours, full, atol=1e-12, rtol=0)
    dec = decompose(tiny64, images, token_layers=None)
    assert torch.allclose(ours[:, :, :, 0], dec.class_attention, atol=1e-12, rtol=0)
    assert torch.allclose(raw_attention_map(dec), full[:, -1, :, 0, 1:].mean(1).reshape(2, 4, 6), atol=1e-12, rtol=0)


def test_attention_matrices_custom_blocks_match_the_decomposition(tiny_custom64):
    images = make_images(tiny_custom64.visual, 2, seed=4)
    ours = attention_matrices(tiny_custom64, images)
    dec = decompose(tiny_custom64, images, token_layers=None)
    assert torch.allclose(ours[:, :, :, 0], dec.class_attention, atol=1e-12, rtol=0)
    assert torch.allclose(ours.sum(-1), torch.ones_like(ours.sum(-1)), atol=1e-12)


def test_rollout_matches_a_direct_product_of_the_models_attention(tiny64):
    images = make_images(tiny64.visual, 2, seed=5)
    full, _ = _hooked_attention(tiny64, images)
    mean = full.mean(2).numpy()  # [B, L, N, N]
    N = mean.shape[-1]
    for b in range(2):
        aug = [0.5 * mean[b, l] + 0.5 * np.eye(N) for l in range(mean.shape[1])]
        direct = np.linalg.multi_dot(aug[::-1])  # A_L ... A_1
        got = rollout(torch.from_numpy(mean))[b].numpy()
        np.testing.assert_allclose(got, direct, atol=1e-12)
        np.testing.assert_allclose(got.sum(-1), 1.0, atol=1e-12)
        np.testing.assert_allclose(attention_rollout(tiny64, images)[b].numpy(), direct[0, 1:].reshape(4, 6), atol=1e-12)


def test_gradcam_matches_a_manual_gradcam(tiny64):
    lm = tiny64
    images = make_images(lm.visual, 2, seed=6)
    texts = _texts(24, 3, seed=7)
    targets = [1, 0]  # (texts[2] scores <= 0 at every patch of this random model: an all-zero map)
    got = gradcam_maps(lm, images, texts, targets)
    assert got.shape == (2, 4, 6)
    # manual: gradient of the cosine w.r.t. the last block's ln_1 output, channel weights =
    # mean gradient over patches, ReLU of the weighted sum, min-max per image
    acts = {}
    h = lm.visual.transformer.resblocks[-1].ln_1.register_forward_hook(lambda m, i, o: acts.setdefault("a", o))
    try:
        x = images.clone().requires_grad_(True)
        emb = F.normalize(lm.visual(x), dim=-1)
        a = acts["a"]
        score = sum(emb[b] @ texts[t] for b, t in enumerate(targets))
        (grad,) = torch.autograd.grad(score, a)
    finally:
        h.remove()
    a, grad = a[:, 1:].detach(), grad[:, 1:]
    cam = torch.relu((a * grad.mean(1, keepdim=True)).sum(-1)).reshape(2, 4, 6)
    lo = cam.flatten(1).min(1).values.view(2, 1, 1)
    cam = cam - lo
    cam = cam / (1e-7 + cam.flatten(1).max(1).values.view(2, 1, 1))
    assert torch.allclose(got.double(), cam, atol=2e-4)  # pytorch-grad-cam works in float32
    assert (got.flatten(1).max(1).values > 0.99).all()  # neither map is degenerate (all zero)
    assert torch.allclose(gradcam_maps(lm, images.flip(0), texts, targets[::-1]), got.flip(0), atol=1e-6)
    assert all(p.grad is None for p in lm.visual.parameters())  # nothing left behind on the model
    with pytest.raises(InputError):
        gradcam_maps(lm, images, texts, [0])


# ----------------------------------------------------------------------------- overlay


def test_overlay_blends_colormap_over_image(tmp_path):
    img = Image.fromarray(np.full((8, 12, 3), 100, np.uint8))
    hm = torch.linspace(0, 1, 12).repeat(8, 1)
    assert np.array_equal(np.asarray(render_overlay(img, hm, alpha=0.0)), np.asarray(img))
    full = np.asarray(render_overlay(img, hm, alpha=1.0, cmap="viridis"))
    assert np.array_equal(full, colorize(hm, "viridis"))
    assert not np.array_equal(full[:, 0], full[:, -1])  # left and right ends differ in colour
    half = np.asarray(render_overlay(img, hm, alpha=0.5, cmap="viridis")).astype(int)
    assert np.abs(half - (100 + full.astype(int)) / 2).max() <= 1
    with_bar = render_overlay(img.resize((96, 64)), hm, colorbar=True)
    assert with_bar.height == 64 and with_bar.width > 96
    with pytest.raises(InputError):
        render_overlay(img, hm, cmap="no-such-map")
    path = tmp_path / "sub" / "o.png"
    save_png(with_bar, path)
    assert Image.open(path).size == with_bar.size
    assert [p.name for p in path.parent.iterdir()] == ["o.png"]  # no temporary file left


def test_image_grid_layout():
    ims = [Image.new("RGB", (10, 10), c) for c in ("red", "green", "blue")]
    g = image_grid(ims, ncols=2, cell=10, pad=2)
    assert g.size == (2 * 10 + 3 * 2, 2 * 10 + 3 * 2)
    assert g.getpixel((2, 2)) == (255, 0, 0) and g.getpixel((14, 2)) == (0, 128, 0)
    assert g.getpixel((2, 14)) == (0, 0, 255) and g.getpixel((14, 14)) == (255, 255, 255)
