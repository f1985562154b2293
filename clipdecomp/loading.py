"""Loading stock open_clip models, and deciding which ones can be decomposed.

The decomposition (see :mod:`clipdecomp.decomposition`) is exact only for image
towers whose output is ``ln_post(residual at the class token) @ proj``, with a
residual stream written by multi-head attention layers whose per-head outputs are
*linear* in the values. :func:`load_model` therefore checks the architecture
twice: on the JSON config before anything is instantiated
(:func:`check_model_config`), and on the instantiated modules
(:func:`check_vision_tower`).

Accepted sources (``load_model(name, pretrained)``):

* ``name=None``: the bundled default model, ``local-dir:`` of
  :func:`bundled_model_dir` (``$CLIPDECOMP_ASSETS/toyclip`` or ``<repo>/assets/toyclip``).
* an open_clip architecture name from ``open_clip.list_models()`` and

  - a pretrained tag from ``open_clip.list_pretrained_tags_by_model(name)``
    (downloaded by open_clip),
  - a path to a ``.safetensors`` file, or to a ``.pt`` / ``.pth`` / ``.bin`` file that
    loads with ``torch.load(..., weights_only=True)`` (a state dict, or
    ``{"state_dict": ...}``; a ``module.`` prefix is stripped), loaded strictly,
  - ``None``: random initialisation (a warning is emitted).
* ``hf-hub:org/repo``: config and weights from the Hugging Face Hub (open_clip).
* ``local-dir:PATH``: a folder with ``open_clip_config.json`` and a weights file.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib.util
import json
import logging
import os
import pickle
import warnings
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Optional, Union

import open_clip
import torch
from open_clip.model import CLIPVisionCfg
from open_clip.transformer import (
    Attention,
    CustomResidualAttentionBlock,
    LayerScale,
    ResidualAttentionBlock,
    VisionTransformer,
)
from torch import nn

from .errors import (
    CheckpointError,
    InputError,
    MissingDependencyError,
    UnknownModelError,
    UnsupportedModelError,
)

__all__ = [
    "ASSETS_ENV_VAR",
    "BUNDLED_MODEL_DIR",
    "SUPPORTED_MODELS_DESCRIPTION",
    "LoadedModel",
    "assets_dir",
    "bundled_model_dir",
    "check_model_config",
    "check_vision_tower",
    "load_model",
    "read_state_dict",
    "unsupported_reason",
    "vision_tower",
]

log = logging.getLogger(__name__)

ASSETS_ENV_VAR = "CLIPDECOMP_ASSETS"
_BUNDLED_SUBDIR = "toyclip"
_CONFIG_FILE = "open_clip_config.json"
_SAFETENSORS_SUFFIXES = (".safetensors",)
_PICKLE_SUFFIXES = (".pt", ".pth", ".bin")
_ACCEPTED_FILES = (
    "a .safetensors file, or a .pt/.pth/.bin file loadable with torch.load(weights_only=True) "
    "holding a state dict or {'state_dict': ...}"
)
# Same preference as open_clip's local-dir loader.
_LOCAL_DIR_PREFERENCE = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "open_clip_pytorch_model.bin",
    "open_clip_pytorch_model.pth",
    "model.safetensors",
    "pytorch_model.bin",
    "pytorch_model.pth",
    "model.pth",
)

SUPPORTED_MODELS_DESCRIPTION = (
    "OpenCLIP ViT image towers with class-token pooling: open_clip's VisionTransformer with "
    "pool_type='tok' and no attentional pooler, built from ResidualAttentionBlock "
    "(nn.MultiheadAttention) or CustomResidualAttentionBlock (open_clip Attention, optionally with "
    "qk_norm / scale_heads / scale_fc), layer scale allowed; e.g. ViT-B-32, ViT-B-16, ViT-L-14, "
    "ViT-H-14, ViT-bigG-14 and their -quickgelu / -worldwide / -alt variants"
)

_DTYPE_TO_PRECISION = {
    torch.float32: "fp32",
    torch.float64: "fp32",  # instantiated in fp32, then cast
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
}


def assets_dir() -> Path:
    """Folder of bundled assets: ``$CLIPDECOMP_ASSETS`` if set, else ``<repo>/assets``."""
    env = os.environ.get(ASSETS_ENV_VAR)
    if env:
        return Path(env).expanduser().resolve()
    return Path(__file__).resolve().parent.parent / "assets"


def bundled_model_dir() -> Path:
    """Folder of the bundled default model, resolved now (honours a changed env var)."""
    return assets_dir() / _BUNDLED_SUBDIR


#: Folder of the bundled default model as resolved at import time.
BUNDLED_MODEL_DIR: Path = bundled_model_dir()


@dataclass
class LoadedModel:
    """A stock open_clip model ready for decomposition.

    Attributes:
        clip: the open_clip model (``CLIP`` or ``CustomTextCLIP``), in eval mode.
        preprocess: the evaluation image transform (PIL image -> ``[3, H, W]`` tensor).
        tokenizer: the open_clip tokenizer (list of str -> ``[T, context_length]`` ids).
        name: the architecture name or ``hf-hub:`` / ``local-dir:`` identifier.
        pretrained: the pretrained tag or weights path, ``None`` for random weights.
    """

    clip: nn.Module
    preprocess: Callable[[Any], torch.Tensor]
    tokenizer: Callable[..., torch.Tensor]
    name: str
    pretrained: Optional[str]

    @property
    def visual(self) -> VisionTransformer:
        """The image tower (an open_clip ``VisionTransformer``)."""
        return self.clip.visual

    @property
    def image_size(self) -> tuple[int, int]:
        """Expected input ``(H, W)`` of preprocessed images."""
        return tuple(self.clip.visual.image_size)

    @property
    def dtype(self) -> torch.dtype:
        return self.clip.visual.conv1.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.clip.visual.conv1.weight.device


# ----------------------------------------------------------------------------------------
# Architecture checks
# ----------------------------------------------------------------------------------------

_VISION_CFG_KEYS = {f.name for f in fields(CLIPVisionCfg)}


def unsupported_reason(model_cfg: Mapping[str, Any]) -> Optional[str]:
    """Why an open_clip model config cannot be decomposed, or ``None`` if it can.

    Decides from the config alone (no instantiation): ResNet towers, timm / Hugging Face
    trunks, attentional pooling and CoCa, non class-token pooling, and attention
    variants that put a LayerNorm between the heads and the residual stream or that
    open_clip itself cannot run are refused.
    """
    if not isinstance(model_cfg, Mapping) or "vision_cfg" not in model_cfg:
        return "the config has no 'vision_cfg' section (not an open_clip CLIP config)"
    if "multimodal_cfg" in model_cfg:
        return "CoCa models (config has 'multimodal_cfg') are not supported"
    vcfg = model_cfg["vision_cfg"]
    if not isinstance(vcfg, Mapping):
        return "'vision_cfg' is not a mapping"
    if vcfg.get("timm_model_name"):
        return f"the image tower is a timm trunk ({vcfg['timm_model_name']!r})"
    hf_keys = sorted(k for k in vcfg if str(k).startswith("hf_"))
    if hf_keys:
        return f"the image tower is a Hugging Face trunk ({', '.join(hf_keys)})"
    if isinstance(vcfg.get("layers", 12), (list, tuple)):
        return "the image tower is a ModifiedResNet (vision_cfg.layers is a list)"
    unknown = sorted(set(vcfg) - _VISION_CFG_KEYS)
    if unknown:
        return f"vision_cfg has keys this open_clip version does not know: {unknown}"
    if vcfg.get("attentional_pool"):
        return "the image tower uses an attentional pooler (attentional_pool)"
    pool = vcfg.get("pool_type", "tok")
    if pool != "tok":
        return f"pool_type={pool!r}; only class-token pooling ('tok') is decomposed"
    if vcfg.get("scaled_cosine_attn"):
        return "scaled cosine attention (scaled_cosine_attn) is not supported (open_clip's own forward fails on it)"
    if vcfg.get("scale_attn_inner"):
        return "scale_attn_inner puts a LayerNorm across heads before out_proj; not decomposed"
    if vcfg.get("scale_attn"):
        return "scale_attn puts a LayerNorm after the attention output (ln_attn); not decomposed"
    block_type = vcfg.get("block_type")
    if block_type not in (None, "default", "custom"):
        return f"unknown block_type={block_type!r}"
    return None


def check_model_config(model_cfg: Mapping[str, Any], name: str = "model") -> None:
    """Raise :class:`UnsupportedModelError` if ``model_cfg`` cannot be decomposed."""
    reason = unsupported_reason(model_cfg)
    if reason is not None:
        raise UnsupportedModelError(
            f"{name}: {reason}. Supported: {SUPPORTED_MODELS_DESCRIPTION}."
        )


def _refuse(what: str) -> UnsupportedModelError:
    return UnsupportedModelError(f"{what}. Supported: {SUPPORTED_MODELS_DESCRIPTION}.")


def _check_block(i: int, blk: nn.Module) -> None:
    if type(blk) is ResidualAttentionBlock:
        attn = blk.attn
        if type(attn) is not nn.MultiheadAttention:
            raise _refuse(f"block {i}: attention is {type(attn).__name__}, expected nn.MultiheadAttention")
        if not attn._qkv_same_embed_dim or attn.in_proj_weight is None:
            raise _refuse(f"block {i}: nn.MultiheadAttention with separate q/k/v projections")
        if attn.bias_k is not None or attn.add_zero_attn:
            raise _refuse(f"block {i}: nn.MultiheadAttention with add_bias_kv / add_zero_attn")
        if hasattr(blk, "ln_1_kv"):
            raise _refuse(f"block {i}: cross-attention block")
    elif type(blk) is CustomResidualAttentionBlock:
        attn = blk.attn
        if type(attn) is not Attention:
            raise _refuse(f"block {i}: attention is {type(attn).__name__}, expected open_clip Attention")
        if attn.logit_scale is not None:
            raise _refuse(f"block {i}: scaled cosine attention")
        if not isinstance(attn.ln_inner, nn.Identity):
            raise _refuse(f"block {i}: LayerNorm across heads before out_proj (scale_attn_inner)")
        if not isinstance(blk.ln_attn, nn.Identity):
            raise _refuse(f"block {i}: LayerNorm after the attention output (scale_attn / ln_attn)")
    else:
        raise _refuse(f"block {i} is a {type(blk).__name__}")
    if not isinstance(blk.ls_1, (nn.Identity, LayerScale)):
        raise _refuse(f"block {i}: ls_1 is {type(blk.ls_1).__name__}, expected LayerScale or Identity")


def check_vision_tower(visual: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` unless ``visual`` is decomposable exactly.

    Checks that ``visual`` is exactly open_clip's ``VisionTransformer`` (not a subclass,
    whose forward could differ) with class-token pooling, no attentional pooler, a
    ``nn.LayerNorm`` ``ln_post``, and supported attention blocks.
    """
    if type(visual) is not VisionTransformer:
        raise _refuse(f"the image tower is a {type(visual).__module__}.{type(visual).__name__}")
    if getattr(visual, "attn_pool", None) is not None:
        raise _refuse("the image tower uses an attentional pooler")
    if visual.pool_type != "tok":
        raise _refuse(f"the image tower pools with pool_type={visual.pool_type!r}")
    if not isinstance(visual.ln_post, nn.LayerNorm) or tuple(visual.ln_post.normalized_shape) != (
        visual.transformer.width,
    ):
        raise _refuse("ln_post is not a LayerNorm over the width")
    if visual.proj is not None and not isinstance(visual.proj, torch.Tensor):
        raise _refuse(f"proj is a {type(visual.proj).__name__}, expected a matrix or None")
    for i, blk in enumerate(visual.transformer.resblocks):
        _check_block(i, blk)


def vision_tower(model: Any) -> VisionTransformer:
    """The checked image tower of a :class:`LoadedModel`, an open_clip CLIP model, or a
    ``VisionTransformer`` itself. Raises :class:`UnsupportedModelError` otherwise."""
    if isinstance(model, LoadedModel):
        model = model.clip
    if isinstance(model, open_clip.CoCa):
        raise _refuse("CoCa models are not supported")
    visual = model if isinstance(model, VisionTransformer) else getattr(model, "visual", None)
    if visual is None:
        raise _refuse(f"got a {type(model).__name__} with no image tower (.visual)")
    check_vision_tower(visual)
    return visual


# ----------------------------------------------------------------------------------------
# Weights files
# ----------------------------------------------------------------------------------------


def read_state_dict(path: Union[str, os.PathLike]) -> dict[str, torch.Tensor]:
    """Read a state dict from a weights file, safely.

    ``.safetensors`` files are read with ``safetensors.torch.load_file``; ``.pt`` / ``.pth`` /
    ``.bin`` only with ``torch.load(path, map_location="cpu", weights_only=True)`` (no
    arbitrary code can run). A ``{"state_dict": ...}`` wrapper and ``module.`` prefixes
    (DataParallel / DDP) are removed.

    Raises:
        CheckpointError: missing, unreadable, corrupt or unsafe file, or not a state dict.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"weights file not found: {path}. Accepted: {_ACCEPTED_FILES}.")
    if path.is_dir():
        raise CheckpointError(
            f"{path} is a folder; pass name='local-dir:{path}' for a folder with "
            f"{_CONFIG_FILE}, or a weights file. Accepted: {_ACCEPTED_FILES}."
        )
    suffix = path.suffix.lower()
    if suffix in _SAFETENSORS_SUFFIXES:
        from safetensors.torch import load_file

        try:
            obj: Any = load_file(str(path), device="cpu")
        except Exception as e:  # SafetensorError, OSError, ...
            raise CheckpointError(
                f"cannot read {path} as safetensors ({type(e).__name__}: {e}); the file is corrupt, "
                f"truncated or not a safetensors file. Accepted: {_ACCEPTED_FILES}."
            ) from e
    elif suffix in _PICKLE_SUFFIXES:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            if "Unsupported global" in str(e):
                raise CheckpointError(
                    f"{path} is not loadable with torch.load(weights_only=True): it pickles arbitrary "
                    "Python objects, which clipdecomp refuses to unpickle (that could run code). "
                    "Re-save the weights with torch.save(model.state_dict(), ...) or as .safetensors."
                ) from e
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint: the file is corrupt or not a torch.save "
                f"file. Accepted: {_ACCEPTED_FILES}."
            ) from e
        except Exception as e:  # RuntimeError from a broken zip, EOFError, ...
            raise CheckpointError(
                f"cannot read {path} as a torch checkpoint ({type(e).__name__}: "
                f"{str(e).splitlines()[0][:200]}); the file is corrupt or truncated. "
                f"Accepted: {_ACCEPTED_FILES}."
            ) from e
    else:
        raise CheckpointError(
            f"unsupported weights file type {suffix or '(no suffix)'!r} for {path}. "
            f"Accepted: {_ACCEPTED_FILES}."
        )
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(
            f"{path} holds a {type(obj).__name__}{' (empty)' if not obj else ''}, not a state dict. "
            f"Accepted: {_ACCEPTED_FILES}."
        )
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(
            f"{path} is not a state dict: entries {bad[:5]} are not str -> Tensor. Accepted: {_ACCEPTED_FILES}."
        )
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


class _DropRandomInitNotice(logging.Filter):
    """open_clip logs 'initialized randomly' when we build first and load weights after."""

    def filter(self, record: logging.LogRecord) -> bool:
        msg = record.getMessage()
        return "Model initialized randomly" not in msg and "no CLIP weights found" not in msg


@contextlib.contextmanager
def _quiet_random_init() -> Iterator[None]:
    f = _DropRandomInitNotice()
    root = logging.getLogger()
    root.addFilter(f)
    try:
        yield
    finally:
        root.removeFilter(f)


def _load_weights(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Strictly load ``state_dict`` (read from ``path``) into ``model`` (CheckpointError on mismatch)."""
    if "positional_embedding" in state_dict and not hasattr(model, "positional_embedding"):
        # Old-format CLIP checkpoint for a CustomTextCLIP architecture (as open_clip does).
        from open_clip.model import convert_to_custom_text_state_dict

        state_dict = convert_to_custom_text_state_dict(state_dict)
    own = model.state_dict()
    missing = sorted(set(own) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(own))
    mismatched = [
        f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
        for k in own
        if k in state_dict and tuple(own[k].shape) != tuple(state_dict[k].shape)
    ]
    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatches (e.g. {mismatched[:2]})")
        raise CheckpointError(
            f"weights in {path} do not match the architecture: {'; '.join(parts)}. "
            "Accepted: a full open_clip state dict (model.state_dict()) for exactly this architecture."
        )
    try:
        model.load_state_dict(state_dict, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"weights in {path} do not load into the architecture: {e}") from e


def _find_weights_in_dir(folder: Path) -> Optional[Path]:
    found = [p for pat in ("*.safetensors", "*.bin", "*.pth") for p in folder.glob(pat) if p.is_file()]
    if not found:
        return None
    by_name = {p.name: p for p in found}
    for name in _LOCAL_DIR_PREFERENCE:
        if name in by_name:
            return by_name[name]
    found.sort(key=lambda p: (p.suffix != ".safetensors", p.name))
    return found[0]


# ----------------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------------


def _read_local_dir_config(folder: Path, label: str) -> dict:
    cfg_path = folder / _CONFIG_FILE
    if not folder.is_dir():
        raise CheckpointError(f"{label}: folder not found: {folder}. Expected a folder with {_CONFIG_FILE} and weights.")
    if not cfg_path.is_file():
        raise CheckpointError(f"{label}: {cfg_path} is missing. Expected a folder with {_CONFIG_FILE} and weights.")
    try:
        with open(cfg_path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{label}: cannot parse {cfg_path}: {e}") from e
    if not isinstance(cfg, dict) or "model_cfg" not in cfg:
        raise CheckpointError(f"{label}: {cfg_path} has no 'model_cfg' entry (open_clip's format).")
    return cfg


def _check_dependencies(model_cfg: Mapping[str, Any], name: str) -> None:
    text_cfg = model_cfg.get("text_cfg", {}) or {}
    if text_cfg.get("hf_model_name") and importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(
            f"{name} has a Hugging Face text tower ({text_cfg['hf_model_name']!r}), which needs the "
            "`transformers` package: pip install transformers. (Its image tower is supported.)"
        )


def _unknown_name(name: str) -> UnknownModelError:
    known = open_clip.list_models()
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return UnknownModelError(
        f"unknown model name {name!r}.{hint} Architecture names are listed by open_clip.list_models() "
        f"({len(known)} known, e.g. ViT-B-32, ViT-B-16, ViT-L-14) and their pretrained tags by "
        "open_clip.list_pretrained_tags_by_model(name). Also accepted: 'hf-hub:org/repo', "
        "'local-dir:/path/to/folder', or name=None for the bundled model."
    )


def _finish(model: nn.Module, device: Union[str, torch.device], dtype: torch.dtype) -> nn.Module:
    if dtype == torch.float64:
        model = model.to(dtype=torch.float64)
    model = model.to(device)
    model.eval()
    vision_tower(model)  # the structural check, after instantiation
    return model


def _is_path_like(pretrained: str) -> bool:
    p = Path(pretrained)
    return (
        p.suffix.lower() in _SAFETENSORS_SUFFIXES + _PICKLE_SUFFIXES
        or os.sep in pretrained
        or "/" in pretrained
        or p.exists()
    )


def load_model(
    name: Optional[str] = None,
    pretrained: Optional[str] = None,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: torch.dtype = torch.float32,
) -> LoadedModel:
    """Load a decomposable open_clip model.

    Args:
        name: an architecture from ``open_clip.list_models()`` (``"ViT-B-16"``; ``"ViT-B/16"``
            is normalised like open_clip does), ``"hf-hub:org/repo"``, ``"local-dir:PATH"``,
            or ``None`` for the bundled default model (see :func:`bundled_model_dir`).
        pretrained: with an architecture name: a pretrained tag (e.g.
            ``"laion2b_s34b_b88k"``), a path to a weights file (``.safetensors``, or
            ``.pt/.pth/.bin`` loadable with ``weights_only=True``), or ``None`` for random
            weights (warns). Must be ``None`` with a ``hf-hub:`` / ``local-dir:`` name.
        device: where to put the model.
        dtype: ``torch.float32`` (default), ``torch.float64`` (exactness checks), or
            ``torch.float16`` / ``torch.bfloat16`` (open_clip mixed precision).

    Returns:
        A :class:`LoadedModel` with the model in eval mode.

    Raises:
        UnknownModelError: the name is not an open_clip architecture or schema.
        UnsupportedModelError: the image tower cannot be decomposed exactly.
        CheckpointError: missing / corrupt / unsafe / mismatched weights or model folder.
        MissingDependencyError: the model needs a package that is not installed.
        InputError: bad ``dtype`` or argument combination.
    """
    if dtype not in _DTYPE_TO_PRECISION:
        raise InputError(
            f"dtype={dtype!r} is not supported; accepted: torch.float32, torch.float64, "
            "torch.float16, torch.bfloat16."
        )
    precision = _DTYPE_TO_PRECISION[dtype]

    if name is None:
        folder = bundled_model_dir()
        weights = folder / "open_clip_model.safetensors"
        if not (folder / _CONFIG_FILE).is_file() or not weights.is_file():
            raise CheckpointError(
                f"the bundled default model is missing: expected {folder / _CONFIG_FILE} and {weights}. "
                f"It ships with the repository under assets/{_BUNDLED_SUBDIR} (or set ${ASSETS_ENV_VAR} to a "
                "folder containing it); otherwise pass a model name, e.g. "
                "load_model('ViT-B-16', 'laion2b_s34b_b88k')."
            )
        if pretrained is not None:
            raise InputError("pretrained must be None when loading the bundled model (name=None).")
        name = f"local-dir:{folder}"

    if not isinstance(name, str) or not name.strip():
        raise InputError(f"name must be a non-empty string or None, got {name!r}.")

    if name.startswith("local-dir:"):
        if pretrained is not None:
            raise InputError(f"pretrained must be None with a 'local-dir:' name (weights come from the folder), got {pretrained!r}.")
        folder = Path(name[len("local-dir:"):]).expanduser()
        cfg = _read_local_dir_config(folder, name)
        check_model_config(cfg["model_cfg"], name)
        _check_dependencies(cfg["model_cfg"], name)
        weights = _find_weights_in_dir(folder)
        if weights is None:
            raise CheckpointError(
                f"{name}: no weights file in {folder}. Expected e.g. open_clip_model.safetensors "
                f"(accepted: {_ACCEPTED_FILES})."
            )
        state_dict = read_state_dict(weights)
        try:
            with _quiet_random_init():
                model, _, preprocess = open_clip.create_model_and_transforms(
                    f"local-dir:{folder}", load_weights=False, precision=precision, pretrained_text=False
                )
            tokenizer = open_clip.get_tokenizer(f"local-dir:{folder}")
        except Exception as e:
            raise CheckpointError(f"{name}: open_clip could not build the model from {folder / _CONFIG_FILE}: {e}") from e
        _load_weights(model, state_dict, weights)
        del state_dict
        model = _finish(model, device, dtype)
        return LoadedModel(model, preprocess, tokenizer, name, str(weights))

    if name.startswith("hf-hub:"):
        if pretrained is not None:
            raise InputError(f"pretrained must be None with an 'hf-hub:' name, got {pretrained!r}.")
        try:
            model_cfg = open_clip.get_model_config(name)
        except Exception as e:
            raise CheckpointError(
                f"could not fetch {_CONFIG_FILE} for {name} from the Hugging Face Hub "
                f"({type(e).__name__}: {e}). Check the repo id and network access."
            ) from e
        if model_cfg is None:
            raise CheckpointError(f"{name}: the Hub repo has no usable {_CONFIG_FILE}.")
        check_model_config(model_cfg, name)
        _check_dependencies(model_cfg, name)
        try:
            model, _, preprocess = open_clip.create_model_and_transforms(name, precision=precision)
            tokenizer = open_clip.get_tokenizer(name)
        except Exception as e:
            raise CheckpointError(f"open_clip could not load {name} ({type(e).__name__}: {e}).") from e
        return LoadedModel(_finish(model, device, dtype), preprocess, tokenizer, name, name)

    arch = name.replace("/", "-")
    model_cfg = open_clip.get_model_config(arch)
    if model_cfg is None:
        raise _unknown_name(name)
    check_model_config(model_cfg, arch)
    _check_dependencies(model_cfg, arch)

    weights_path: Optional[Path] = None
    tag: Optional[str] = None
    if pretrained is not None:
        if not isinstance(pretrained, (str, os.PathLike)):
            raise InputError(f"pretrained must be a tag, a path or None, got {type(pretrained).__name__}.")
        pretrained = os.fspath(pretrained)
        if open_clip.is_pretrained_cfg(arch, pretrained):
            tag = pretrained
        elif _is_path_like(pretrained):
            weights_path = Path(pretrained).expanduser()
            if not weights_path.is_file():
                raise CheckpointError(
                    f"weights file not found: {weights_path}. Accepted: {_ACCEPTED_FILES}."
                )
        else:
            tags = open_clip.list_pretrained_tags_by_model(arch)
            raise CheckpointError(
                f"{pretrained!r} is neither a pretrained tag of {arch} nor a weights file. "
                f"Tags of {arch}: {tags or 'none'} (open_clip.list_pretrained_tags_by_model). "
                f"Files accepted: {_ACCEPTED_FILES}."
            )
    else:
        warnings.warn(
            f"load_model({arch!r}) without pretrained weights: the model is randomly initialised.",
            stacklevel=2,
        )

    state_dict = read_state_dict(weights_path) if weights_path is not None else None  # fail fast
    try:
        with _quiet_random_init() if state_dict is not None else contextlib.nullcontext():
            model, _, preprocess = open_clip.create_model_and_transforms(
                arch, pretrained=tag, precision=precision, pretrained_text=False
            )
    except Exception as e:
        if tag is not None:
            raise CheckpointError(
                f"could not load pretrained weights {arch}/{tag} ({type(e).__name__}: {e}). "
                "They are downloaded by open_clip: check network access and the cache."
            ) from e
        raise
    if state_dict is not None:
        _load_weights(model, state_dict, weights_path)
        del state_dict
    tokenizer = open_clip.get_tokenizer(arch)
    model = _finish(model, device, dtype)
    return LoadedModel(model, preprocess, tokenizer, arch, tag if tag is not None else (str(weights_path) if weights_path else None))
