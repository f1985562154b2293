"""load_model: accepted sources load the right weights; everything else fails with a
clear ClipDecompError before anything heavy happens."""

from __future__ import annotations

import importlib.util
import json
import os
import warnings

import open_clip
import pytest
import torch
from conftest import TINY, TINY_CFG, TINY_CUSTOM, make_images
from PIL import Image
from safetensors.torch import save_file

from clipdecomp.decomposition import decompose
from clipdecomp.errors import (
    CheckpointError,
    ClipDecompError,
    InputError,
    MissingDependencyError,
    UnknownModelError,
    UnsupportedModelError,
)
from clipdecomp.loading import (
    BUNDLED_MODEL_DIR,
    LoadedModel,
    bundled_model_dir,
    load_model,
    read_state_dict,
    vision_tower,
)


def _load(*args, **kwargs) -> LoadedModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model(*args, **kwargs)


def _same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture(scope="module")
def tiny_weights(tiny_configs, tmp_path_factory):
    """A tiny model with distinctive weights, saved in every accepted format."""
    torch.manual_seed(123)
    src = _load(TINY)
    with torch.no_grad():
        for p in src.clip.parameters():
            p.add_(0.01 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("weights")
    sd = {k: v.contiguous() for k, v in src.clip.state_dict().items()}
    save_file(sd, str(d / "w.safetensors"))
    torch.save(sd, d / "raw.pt")
    torch.save({"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}, d / "wrapped.pth")
    return src, d


# ------------------------------------------------------------------------- accepted sources


def test_random_init_registry_name(tiny_configs):
    with pytest.warns(UserWarning, match="randomly initialised"):
        lm = load_model(TINY)
    assert isinstance(lm, LoadedModel)
    assert lm.name == TINY and lm.pretrained is None
    assert not lm.clip.training and lm.image_size == (32, 48) and lm.dtype == torch.float32
    img = lm.preprocess(Image.new("RGB", (100, 80), (200, 10, 10)))
    assert img.shape == (3, 32, 48)
    assert lm.tokenizer(["a photo of a dog"]).shape == (1, 77)
    assert vision_tower(lm) is lm.clip.visual and vision_tower(lm.clip) is lm.clip.visual
    decompose(lm, img[None])  # runs


@pytest.mark.parametrize("fname", ["w.safetensors", "raw.pt", "wrapped.pth"])
def test_weights_file_formats(tiny_weights, fname):
    src, d = tiny_weights
    lm = load_model(TINY, str(d / fname))
    assert lm.pretrained == str(d / fname)
    assert _same_weights(lm.clip, src.clip)


def test_float64_and_device(tiny_weights):
    src, d = tiny_weights
    lm = load_model(TINY, d / "w.safetensors", dtype=torch.float64, device="cpu")
    assert lm.dtype == torch.float64 and lm.device.type == "cpu"
    assert torch.equal(lm.clip.visual.proj, src.clip.visual.proj.double())


def _write_local_dir(folder, src, weights_name="open_clip_model.safetensors"):
    folder.mkdir(parents=True)
    (folder / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CFG, "preprocess_cfg": {"mean": [0.5] * 3, "std": [0.25] * 3}})
    )
    if weights_name:
        save_file({k: v.contiguous() for k, v in src.clip.state_dict().items()}, str(folder / weights_name))


def test_local_dir(tiny_weights, tmp_path):
    src, _ = tiny_weights
    _write_local_dir(tmp_path / "m", src)
    lm = load_model(f"local-dir:{tmp_path / 'm'}")
    assert _same_weights(lm.clip, src.clip)
    assert lm.pretrained.endswith("open_clip_model.safetensors")
    assert lm.clip.visual.preprocess_cfg["mean"] == [0.5] * 3  # preprocess from the folder's config


def test_bundled_model_missing_is_clear(assets_env):
    assert bundled_model_dir() == assets_env / "toyclip"
    with pytest.raises(CheckpointError, match="bundled default model is missing") as ei:
        load_model()
    assert str(assets_env / "toyclip") in str(ei.value) and "CLIPDECOMP_ASSETS" in str(ei.value)


def test_bundled_model_from_env(tiny_weights, assets_env):
    src, _ = tiny_weights
    _write_local_dir(assets_env / "toyclip", src)
    lm = load_model()
    assert lm.name == f"local-dir:{assets_env / 'toyclip'}"
    assert _same_weights(lm.clip, src.clip)


def test_bundled_model_default_location(monkeypatch):
    """The repository's own assets/toyclip: loads if committed, else the clear error."""
    monkeypatch.delenv("CLIPDECOMP_ASSETS", raising=False)
    assert bundled_model_dir() == BUNDLED_MODEL_DIR or os.environ.get("CLIPDECOMP_ASSETS")
    present = (bundled_model_dir() / "open_clip_config.json").is_file() and (
        bundled_model_dir() / "open_clip_model.safetensors"
    ).is_file()
    if present:
        lm = load_model()
        x = make_images(lm.clip.visual, 1)
        assert torch.allclose(decompose(lm, x).total(), lm.clip.encode_image(x).detach(), rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(CheckpointError, match="bundled default model is missing"):
            load_model()


# ------------------------------------------------------------------------- refusals


def test_unknown_name():
    with pytest.raises(UnknownModelError, match=r"open_clip\.list_models\(\)") as ei:
        load_model("ViT-B-61")
    assert "Did you mean" in str(ei.value) and "hf-hub:" in str(ei.value)
    assert isinstance(ei.value, ValueError)


@pytest.mark.parametrize(
    "name,match",
    [
        ("RN50", "ModifiedResNet"),
        ("ViT-L-14-CLIPA", "pool_type='avg'"),
        ("coca_ViT-B-32", "CoCa"),
        ("EVA02-B-16", "timm trunk"),
        ("ViT-B-16-SigLIP", "timm trunk"),
        ("convnext_base", "timm trunk"),
    ],
)
def test_unsupported_refused_before_instantiation(name, match, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("instantiated an unsupported model")

    monkeypatch.setattr(open_clip, "create_model_and_transforms", boom)
    with pytest.raises(UnsupportedModelError, match=match) as ei:
        load_model(name)
    assert "Supported: OpenCLIP ViT image towers with class-token pooling" in str(ei.value)


def test_unsupported_local_dir(tmp_path):
    d = tmp_path / "rn"
    d.mkdir()
    (d / "open_clip_config.json").write_text(json.dumps({"model_cfg": open_clip.get_model_config("RN50")}))
    with pytest.raises(UnsupportedModelError, match="ModifiedResNet"):
        load_model(f"local-dir:{d}")


@pytest.mark.skipif(importlib.util.find_spec("transformers") is not None, reason="transformers is installed")
def test_hf_text_tower_needs_transformers():
    with pytest.raises(MissingDependencyError, match="pip install transformers"):
        load_model("roberta-ViT-B-32")


def test_bad_dtype_and_arguments(tiny_configs, tmp_path):
    with pytest.raises(InputError, match="torch.float32, torch.float64"):
        load_model(TINY, dtype=torch.int8)
    with pytest.raises(InputError, match="pretrained must be None"):
        load_model(f"local-dir:{tmp_path}", "laion2b_s34b_b88k")
    with pytest.raises(InputError, match="non-empty string"):
        load_model("")


# ------------------------------------------------------------------------- bad checkpoints


def test_missing_file(tiny_configs, tmp_path):
    p = tmp_path / "nope.safetensors"
    with pytest.raises(CheckpointError, match="not found") as ei:
        load_model(TINY, str(p))
    assert str(p) in str(ei.value) and ".safetensors" in str(ei.value)


@pytest.mark.parametrize("suffix", [".safetensors", ".pt", ".bin"])
def test_corrupt_file(tiny_configs, tmp_path, suffix):
    p = tmp_path / f"garbage{suffix}"
    p.write_bytes(os.urandom(300))
    with pytest.raises(CheckpointError, match="corrupt") as ei:
        load_model(TINY, str(p))
    assert str(p) in str(ei.value) and "Accepted" in str(ei.value)


def test_truncated_torch_zip(tiny_weights, tmp_path):
    _, d = tiny_weights
    p = tmp_path / "trunc.pt"
    p.write_bytes((d / "raw.pt").read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="corrupt"):
        read_state_dict(p)


class NotAllowed:
    def __init__(self):
        self.x = 1


def test_pickle_not_weights_only(tiny_configs, tmp_path):
    p = tmp_path / "unsafe.pt"
    torch.save({"state_dict": {"a": torch.ones(1)}, "obj": NotAllowed()}, p)
    with pytest.raises(CheckpointError, match="weights_only=True") as ei:
        load_model(TINY, str(p))
    assert "arbitrary" in str(ei.value)


def test_not_a_state_dict(tmp_path):
    p = tmp_path / "list.pt"
    torch.save([torch.ones(2)], p)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(p)
    p2 = tmp_path / "mixed.pt"
    torch.save({"a": torch.ones(1), "b": 3}, p2)
    with pytest.raises(CheckpointError, match="str -> Tensor"):
        read_state_dict(p2)


def test_wrong_architecture(tiny_configs, tmp_path):
    other = _load(TINY_CUSTOM)
    p = tmp_path / "custom.safetensors"
    save_file({k: v.contiguous() for k, v in other.clip.state_dict().items()}, str(p))
    with pytest.raises(CheckpointError, match="do not match the architecture") as ei:
        load_model(TINY, str(p))
    assert str(p) in str(ei.value)


def test_unknown_suffix_and_tag(tiny_configs, tmp_path):
    p = tmp_path / "w.ckpt"
    p.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="unsupported weights file type '.ckpt'"):
        load_model(TINY, str(p))
    with pytest.raises(CheckpointError, match=r"neither a pretrained tag .* Tags of ViT-B-16: \[.*laion2b_s34b_b88k"):
        load_model("ViT-B-16", "not_a_tag")


def test_local_dir_problems(tiny_weights, tmp_path):
    src, _ = tiny_weights
    with pytest.raises(CheckpointError, match="folder not found"):
        load_model(f"local-dir:{tmp_path / 'absent'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="open_clip_config.json is missing"):
        load_model(f"local-dir:{tmp_path / 'empty'}")
    _write_local_dir(tmp_path / "noweights", src, weights_name=None)
    with pytest.raises(CheckpointError, match="no weights file"):
        load_model(f"local-dir:{tmp_path / 'noweights'}")
    _write_local_dir(tmp_path / "bad", src, weights_name=None)
    (tmp_path / "bad" / "open_clip_model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(CheckpointError, match="corrupt"):
        load_model(f"local-dir:{tmp_path / 'bad'}")


def test_all_errors_are_value_errors():
    for cls in (CheckpointError, InputError, UnknownModelError, UnsupportedModelError, MissingDependencyError):
        assert issubclass(cls, ClipDecompError) and issubclass(cls, ValueError)
