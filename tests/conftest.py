"""Shared fixtures: tiny registered open_clip configs, randomly initialised real
architectures with perturbed norms / biases (so the decomposition identity is not
trivially satisfied), and image batches. Everything is random-init: no downloads.

Tests run torch on one intra-op thread (override with ``CLIPDECOMP_TEST_THREADS``): on a
2-core machine shared with a training job, OpenMP threads spinning against the other
process made the suite 10-20x slower than single-threaded."""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path
from typing import Optional

import open_clip
import pytest
import torch
from torch import nn

torch.set_num_threads(int(os.environ.get("CLIPDECOMP_TEST_THREADS", "1")))

TINY = "cdtest-tiny-vit"
TINY_CUSTOM = "cdtest-tiny-custom"

_TEXT = {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
TINY_CFG = {
    "embed_dim": 24,
    # non-square input: grid (4, 6), 25 tokens
    "vision_cfg": {"image_size": [32, 48], "patch_size": 8, "width": 64, "layers": 3, "head_width": 16},
    "text_cfg": _TEXT,
}
TINY_CUSTOM_CFG = {
    "embed_dim": 24,
    # open_clip's CustomResidualAttentionBlock / Attention: qk_norm, per-head scale, MLP norm, layer scale
    "vision_cfg": {
        "image_size": 32,
        "patch_size": 8,
        "width": 48,
        "layers": 2,
        "head_width": 16,
        "qk_norm": True,
        "scale_heads": True,
        "scale_fc": True,
        "ls_init_value": 0.5,
    },
    "text_cfg": _TEXT,
    "quick_gelu": True,
}


@pytest.fixture(scope="session")
def tiny_configs(tmp_path_factory) -> dict[str, dict]:
    """Register the tiny configs with open_clip (``open_clip.add_model_config``)."""
    d = tmp_path_factory.mktemp("model_configs")
    cfgs = {TINY: TINY_CFG, TINY_CUSTOM: TINY_CUSTOM_CFG}
    for name, cfg in cfgs.items():
        (d / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d)
    return cfgs


def perturb_(module: nn.Module, seed: int = 0) -> nn.Module:
    """Randomise LayerNorm gains/biases, linear / attention biases, layer scales, head
    scales and the class embedding in place (open_clip initialises many to 1 / 0)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(t: torch.Tensor, mean: float, std: float) -> torch.Tensor:
        return (mean + std * torch.randn(t.shape, generator=g)).to(t.dtype)

    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.LayerNorm) and m.weight is not None:
                m.weight.copy_(rnd(m.weight, 1.0, 0.5))
                m.bias.copy_(rnd(m.bias, 0.0, 0.5))
            elif isinstance(m, nn.Linear) and m.bias is not None:
                m.bias.copy_(rnd(m.bias, 0.0, 0.2))
            if getattr(m, "in_proj_bias", None) is not None:
                m.in_proj_bias.copy_(rnd(m.in_proj_bias, 0.0, 0.2))
            if getattr(m, "head_scale", None) is not None:
                m.head_scale.copy_(rnd(m.head_scale, 1.0, 0.3))
            if type(m).__name__ == "LayerScale":
                m.gamma.copy_(rnd(m.gamma, 1.0, 0.3))
            if getattr(m, "class_embedding", None) is not None:
                m.class_embedding.add_(rnd(m.class_embedding, 0.0, 0.5))
    return module


def make_images(visual: nn.Module, batch: int, seed: int = 0, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
    """A random 'preprocessed' batch ``[B, 3, H, W]`` for ``visual``."""
    g = torch.Generator().manual_seed(seed)
    h, w = visual.image_size
    return torch.randn(batch, 3, h, w, generator=g).to(dtype or visual.conv1.weight.dtype)


def build_visual(name: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Only the image tower of a registry architecture, random init, perturbed, eval."""
    from open_clip.model import _build_vision_tower

    cfg = open_clip.get_model_config(name)
    torch.manual_seed(seed)
    visual = _build_vision_tower(cfg["embed_dim"], cfg["vision_cfg"], cfg.get("quick_gelu", False))
    return perturb_(visual, seed).to(dtype).eval()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach(), b.detach()
    return float((a - b).norm() / b.norm())


def _load_random(name: str, dtype: torch.dtype = torch.float32):
    from clipdecomp.loading import load_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        torch.manual_seed(0)
        lm = load_model(name, dtype=dtype)
    perturb_(lm.clip.visual)
    return lm


@pytest.fixture(scope="session")
def tiny(tiny_configs):
    """Tiny MultiheadAttention ViT (3 layers, 4 heads, grid 4x6), float32."""
    return _load_random(TINY)


@pytest.fixture(scope="session")
def tiny64(tiny_configs):
    return _load_random(TINY, torch.float64)


@pytest.fixture(scope="session")
def tiny_custom64(tiny_configs):
    """Tiny ViT with open_clip's custom Attention blocks (qk_norm, scale_heads, scale_fc, layer scale), float64."""
    return _load_random(TINY_CUSTOM, torch.float64)


@pytest.fixture(scope="session")
def vit_b16():
    """Full random-init ViT-B-16 CLIP (float32), perturbed."""
    return _load_random("ViT-B-16")


@pytest.fixture(scope="session")
def vit_b16_visual64(vit_b16):
    """float64 copy of the ViT-B-16 image tower."""
    return copy.deepcopy(vit_b16.clip.visual).to(torch.float64).eval()


@pytest.fixture
def assets_env(tmp_path, monkeypatch) -> Path:
    """Point ``CLIPDECOMP_ASSETS`` at an empty temporary folder."""
    d = tmp_path / "assets"
    d.mkdir()
    monkeypatch.setenv("CLIPDECOMP_ASSETS", str(d))
    return d
