"""clipdecomp: exact text-based decomposition of CLIP-ViT image representations."""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

# Public API, imported lazily (PEP 562) so `import clipdecomp` stays cheap and does not
# pull in torch / open_clip until a name is used.
_EXPORTS = {
    # errors
    "ClipDecompError": "errors",
    "UnsupportedModelError": "errors",
    "UnknownModelError": "errors",
    "CheckpointError": "errors",
    "InputError": "errors",
    "MissingDependencyError": "errors",
    "StoreError": "errors",
    # loading
    "LoadedModel": "loading",
    "load_model": "loading",
    "BUNDLED_MODEL_DIR": "loading",
    "bundled_model_dir": "loading",
    "check_model_config": "loading",
    "check_vision_tower": "loading",
    "unsupported_reason": "loading",
    # decomposition
    "Decomposition": "decomposition",
    "decompose": "decomposition",
    # ablation
    "PartMeans": "ablation",
    "compute_means": "ablation",
    "ablated_embedding": "ablation",
    # streaming
    "decompose_to_disk": "streaming",
    "DecompositionStore": "streaming",
    # zero-shot
    "text_embeddings": "zeroshot",
    "zero_shot_classifier": "zeroshot",
    "predict": "zeroshot",
    "accuracy": "zeroshot",
    "IMAGENET_CLASSNAMES": "zeroshot",
    "OPENAI_IMAGENET_TEMPLATES": "zeroshot",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'clipdecomp' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
