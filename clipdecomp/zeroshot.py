"""Text embeddings and zero-shot classification with an open_clip model.

Text embeddings are unit-normalised ``[T, D]`` rows in the joint space, the form the
decomposition's ``*_scores`` methods and TextSpan expect. The default class names and
prompt templates are open_clip's ImageNet ones (``open_clip.zero_shot_metadata``).
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from open_clip import zero_shot_metadata

from .errors import InputError
from .loading import LoadedModel

__all__ = [
    "IMAGENET_CLASSNAMES",
    "OPENAI_IMAGENET_TEMPLATES",
    "text_embeddings",
    "zero_shot_classifier",
    "prompt_set_classifier",
    "class_embeddings",
    "zero_shot_logits",
    "predict",
    "accuracy",
]

#: The 1000 ImageNet class names used by open_clip / OpenAI CLIP.
IMAGENET_CLASSNAMES: tuple[str, ...] = tuple(zero_shot_metadata.IMAGENET_CLASSNAMES)
#: OpenAI's 80 ImageNet prompt templates (callables: class name -> prompt).
OPENAI_IMAGENET_TEMPLATES: tuple[Callable[[str], str], ...] = tuple(zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES)

Template = Union[str, Callable[[str], str]]
#: Prompt templates, or per-class prompt ensembles ``{class: [prompt, ...]}``.
TemplatesOrPromptSets = Union[Sequence[Template], Mapping[Any, Sequence[str]]]


def _clip_and_tokenizer(model: Any, tokenizer: Optional[Callable]) -> tuple[Any, Callable]:
    if isinstance(model, LoadedModel):
        return model.clip, tokenizer or model.tokenizer
    if not hasattr(model, "encode_text"):
        raise InputError(
            f"model must be a LoadedModel or an open_clip model with encode_text, got {type(model).__name__}."
        )
    if tokenizer is None:
        raise InputError("pass tokenizer=open_clip.get_tokenizer(name) with a bare open_clip model (or use load_model).")
    return model, tokenizer


def _check_strings(texts: Any, what: str) -> list[str]:
    if isinstance(texts, str):
        raise InputError(f"{what} must be a sequence of strings, got a single string {texts!r} (wrap it in a list).")
    texts = list(texts)
    if not texts:
        raise InputError(f"{what} is empty.")
    bad = [t for t in texts if not isinstance(t, str)]
    if bad:
        raise InputError(f"{what} must contain only strings, got e.g. {bad[0]!r}.")
    return texts


def text_embeddings(
    model: Any,
    texts: Sequence[str],
    batch_size: int = 256,
    *,
    tokenizer: Optional[Callable] = None,
) -> torch.Tensor:
    """Unit-normalised text embeddings ``[T, D]`` (``encode_text`` in batches, no grad).

    Args:
        model: a :class:`~clipdecomp.loading.LoadedModel` (its tokenizer is used), or an
            open_clip model together with ``tokenizer``.
        texts: the strings.
        batch_size: texts per forward pass.
    """
    clip, tok = _clip_and_tokenizer(model, tokenizer)
    texts = _check_strings(texts, "texts")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive int, got {batch_size!r}.")
    device = next(clip.parameters()).device
    out = []
    with torch.no_grad():
        for i in range(0, len(texts), batch_size):
            ids = tok(texts[i : i + batch_size]).to(device)
            out.append(F.normalize(clip.encode_text(ids), dim=-1))
    return torch.cat(out)


def _apply(template: Template, name: str) -> str:
    if isinstance(template, str):
        return template.format(name)
    return template(name)


def zero_shot_classifier(
    model: Any,
    classnames: Sequence[str] = IMAGENET_CLASSNAMES,
    templates: Sequence[Template] = OPENAI_IMAGENET_TEMPLATES,
    *,
    batch_size: int = 256,
    tokenizer: Optional[Callable] = None,
) -> torch.Tensor:
    """Zero-shot class embeddings ``[C, D]``: for each class, the normalised mean of the
    normalised embeddings of its prompts (``template(classname)`` for every template).

    Templates are callables ``name -> prompt`` or format strings with ``{}``.
    """
    classnames = _check_strings(classnames, "classnames")
    templates = list(templates)
    if not templates:
        raise InputError("templates is empty.")
    for t in templates:
        if not ((isinstance(t, str) and "{}" in t) or callable(t)):
            raise InputError(f"templates must be format strings with '{{}}' or callables, got {t!r}.")
    n_t = len(templates)
    per_chunk = max(1, batch_size // n_t)
    rows = []
    for i in range(0, len(classnames), per_chunk):
        chunk = classnames[i : i + per_chunk]
        prompts = [_apply(t, c) for c in chunk for t in templates]
        emb = text_embeddings(model, prompts, batch_size, tokenizer=tokenizer)
        rows.append(F.normalize(emb.view(len(chunk), n_t, -1).mean(dim=1), dim=-1))
    return torch.cat(rows)


def prompt_set_classifier(
    model: Any,
    prompt_sets: Mapping[Any, Sequence[str]],
    classes: Optional[Sequence[Any]] = None,
    *,
    batch_size: int = 256,
    tokenizer: Optional[Callable] = None,
) -> torch.Tensor:
    """Zero-shot class embeddings ``[C, D]`` from per-class prompt ensembles.

    ``prompt_sets`` maps each class to its own prompts (``{"circle": ["a circle",
    "two circles", ...], ...}``, e.g. :func:`clipdecomp.toyworld.captions.zero_shot_prompts`);
    sets may differ in size. A class embedding is the normalised mean of its prompts'
    normalised embeddings, as in :func:`zero_shot_classifier`. Rows follow ``classes``
    (default: the mapping's order).
    """
    if not isinstance(prompt_sets, Mapping) or not prompt_sets:
        raise InputError("prompt_sets must be a non-empty mapping {class: [prompt, ...]}.")
    classes = list(prompt_sets) if classes is None else list(classes)
    missing = [c for c in classes if c not in prompt_sets]
    if missing or not classes:
        raise InputError(f"no prompt set for class(es) {missing!r}; the prompt sets cover {list(prompt_sets)}.")
    sets = [_check_strings(prompt_sets[c], f"the prompts of class {c!r}") for c in classes]
    emb = text_embeddings(model, [p for ps in sets for p in ps], batch_size, tokenizer=tokenizer)
    rows = torch.split(emb, [len(ps) for ps in sets])
    return F.normalize(torch.stack([r.mean(0) for r in rows]), dim=-1)


def class_embeddings(
    model: Any, classnames: Sequence[str], templates_or_prompt_sets: Optional[TemplatesOrPromptSets] = None
) -> torch.Tensor:
    """Zero-shot class embeddings ``[C, D]``, rows in ``classnames`` order, from templates
    (default: OpenAI's ImageNet ones, see :func:`zero_shot_classifier`) or per-class prompt
    ensembles (a mapping, see :func:`prompt_set_classifier`)."""
    spec = templates_or_prompt_sets
    if spec is None:
        return zero_shot_classifier(model, list(classnames))
    if isinstance(spec, Mapping):
        return prompt_set_classifier(model, {str(k): v for k, v in spec.items()}, [str(c) for c in classnames])
    return zero_shot_classifier(model, list(classnames), list(spec))


def zero_shot_logits(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Cosine similarities ``[B, C]`` between image embeddings ``[B, D]`` (normalised here)
    and class embeddings ``[C, D]``."""
    if embeddings.ndim != 2 or classifier.ndim != 2 or embeddings.shape[1] != classifier.shape[1]:
        raise InputError(
            f"expected embeddings [B, D] and classifier [C, D], got {list(embeddings.shape)} and "
            f"{list(classifier.shape)}."
        )
    return F.normalize(embeddings, dim=-1) @ classifier.to(embeddings.dtype).t()


def predict(embeddings: torch.Tensor, classifier: torch.Tensor) -> torch.Tensor:
    """Predicted class index per image ``[B]`` (argmax cosine similarity)."""
    return zero_shot_logits(embeddings, classifier).argmax(dim=-1)


def accuracy(logits: torch.Tensor, labels: torch.Tensor, topk: int = 1) -> float:
    """Fraction of rows of ``logits [B, C]`` whose ``labels [B]`` is among the top-``topk`` classes."""
    if logits.ndim != 2 or labels.ndim != 1 or logits.shape[0] != labels.shape[0]:
        raise InputError(f"expected logits [B, C] and labels [B], got {list(logits.shape)} and {list(labels.shape)}.")
    if logits.shape[0] == 0:
        raise InputError("accuracy of an empty batch is undefined.")
    if not 1 <= topk <= logits.shape[1]:
        raise InputError(f"topk must be in [1, {logits.shape[1]}], got {topk}.")
    top = logits.topk(topk, dim=-1).indices
    return (top == labels.to(top.device)[:, None]).any(dim=-1).float().mean().item()
