"""Probe accuracy and eta^2 (clipdecomp.probes) on data whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from clipdecomp.errors import InputError
from clipdecomp.probes import eta_squared, probe_accuracy


def _groups(n: int = 300, k: int = 3, d: int = 8, spread: float = 1.0, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(k, size=n)
    means = rng.normal(size=(k, d)) * 5
    return means[y] + spread * rng.normal(size=(n, d)), y


def test_eta_squared_is_one_for_a_function_of_the_label_and_matches_its_definition():
    x, y = _groups(spread=0.0)
    assert eta_squared(x, y) == pytest.approx(1.0)
    x, y = _groups(spread=3.0)
    xc = x - x.mean(0)
    within = sum(((x[y == v] - x[y == v].mean(0)) ** 2).sum() for v in np.unique(y))
    assert eta_squared(torch.from_numpy(x), y) == pytest.approx(1 - within / (xc ** 2).sum(), rel=1e-12)
    assert eta_squared(np.ones((10, 3)), [0, 1] * 5) == 0.0


def test_eta_squared_is_small_when_the_label_is_unrelated():
    rng = np.random.default_rng(1)
    assert eta_squared(rng.normal(size=(2000, 8)), rng.integers(4, size=2000)) < 0.01


def test_probe_reads_a_separable_label_and_not_a_random_one():
    x, y = _groups(spread=0.5)
    assert probe_accuracy(x, y) == 1.0
    rng = np.random.default_rng(2)
    shuffled = rng.permutation(y)
    assert probe_accuracy(x, shuffled) < 0.5  # three balanced-ish classes: chance is about 1/3


def test_bad_inputs_say_what_is_accepted():
    x, y = _groups()
    with pytest.raises(InputError, match=r"\[N\]"):
        probe_accuracy(x, y[:-1])
    with pytest.raises(InputError, match=r"\[N, D\]"):
        eta_squared(x[:, 0], y)
    with pytest.raises(InputError, match="two distinct"):
        eta_squared(x, np.zeros(len(y)))
    with pytest.raises(InputError, match="test_size"):
        probe_accuracy(x, y, test_size=1.5)
