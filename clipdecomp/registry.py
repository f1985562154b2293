"""Model configs that ship with clipdecomp, registered with open_clip's own registry.

The toy model is a stock open_clip `CLIP` described by a JSON config, exactly
like `ViT-B-16`: registering the folder makes `open_clip.create_model("toyclip-vit")`
work, so every code path that serves a real model serves the toy model unchanged.
"""

from __future__ import annotations

from pathlib import Path

import open_clip

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
TOY_MODEL_NAME = "toyclip-vit"

_registered = False


def register_model_configs() -> None:
    """Add clipdecomp's model configs to open_clip's registry (idempotent)."""
    global _registered
    if not _registered:
        open_clip.add_model_config(MODEL_CONFIG_DIR)
        _registered = True
