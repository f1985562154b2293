"""Text embeddings and zero-shot classification on a tiny random-init model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipdecomp.errors import InputError
from clipdecomp.zeroshot import (
    IMAGENET_CLASSNAMES,
    OPENAI_IMAGENET_TEMPLATES,
    accuracy,
    predict,
    prompt_set_classifier,
    text_embeddings,
    zero_shot_classifier,
    zero_shot_logits,
)


def test_defaults_are_open_clip_imagenet():
    assert len(IMAGENET_CLASSNAMES) == 1000 and IMAGENET_CLASSNAMES[0] == "tench"
    assert len(OPENAI_IMAGENET_TEMPLATES) == 80
    assert OPENAI_IMAGENET_TEMPLATES[0]("dog") == "a bad photo of a dog."


def test_text_embeddings(tiny):
    texts = ["a photo of a cat", "a dog", "red", "a blue square", "x"]
    emb = text_embeddings(tiny, texts)
    assert emb.shape == (5, 24)
    assert torch.allclose(emb.norm(dim=-1), torch.ones(5), atol=1e-6)
    with torch.no_grad():
        ref = F.normalize(tiny.clip.encode_text(tiny.tokenizer(texts)), dim=-1)
    assert torch.allclose(emb, ref, atol=1e-6)
    assert torch.allclose(text_embeddings(tiny, texts, batch_size=2), emb, atol=1e-6)
    # a bare open_clip model with an explicit tokenizer
    assert torch.allclose(text_embeddings(tiny.clip, texts, tokenizer=tiny.tokenizer), emb, atol=1e-6)


def test_zero_shot_classifier(tiny):
    classes = ["cat", "dog", "car"]
    templates = ["a photo of a {}.", lambda c: f"a drawing of a {c}."]
    clf = zero_shot_classifier(tiny, classes, templates, batch_size=4)
    assert clf.shape == (3, 24)
    assert torch.allclose(clf.norm(dim=-1), torch.ones(3), atol=1e-6)
    for i, c in enumerate(classes):
        e = text_embeddings(tiny, [f"a photo of a {c}.", f"a drawing of a {c}."])
        assert torch.allclose(clf[i], F.normalize(e.mean(0), dim=-1), atol=1e-6)


def test_prompt_set_classifier(tiny):
    sets = {"circle": ["a circle", "two circles", "a red circle"], "star": ["a star"]}
    clf = prompt_set_classifier(tiny, sets, batch_size=2)
    assert clf.shape == (2, 24)
    for i, name in enumerate(sets):
        assert torch.allclose(clf[i], F.normalize(text_embeddings(tiny, sets[name]).mean(0), dim=-1), atol=1e-6)
    # rows follow `classes`; equal-sized sets agree with zero_shot_classifier's template route
    assert torch.allclose(prompt_set_classifier(tiny, sets, ["star", "circle"]), clf.flip(0), atol=1e-6)
    same = {"cat": ["a cat", "cats"], "dog": ["a dog", "dogs"]}
    templates = [lambda c: f"a {c}", lambda c: f"{c}s"]
    assert torch.allclose(prompt_set_classifier(tiny, same), zero_shot_classifier(tiny, ["cat", "dog"], templates), atol=1e-6)
    with pytest.raises(InputError, match=r"no prompt set for class\(es\) \['dog'\]"):
        prompt_set_classifier(tiny, sets, ["circle", "dog"])
    with pytest.raises(InputError, match="prompts of class 'star' is empty"):
        prompt_set_classifier(tiny, {"circle": ["a circle"], "star": []})
    with pytest.raises(InputError, match="non-empty mapping"):
        prompt_set_classifier(tiny, ["a circle"])


def test_predict_and_accuracy():
    clf = torch.eye(3, 4)
    emb = torch.tensor([[5.0, 0, 0, 0], [0, 0.1, 0, 1], [0, 0, 2, 0], [1, 2, 0, 0]])
    assert predict(emb, clf).tolist() == [0, 1, 2, 1]
    logits = zero_shot_logits(emb, clf)
    assert bool((logits.abs() <= 1 + 1e-6).all())
    labels = torch.tensor([0, 1, 2, 0])
    assert accuracy(logits, labels) == pytest.approx(0.75)
    assert accuracy(logits, labels, topk=2) == pytest.approx(1.0)


def test_bad_inputs(tiny):
    with pytest.raises(InputError, match="single string"):
        text_embeddings(tiny, "a cat")
    with pytest.raises(InputError, match="empty"):
        text_embeddings(tiny, [])
    with pytest.raises(InputError, match="tokenizer"):
        text_embeddings(tiny.clip, ["a cat"])
    with pytest.raises(InputError, match="templates"):
        zero_shot_classifier(tiny, ["cat"], ["no placeholder"])
    with pytest.raises(InputError, match=r"labels \[B\]"):
        accuracy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))
    with pytest.raises(InputError, match=r"\[B, D\]"):
        predict(torch.zeros(2, 5), torch.zeros(3, 4))
