"""Export a repaired model in open_clip's hub layout, and optionally push it.

The folder (written whole or not at all, :func:`clipdecomp.io.atomic_dir`)::

    FOLDER/open_clip_config.json        {"model_cfg": base model's config, "preprocess_cfg": ...}
    FOLDER/open_clip_model.safetensors  the baked weights; metadata = provenance
    FOLDER/README.md                    model card (YAML front matter for the Hugging Face Hub)
    FOLDER/repair.json                  selection, means, agreement, evaluation (machine-readable)

so that stock open_clip loads it with
``open_clip.create_model_and_transforms("local-dir:FOLDER")`` (or ``hf-hub:REPO`` after
:func:`push_to_hub`). Before the folder is renamed into place the weights are reloaded
with stock open_clip and compared with the in-memory model (:func:`verify_export`).
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import open_clip
import torch
from torch import nn

import clipdecomp
from clipdecomp.errors import CheckpointError, InputError
from clipdecomp.io import atomic_dir
from clipdecomp.loading import LoadedModel, bundled_model_dir

from .bake import RepairMeans
from .select import HeadSelection

__all__ = [
    "CONFIG_FILE",
    "WEIGHTS_FILE",
    "METADATA_FORMAT",
    "base_model_config",
    "hub_base_model_id",
    "provenance_metadata",
    "model_card",
    "verify_export",
    "export_repaired",
    "read_provenance",
    "push_to_hub",
]

CONFIG_FILE = "open_clip_config.json"
WEIGHTS_FILE = "open_clip_model.safetensors"
METADATA_FORMAT = "clipdecomp-repair"


def base_model_config(base: LoadedModel) -> dict[str, Any]:
    """The base model's open_clip ``model_cfg`` (from its folder, the Hub or the registry).

    A pretrained tag that needs QuickGELU (e.g. OpenAI weights on a non ``-quickgelu``
    architecture) gets ``"quick_gelu": true`` so the exported model builds the same
    activation.

    Raises:
        CheckpointError: the config cannot be found.
    """
    name = base.name
    if name.startswith("local-dir:"):
        path = Path(name[len("local-dir:"):]).expanduser() / CONFIG_FILE
        try:
            cfg = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise CheckpointError(f"cannot read the base model's config {path}: {e}") from e
        cfg = cfg.get("model_cfg", cfg)
    else:
        from clipdecomp.registry import register_model_configs

        register_model_configs()
        cfg = open_clip.get_model_config(name)
    if not isinstance(cfg, dict) or "vision_cfg" not in cfg:
        raise CheckpointError(f"no open_clip model config found for the base model {name!r}.")
    cfg = copy.deepcopy(cfg)
    if base.pretrained and not name.startswith(("local-dir:", "hf-hub:")):
        pcfg = open_clip.get_pretrained_cfg(name, base.pretrained) or {}
        if pcfg.get("quick_gelu"):
            cfg["quick_gelu"] = True
    return cfg


def _preprocess_cfg(clip: nn.Module) -> dict[str, Any]:
    cfg = dict(getattr(clip.visual, "preprocess_cfg", {}) or {})
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


def hub_base_model_id(base: LoadedModel) -> Optional[str]:
    """The base model's Hugging Face Hub repo id, if it has one (``hf-hub:`` names, and
    open_clip pretrained tags hosted on the Hub); else ``None``."""
    if base.name.startswith("hf-hub:"):
        return base.name[len("hf-hub:"):].strip("/") or None
    if base.pretrained and not base.name.startswith("local-dir:"):
        pcfg = open_clip.get_pretrained_cfg(base.name, base.pretrained) or {}
        hub = str(pcfg.get("hf_hub") or "").strip("/")
        return hub or None
    return None


def _base_label(base: LoadedModel) -> str:
    if base.name.startswith("local-dir:"):
        folder = Path(base.name[len("local-dir:"):]).expanduser()
        try:
            if folder.resolve() == bundled_model_dir().resolve():
                return "clipdecomp bundled toy model (assets/toyclip)"
        except OSError:
            pass
    return base.name


def provenance_metadata(base: LoadedModel, selection: HeadSelection, means: RepairMeans) -> dict[str, str]:
    """The safetensors metadata (str -> str) recorded with the weights."""
    return {
        "format": "pt",
        "clipdecomp_format": METADATA_FORMAT,
        "clipdecomp_version": clipdecomp.__version__,
        "base_model": base.name,
        "base_model_label": _base_label(base),
        "base_pretrained": "" if base.pretrained is None else str(base.pretrained),
        "ablated_heads": json.dumps([list(p) for p in selection.pairs()]),
        "ablated_heads_spec": selection.spec(),
        "selection": json.dumps(selection.to_json()),
        "means_split": "" if means.split is None else str(means.split),
        "means_count": str(int(means.count)),
        "method": "mean-ablation of attention heads baked into out_proj (weight columns zeroed, mean class-token write added to the bias)",
    }


def read_provenance(folder: Union[str, os.PathLike]) -> dict[str, str]:
    """The safetensors metadata of an exported folder (without loading the tensors)."""
    from safetensors import safe_open

    path = Path(folder) / WEIGHTS_FILE
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except FileNotFoundError as e:
        raise CheckpointError(f"no {WEIGHTS_FILE} in {folder}.") from e
    except Exception as e:
        raise CheckpointError(f"cannot read {path} as safetensors ({type(e).__name__}: {e}).") from e


def _yaml_list(items: list[str]) -> str:
    return "\n".join(f"- {json.dumps(i)}" for i in items)


def model_card(
    base: LoadedModel,
    selection: HeadSelection,
    means: RepairMeans,
    *,
    evaluation_markdown: Optional[str] = None,
    agreement: Optional[dict[str, float]] = None,
    base_model_id: Optional[str] = None,
) -> str:
    """The ``README.md`` model card: YAML front matter (``library_name: open_clip``,
    ``base_model`` when it is a Hub repo, tags), what was ablated and why, the
    evaluation table, and how to load the model."""
    hub_id = base_model_id or hub_base_model_id(base)
    front = ["---", "library_name: open_clip"]
    if hub_id:
        front.append(f"base_model: {json.dumps(hub_id)}")
    front.append("pipeline_tag: zero-shot-image-classification")
    front.append("tags:\n" + _yaml_list(["clip", "open_clip", "clipdecomp", "mean-ablation", "model-repair", "interpretability"]))
    front.append("---")
    k = len(selection)
    label = _base_label(base)
    lines = [
        "\n".join(front),
        "",
        f"# {label} with {k} attention head{'s' if k != 1 else ''} mean-ablated",
        "",
        f"A stock open_clip model: the image tower of `{base.name}`"
        + (f" (pretrained `{base.pretrained}`)" if base.pretrained and not base.name.startswith("local-dir:") else "")
        + f" with {k} attention head(s) of the image tower replaced by their mean output, following "
        "Gandelsman, Efros & Steinhardt, *Interpreting CLIP's Image Representation via Text-Based "
        "Decomposition* (ICLR 2024), Section 4.2. Made with clipdecomp "
        f"{clipdecomp.__version__}. The text tower is unchanged.",
        "",
        "## What was ablated and why",
        "",
        f"Selection: {selection.method}"
        + (f" ({', '.join(f'{a}={b}' for a, b in selection.query.items() if b is not None)})" if selection.query else "")
        + ".",
        "",
        f"| head | reason | role query | score ({selection.query.get('score', 'share') if selection.method == 'roles' else '-'}) |",
        "|---|---|---|---:|",
    ]
    for c in selection.heads:
        score = "" if c.score is None else f"{c.score:.3f}"
        lines.append(f"| {c.label} | {c.reason} | {c.role or ''} | {score} |")
    if not selection.heads:
        lines.append("| (none) | | | |")
    lines += [
        "",
        f"Each head's `out_proj` input columns were set to zero and its mean residual-stream write at the class "
        f"token, over {means.count} images of the `{means.split}` split, was added to the `out_proj` bias. "
        "The mean therefore replaces the head at every token position, so the edit also changes the head's "
        "indirect effects through later layers; the *exact* repair (the head's direct contribution replaced "
        "by its mean in the decomposition) is the reference it approximates.",
    ]
    if agreement:
        lines += [
            "",
            f"Baked vs exact repair, image embeddings over {agreement['n']} images: mean cosine similarity "
            f"{agreement['mean_cos']:.4f} (min {agreement['min_cos']:.4f}), relative L2 distance "
            f"{agreement['rel_l2']:.4f} (max {agreement['max_rel_l2']:.4f}).",
        ]
    if evaluation_markdown:
        lines += ["", "## Evaluation", "", evaluation_markdown.strip()]
    lines += [
        "",
        "## Usage",
        "",
        "```python",
        "import open_clip",
        "model, _, preprocess = open_clip.create_model_and_transforms('hf-hub:REPO')  # or 'local-dir:FOLDER'",
        "tokenizer = open_clip.get_tokenizer('hf-hub:REPO')",
        "```",
        "",
        "The weights file's safetensors metadata records the base model, the ablated heads, the split "
        "the means were taken over and the clipdecomp version.",
        "",
    ]
    return "\n".join(lines)


def _default_permissions(folder: Path) -> None:
    """Give the folder and its files the permissions a plain mkdir / open would
    (temporary folders and files are created private)."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for p in folder.iterdir():
        if p.is_file():
            os.chmod(p, 0o666 & ~mask)


def _state_dict(clip: nn.Module, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # clone: safetensors refuses tensors that share memory
    return {k: v.detach().to(device="cpu", dtype=dtype if v.is_floating_point() else v.dtype).clone().contiguous()
            for k, v in clip.state_dict().items()}


def verify_export(folder: Union[str, os.PathLike], clip: nn.Module, *, atol: float = 1e-5, n_images: int = 2, seed: int = 0) -> float:
    """Reload ``folder`` with stock open_clip and compare image embeddings with ``clip``
    on a random batch; return the max abs difference.

    Raises:
        CheckpointError: open_clip cannot load the folder, or the difference exceeds ``atol``.
    """
    try:
        loaded, _, _ = open_clip.create_model_and_transforms(f"local-dir:{folder}")
    except Exception as e:
        raise CheckpointError(f"stock open_clip cannot load the exported folder {folder} ({type(e).__name__}: {e}).") from e
    loaded.eval()
    size = clip.visual.image_size
    H, W = (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n_images, 3, H, W, generator=g)
    p = next(clip.parameters())
    with torch.no_grad():
        ref = clip.encode_image(x.to(p.device, p.dtype)).to("cpu", torch.float64)
        got = loaded.encode_image(x).to(torch.float64)
    diff = float((ref - got).abs().max())
    if not diff <= atol:
        raise CheckpointError(
            f"the exported model's image embeddings differ from the in-memory model's by {diff:.3g} (> {atol:g}); "
            "the config does not rebuild the same architecture."
        )
    return diff


def export_repaired(
    out: Union[str, os.PathLike],
    baked: nn.Module,
    *,
    base: LoadedModel,
    selection: HeadSelection,
    means: RepairMeans,
    evaluation: Optional[Any] = None,
    agreement: Optional[dict[str, float]] = None,
    base_model_id: Optional[str] = None,
    dtype: torch.dtype = torch.float32,
    verify: bool = True,
    extra_files: Optional[dict[str, str]] = None,
) -> Path:
    """Write the hub-layout folder ``out`` for the baked model, atomically.

    Args:
        out: the folder; replaced whole if it exists (only once everything is written).
        baked: the baked open_clip model (:func:`repair.bake.bake_ablation`).
        base: the base model (config, name, pretrained tag, preprocess config).
        selection: the ablated heads and why.
        means: the means used (split and count are recorded).
        evaluation: a :class:`repair.waterbirds_eval.WaterbirdsReport` for the card, or ``None``.
        agreement: baked vs exact embedding agreement for the card (default: the
            evaluation's, if any).
        base_model_id: Hub id for the card's ``base_model`` (default: derived, see
            :func:`hub_base_model_id`).
        dtype: weights dtype on disk (float32 by default, so reloading reproduces a
            float32 baked model to within 1e-5).
        verify: reload with stock open_clip before renaming into place (:func:`verify_export`).
        extra_files: more text files for the folder, name -> content (e.g. the evaluation
            table as ``waterbirds_eval.md`` / ``.csv``).

    Returns:
        The folder's path.
    """
    from safetensors.torch import save_file

    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise InputError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype}.")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} exists and is not a folder.")
    config = {"model_cfg": base_model_config(base), "preprocess_cfg": _preprocess_cfg(base.clip)}
    if agreement is None and evaluation is not None:
        agreement = getattr(evaluation, "agreement", None)
    record = {
        "clipdecomp_version": clipdecomp.__version__,
        "base_model": base.name,
        "base_pretrained": base.pretrained,
        "selection": selection.to_json(),
        "means": {"split": means.split, "count": means.count},
        "agreement": agreement,
        "evaluation": None if evaluation is None else evaluation.to_json(),
    }
    with atomic_dir(out) as tmp:
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        save_file(_state_dict(baked, dtype), str(tmp / WEIGHTS_FILE), metadata=provenance_metadata(base, selection, means))
        card = model_card(
            base,
            selection,
            means,
            evaluation_markdown=None if evaluation is None else evaluation.markdown(),
            agreement=agreement,
            base_model_id=base_model_id,
        )
        (tmp / "README.md").write_text(card, encoding="utf-8")
        (tmp / "repair.json").write_text(json.dumps(record, indent=2, default=str) + "\n", encoding="utf-8")
        for name, text in (extra_files or {}).items():
            if Path(name).name != name or name in (CONFIG_FILE, WEIGHTS_FILE, "README.md", "repair.json"):
                raise InputError(f"extra file name {name!r} must be a plain file name other than the export's own files.")
            (tmp / name).write_text(text, encoding="utf-8")
        if verify:
            verify_export(tmp, baked, atol=1e-5 if dtype == torch.float32 else 1e-2)
        _default_permissions(tmp)
    return out


def push_to_hub(
    folder: Union[str, os.PathLike],
    repo_id: str,
    *,
    private: bool = False,
    token: Optional[str] = None,
    commit_message: str = "Upload repaired open_clip model (clipdecomp)",
) -> str:
    """Upload an exported folder to the Hugging Face Hub (creating the model repo if
    needed) with ``huggingface_hub.HfApi().upload_folder``; returns the commit URL.
    Authentication is huggingface_hub's own (``HF_TOKEN`` or ``huggingface-cli login``)."""
    try:
        from huggingface_hub import HfApi
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise InputError("--push-to-hub needs the huggingface_hub package (pip install huggingface_hub).") from e
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InputError(f"--push-to-hub expects a repo id 'user/name', got {repo_id!r}.")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=os.fspath(folder), repo_id=repo_id, repo_type="model", commit_message=commit_message)
    return str(getattr(info, "commit_url", info))
