"""The decomposition is exact and its views are mutually consistent, on random-init
real open_clip architectures with perturbed norms and biases."""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from conftest import build_visual, make_images, perturb_, rel_err

from clipdecomp.decomposition import Decomposition, decompose
from clipdecomp.errors import ClipDecompError, InputError, UnsupportedModelError
from clipdecomp.loading import SUPPORTED_MODELS_DESCRIPTION, check_model_config, check_vision_tower, unsupported_reason


def check_consistency(dec: Decomposition, ref: torch.Tensor, tol: float, n_texts: int = 5) -> None:
    """Every identity the Decomposition promises, against ``ref = encode_image``."""
    assert rel_err(dec.total(), ref) <= tol
    parts = dec.embed + dec.mlps.sum(1) + dec.heads.sum((1, 2))
    assert rel_err(parts, dec.total()) <= tol
    for l in dec.token_layers:
        assert rel_err(dec.head_tokens(l).sum(1), dec.heads[:, l]) <= tol
    if dec.token_layers:
        tok = sum(dec.head_tokens(l).sum(2) for l in dec.token_layers)
        assert rel_err(dec.tokens(), tok) <= tol
        assert rel_err(dec.tokens([dec.token_layers[-1]]).sum(1), dec.heads[:, dec.token_layers[-1]].sum(1)) <= tol
    g = torch.Generator().manual_seed(1)
    texts = torch.randn(n_texts, dec.embed_dim, generator=g).to(dec.dtype)
    assert rel_err(dec.head_scores(texts), dec.heads @ texts.T) <= tol
    assert rel_err(dec.mlp_scores(texts), dec.mlps @ texts.T) <= tol
    assert rel_err(dec.embed_scores(texts), dec.embed @ texts.T) <= tol
    assert rel_err(dec.total_scores(texts), ref @ texts.T) <= tol
    if dec.token_layers:
        explicit = torch.stack([dec.head_tokens(l) for l in dec.token_layers], 1) @ texts.T
        assert rel_err(dec.head_token_scores(texts), explicit) <= tol
        assert rel_err(dec.token_scores(texts), dec.tokens() @ texts.T) <= tol
    # normalised embedding
    unit = ref / ref.norm(dim=-1, keepdim=True)
    assert rel_err(dec.normalized(dec.total()), unit) <= tol
    assert torch.allclose(dec.norm, ref.norm(dim=-1), rtol=tol)


# ------------------------------------------------------------------------- exactness


def test_tiny_float64_exact(tiny64):
    visual = tiny64.clip.visual
    x = make_images(visual, 3)
    dec = decompose(tiny64, x)
    ref = tiny64.clip.encode_image(x)
    check_consistency(dec, ref, 1e-10)
    assert dec.dtype == torch.float64


def test_tiny_float32_exact(tiny):
    x = make_images(tiny.clip.visual, 4)
    with torch.no_grad():
        ref = tiny.clip.encode_image(x)
    check_consistency(decompose(tiny, x), ref, 1e-4)


def test_custom_attention_blocks_float64(tiny_custom64):
    """open_clip's CustomResidualAttentionBlock with qk_norm, scale_heads, scale_fc and layer scale."""
    from open_clip.transformer import CustomResidualAttentionBlock

    visual = tiny_custom64.clip.visual
    assert all(type(b) is CustomResidualAttentionBlock for b in visual.transformer.resblocks)
    assert visual.transformer.resblocks[0].attn.head_scale is not None
    x = make_images(visual, 2)
    check_consistency(decompose(tiny_custom64, x), tiny_custom64.clip.encode_image(x), 1e-10)


def test_vit_b16_float32_encode_image(vit_b16):
    x = make_images(vit_b16.clip.visual, 2)
    with torch.no_grad():
        ref = vit_b16.clip.encode_image(x)
    dec = decompose(vit_b16, x, token_layers=[-2, -1])
    assert dec.token_layers == (10, 11)
    check_consistency(dec, ref, 1e-4)


def test_vit_b16_float64(vit_b16_visual64):
    x = make_images(vit_b16_visual64, 1)
    with torch.no_grad():
        ref = vit_b16_visual64(x)
    dec = decompose(vit_b16_visual64, x, token_layers=[11])
    check_consistency(dec, ref, 1e-10, n_texts=3)
    assert (dec.layers, dec.n_heads, dec.n_tokens, dec.grid, dec.embed_dim) == (12, 12, 197, (14, 14), 512)


def test_vit_b32_quickgelu():
    visual = build_visual("ViT-B-32-quickgelu", torch.float32)
    assert type(visual.transformer.resblocks[0].mlp.gelu).__name__ == "QuickGELU"
    x = make_images(visual, 2)
    with torch.no_grad():
        ref = visual(x)
    check_consistency(decompose(visual, x, token_layers=[-1]), ref, 1e-4)
    visual, x = visual.double(), x[:1].double()
    with torch.no_grad():
        ref = visual(x)
    check_consistency(decompose(visual, x, token_layers=[-1]), ref, 1e-10, n_texts=3)


def test_bfloat16_model_close(tiny_configs):
    """Half-precision towers run in their dtype; the readout is done in float32."""
    from conftest import TINY, _load_random

    lm = _load_random(TINY, torch.bfloat16)
    x = make_images(lm.clip.visual, 2, dtype=torch.float32)
    dec = decompose(lm, x)
    with torch.no_grad():
        ref = lm.clip.encode_image(x.to(torch.bfloat16)).float()
    assert dec.dtype == torch.float32
    assert rel_err(dec.total(), ref) < 5e-2
    assert rel_err(dec.embed + dec.mlps.sum(1) + dec.heads.sum((1, 2)), dec.total()) < 1e-5


@pytest.mark.parametrize(
    "flags",
    [
        {"ls_init_value": 0.5},
        {"no_ln_pre": True, "final_ln_after_pool": True},
        {"pos_embed_type": "sin_cos_2d", "patch_dropout": 0.5},
        {"output_tokens": True, "layers": 1},
        {"qk_norm": True},
    ],
    ids=lambda f: ",".join(f),
)
def test_tower_options_float64(flags):
    """Config options of open_clip's VisionTransformer that keep the decomposition exact."""
    from open_clip.model import _build_vision_tower

    vcfg = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 2, "head_width": 8, **flags}
    torch.manual_seed(0)
    visual = perturb_(_build_vision_tower(16, vcfg, quick_gelu=True)).double().eval()
    x = make_images(visual, 2)
    with torch.no_grad():
        ref = visual(x)
    ref = ref[0] if isinstance(ref, tuple) else ref
    check_consistency(decompose(visual, x), ref, 1e-10)


# ------------------------------------------------------------------------- shapes and metadata


def test_shapes_and_metadata(tiny64):
    x = make_images(tiny64.clip.visual, 2)
    dec = decompose(tiny64, x, token_layers=[-1, 0, 0])
    B, L, H, N, D = 2, 3, 4, 25, 24
    assert (dec.batch_size, dec.layers, dec.n_heads, dec.n_tokens, dec.embed_dim) == (B, L, H, N, D)
    assert dec.grid == (4, 6) and dec.head_dim == 16 and dec.width == 64
    assert dec.token_layers == (0, 2)
    assert dec.n_terms == 1 + L + L * H
    assert dec.embed.shape == (B, D) and dec.mlps.shape == (B, L, D) and dec.heads.shape == (B, L, H, D)
    assert dec.head_tokens(2).shape == (B, N, H, D) and dec.tokens().shape == (B, N, D)
    t = torch.randn(7, D, dtype=torch.float64)
    assert dec.head_scores(t).shape == (B, L, H, 7)
    assert dec.head_token_scores(t).shape == (B, 2, N, H, 7)
    assert dec.head_token_scores(t, layers=[-1]).shape == (B, 1, N, H, 7)
    assert dec.token_scores(t).shape == (B, N, 7)
    assert dec.class_attention.shape == (B, L, H, N)
    assert torch.allclose(dec.class_attention.sum(-1), torch.ones(B, L, H, dtype=torch.float64))
    assert dec.effective_weights(1).shape == (H, 16, D)
    assert "Decomposition(" in repr(dec)


def test_head_only_mode_matches_full(tiny64):
    x = make_images(tiny64.clip.visual, 2)
    a = decompose(tiny64, x, token_layers=None)
    b = decompose(tiny64, x, token_layers="all")
    assert a.token_layers == () and b.token_layers == (0, 1, 2)
    assert torch.equal(a.heads, b.heads) and torch.equal(a.total(), b.total())
    with pytest.raises(InputError, match="no token-level data"):
        a.head_tokens(0)


def test_normalized_parts_sum_to_unit_embedding(tiny64):
    x = make_images(tiny64.clip.visual, 2)
    dec = decompose(tiny64, x)
    s = dec.normalized(dec.embed) + dec.normalized(dec.mlps).sum(1) + dec.normalized(dec.heads).sum((1, 2))
    assert rel_err(s, tiny64.clip.encode_image(x, normalize=True)) < 1e-10
    assert torch.allclose(dec.normalized(dec.total()).norm(dim=-1), torch.ones(2, dtype=torch.float64))


def test_batch_independence(tiny64):
    """Each image's decomposition does not depend on the rest of the batch."""
    x = make_images(tiny64.clip.visual, 3)
    full = decompose(tiny64, x)
    one = decompose(tiny64, x[1:2])
    assert rel_err(one.heads[0], full.heads[1]) < 1e-12
    assert rel_err(one.head_tokens(1)[0], full.head_tokens(1)[1]) < 1e-12


# ------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda x: x[:, :, :16], r"expects \(32, 48\)"),
        (lambda x: x[:, :1], "3 channels"),
        (lambda x: x[0], "add a batch dimension"),
        (lambda x: x[:0], "empty batch"),
        (lambda x: (x * 100).to(torch.uint8), "floating point"),
        (lambda x: x.numpy(), "torch.Tensor"),
        (lambda x: torch.full_like(x, float("nan")), "NaN"),
    ],
)
def test_bad_images(tiny, make, match):
    x = make_images(tiny.clip.visual, 2)
    with pytest.raises(InputError, match=match):
        decompose(tiny, make(x))


def test_bad_token_layers_and_texts(tiny):
    x = make_images(tiny.clip.visual, 1)
    for bad in (3, "last", [5], [True], [1.0]):
        with pytest.raises(InputError, match="token_layers"):
            decompose(tiny, x, token_layers=bad)
    dec = decompose(tiny, x, token_layers=[2])
    with pytest.raises(InputError, match=r"token_layers=\[2\]"):
        dec.head_tokens(0)
    with pytest.raises(InputError, match="out of range"):
        dec.effective_weights(3)
    with pytest.raises(InputError, match=r"\[T, 24\]"):
        dec.head_scores(torch.randn(5, 23))
    with pytest.raises(InputError, match=r"\[T, 24\]"):
        dec.token_scores(torch.randn(24))
    with pytest.raises(InputError, match="B=1"):
        dec.normalized(torch.randn(2, 24))


def test_training_mode_refused(tiny_configs):
    from conftest import TINY, _load_random

    lm = _load_random(TINY)
    lm.clip.train()
    with pytest.raises(InputError, match="eval"):
        decompose(lm, make_images(lm.clip.visual, 1))


def test_unsupported_tower_refused():
    from open_clip.model import _build_vision_tower

    rn = _build_vision_tower(16, {"layers": [1, 1, 1, 1], "width": 8, "image_size": 64, "head_width": 8}).eval()
    with pytest.raises(UnsupportedModelError, match="OpenCLIP ViT image towers with class-token pooling"):
        decompose(rn, torch.randn(1, 3, 64, 64))
    with pytest.raises(UnsupportedModelError, match="no image tower"):
        decompose(torch.nn.Linear(2, 2), torch.randn(1, 3, 64, 64))


# ------------------------------------------------------------------------- the whole registry

_SMALL_WIDTH, _SMALL_LAYERS = 768, 12


def _family_refusal(cfg: dict) -> bool:
    """Independent statement of which registry families must be refused."""
    v = cfg["vision_cfg"]
    return bool(
        v.get("timm_model_name")
        or isinstance(v.get("layers"), list)
        or "multimodal_cfg" in cfg
        or v.get("attentional_pool")
        or v.get("pool_type", "tok") != "tok"
    )


def _code_path(cfg: dict) -> str:
    """What changes the tower's code path (not its sizes)."""
    v = cfg["vision_cfg"]
    keys = ("ls_init_value", "no_ln_pre", "pos_embed_type", "final_ln_after_pool", "block_type", "qk_norm",
            "scale_heads", "scale_fc", "output_tokens", "act_kwargs", "norm_kwargs")
    return json.dumps([cfg.get("quick_gelu", False)] + [v.get(k) is not None and v.get(k) is not False for k in keys])


def test_every_registry_config_is_decided():
    """Every open_clip config is supported or refused with the clear error, decided from the
    config. Every tower that needs no extra package (not timm) is also built on the meta
    device (no memory, no weights) to confirm the decision structurally; the cheapest small
    supported tower of each code path is built for real (random init) and decomposed at
    batch 1 in float32."""
    from open_clip.model import _build_vision_tower

    from clipdecomp.registry import MODEL_CONFIG_DIR

    own_configs = {p.stem for p in MODEL_CONFIG_DIR.glob("*.json")}

    names = open_clip.list_models()
    assert len(names) > 100
    supported, refused, sample = [], [], {}
    for name in names:
        cfg = open_clip.get_model_config(name)
        reason = unsupported_reason(cfg)
        assert (reason is not None) == _family_refusal(cfg), (name, reason)
        if reason is None:
            supported.append(name)
            check_model_config(cfg, name)
        else:
            refused.append(name)
            with pytest.raises(UnsupportedModelError) as ei:
                check_model_config(cfg, name)
            assert name in str(ei.value) and SUPPORTED_MODELS_DESCRIPTION in str(ei.value)
        v = cfg["vision_cfg"]
        if v.get("timm_model_name"):
            continue
        with torch.device("meta"):
            tower = _build_vision_tower(cfg["embed_dim"], v, cfg.get("quick_gelu", False))
        plain_coca = "multimodal_cfg" in cfg and not v.get("attentional_pool")  # refused at model level
        if reason is None or plain_coca:
            check_vision_tower(tower)
        else:
            with pytest.raises(UnsupportedModelError, match="Supported: OpenCLIP ViT"):
                check_vision_tower(tower)
        if name.startswith("cdtest-") or name in own_configs:
            continue  # this suite's and clipdecomp's own configs (registered or not, depending on test order)
        if reason is None and v.get("width", 768) <= _SMALL_WIDTH and v.get("layers", 12) <= _SMALL_LAYERS:
            hw = v["image_size"] if isinstance(v["image_size"], list) else [v["image_size"]] * 2
            n_tok = (hw[0] // v["patch_size"]) * (hw[1] // v["patch_size"]) + 1
            cost = v.get("width", 768) ** 2 * v.get("layers", 12) * n_tok
            best = sample.get(_code_path(cfg))
            if best is None or cost < best[0]:
                sample[_code_path(cfg)] = (cost, name)
    for s in ("ViT-B-16", "ViT-B-32", "ViT-L-14", "ViT-H-14", "ViT-bigG-14", "ViT-M-16-alt", "mt5-base-ViT-B-32"):
        assert s in supported
    for r in ("RN50", "ViT-H-14-CLIPA", "coca_ViT-B-32", "coca_base", "EVA02-B-16", "ViT-B-16-SigLIP", "convnext_base"):
        assert r in refused

    picked = sorted(name for _, name in sample.values())
    assert {"ViT-S-32", "ViT-M-16-alt"} <= set(picked)  # plain and layer-scale towers
    assert any("quickgelu" in n or "roberta" in n for n in picked)
    for name in picked:
        visual = build_visual(name)
        x = make_images(visual, 1)
        with torch.no_grad():
            ref = visual(x)
        dec = decompose(visual, x, token_layers=None)
        assert rel_err(dec.total(), ref) <= 1e-4, name
        assert rel_err(dec.embed + dec.mlps.sum(1) + dec.heads.sum((1, 2)), ref) <= 1e-4, name
        del visual, dec


@pytest.mark.parametrize(
    "flag,match",
    [("scale_attn", "ln_attn"), ("scale_attn_inner", "before out_proj"), ("scaled_cosine_attn", "cosine")],
)
def test_inexact_attention_variants_refused(flag, match):
    from open_clip.model import _build_vision_tower

    vcfg = {"image_size": 32, "patch_size": 8, "width": 32, "layers": 1, "head_width": 16, flag: True}
    with pytest.raises(UnsupportedModelError, match=match):
        check_model_config({"embed_dim": 8, "vision_cfg": vcfg, "text_cfg": {}}, "x")
    visual = perturb_(_build_vision_tower(8, vcfg)).eval()
    with pytest.raises(ClipDecompError, match="Supported"):
        decompose(visual, torch.randn(1, 3, 32, 32))
