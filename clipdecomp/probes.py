"""How much a set of contributions says about a labelled property of the images.

Two measures on a head's (or any term's) direct contributions ``[N, D]`` and labels ``[N]``:

* :func:`probe_accuracy`: held-out accuracy of a linear probe (logistic regression on
  standardised features): *can* the property be read from the contributions?
* :func:`eta_squared`: the fraction of the contributions' variance that the label
  explains (between-group over total, summed over dimensions): *how much* of the
  output is about the property. A salient property (the background of a scene) can be
  decoded from almost any head, so probes saturate; eta^2 still tells heads apart.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch

from .errors import InputError

__all__ = ["eta_squared", "probe_accuracy"]

ArrayLike = Union[torch.Tensor, np.ndarray]


def _check(features: ArrayLike, labels: Union[np.ndarray, Sequence]) -> tuple[np.ndarray, np.ndarray]:
    x = features.detach().cpu().double().numpy() if isinstance(features, torch.Tensor) else np.asarray(features, float)
    y = np.asarray(labels)
    if x.ndim != 2:
        raise InputError(f"features must be [N, D], got shape {tuple(x.shape)}.")
    if y.shape != (x.shape[0],):
        raise InputError(f"labels must be [N] with N = {x.shape[0]} (one per row of features), got shape {y.shape}.")
    if len(np.unique(y)) < 2:
        raise InputError("labels must take at least two distinct values.")
    return x, y


def eta_squared(features: ArrayLike, labels: Union[np.ndarray, Sequence]) -> float:
    """Fraction of the variance of ``features [N, D]`` explained by the groups ``labels [N]``:
    ``sum_g n_g |mean_g - mean|^2 / sum_i |x_i - mean|^2`` in ``[0, 1]`` (0 for constant features)."""
    x, y = _check(features, labels)
    x = x - x.mean(0)
    total = float((x ** 2).sum())
    if total == 0:
        return 0.0
    between = sum(float((y == v).sum()) * float((x[y == v].mean(0) ** 2).sum()) for v in np.unique(y))
    return between / total


def probe_accuracy(features: ArrayLike, labels: Union[np.ndarray, Sequence], *, seed: int = 0,
                   test_size: float = 0.3, max_iter: int = 3000) -> float:
    """Held-out accuracy of a logistic-regression probe on standardised ``features [N, D]``.

    The rows are split ``1 - test_size`` / ``test_size``, stratified by label, with ``seed``;
    the probe (scikit-learn ``LogisticRegression``, default L2 strength) is fit on the first
    part and scored on the second.
    """
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    x, y = _check(features, labels)
    if not 0 < test_size < 1:
        raise InputError(f"test_size must be in (0, 1), got {test_size}.")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, random_state=seed, stratify=y)
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=max_iter))
    clf.fit(x_tr, y_tr)
    return float(clf.score(x_te, y_te))
