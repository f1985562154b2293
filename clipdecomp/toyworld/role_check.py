"""Do TextSpan's head roles match the toy world's ground truth?

For each toy-world factor (colour, shape, texture, region, count, background):

* role heads: the heads whose role is the factor's pool category
  (:data:`clipdecomp.pools.TOY_ROLE_CATEGORIES`); reported are the one with the highest
  role score ("top") and the one whose probe reads the factor best ("best"). Without a
  role head, the head with the largest share of the category stands in and the factor fails;
* other head: the head with the highest role score among heads whose role is another
  toy factor's category (chosen by role, never by probe accuracy);
* probes (:func:`clipdecomp.probes.probe_accuracy`) on each head's unnormalised direct
  contributions ``[N, D]`` over held-out scenes, plus eta^2
  (:func:`clipdecomp.probes.eta_squared`), and a probe on the whole image embedding (does
  the model represent the factor at all?);
* passed: *at least one* role head reads the factor ``margin`` better than the other head
  (the acceptance of the TextSpan issue); ``top_passed``: the top-scored role head does.

``bench/toy_roles.py check`` prints the table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..pools import TOY_ROLE_CATEGORIES
from ..probes import eta_squared, probe_accuracy
from ..textspan_results import TextSpanResults
from .world import Scene, render, sample_scene

__all__ = ["FACTOR_ORDER", "FactorCheck", "check_roles", "head_contributions", "probe_scenes"]

FACTOR_ORDER = ("colour", "shape", "texture", "region", "count", "background")
Head = tuple[int, int]


def probe_scenes(n: int, seed: int) -> list[Scene]:
    """``n`` scenes with every factor drawn independently and uniformly (no spurious cue)."""
    rng = np.random.default_rng([seed, 404])
    return [sample_scene(rng, spurious=None) for _ in range(n)]


def head_contributions(model: Any, scenes: list[Scene], layers: list[int], batch_size: int = 128,
                       progress: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Unnormalised direct contributions of the heads of ``layers`` ``[N, len(layers), H, D]``
    and the image embeddings ``[N, D]`` of ``scenes`` (float32)."""
    from tqdm import tqdm

    from ..decomposition import decompose

    heads, totals = [], []
    starts = range(0, len(scenes), batch_size)
    for i in tqdm(starts, desc="decompose", unit="batch", disable=not progress):
        x = torch.stack([model.preprocess(render(s)[0]) for s in scenes[i: i + batch_size]])
        dec = decompose(model, x, token_layers=None)
        heads.append(dec.heads[:, layers].float())
        totals.append(dec.total().float())
    return torch.cat(heads), torch.cat(totals)


@dataclass(frozen=True)
class FactorCheck:
    """One factor's row of the role check (heads as ``(layer, head)``; probes are accuracies)."""

    factor: str
    category: str
    n_role_heads: int
    top_head: Head
    top_score: float
    top_probe: float
    best_head: Head
    best_probe: float
    best_eta2: float
    other_head: Optional[Head]
    other_role: str
    other_probe: float
    other_eta2: float
    best_other_probe: float
    image_probe: float
    chance: float
    top_passed: bool
    passed: bool


def check_roles(results: TextSpanResults, parts: torch.Tensor, total: torch.Tensor, scenes: list[Scene],
                *, margin: float = 0.10, seed: int = 0) -> list[FactorCheck]:
    """The role check (module docstring) from :func:`head_contributions` of ``scenes``.

    Args:
        results: TextSpan results with roles (general pool, or any pool with the toy categories).
        parts: ``[N, len(results.layers), H, D]``; total: ``[N, D]``.
        scenes: the ``N`` scenes, for their factors.
        margin: required probe advantage of a role head over the other head.
        seed: seed of the probes' train/test split.
    """
    from ..roles import heads_for_role

    layer_index = {l: i for i, l in enumerate(results.layers)}
    factor_cats = set(TOY_ROLE_CATEGORIES.values())
    cache: dict[tuple[str, Head], float] = {}

    def feats(key: Head) -> torch.Tensor:
        return parts[:, layer_index[key[0]], key[1]]

    rows = []
    for factor in FACTOR_ORDER:
        y = np.array([str(getattr(s, factor)) for s in scenes])

        def acc(key: Head) -> float:
            if (factor, key) not in cache:
                cache[(factor, key)] = probe_accuracy(feats(key), y, seed=seed)
            return cache[(factor, key)]

        cat = TOY_ROLE_CATEGORIES[factor]
        own = [h for h in results.heads if h.role == cat]
        if own:
            top = max(own, key=lambda h: (h.role_score, -h.layer, -h.head))
            top_score = top.role_score
            best = max(own, key=lambda h: (acc(h.key), -h.layer, -h.head))
        else:
            m = heads_for_role(results, cat, top_n=1)[0]
            top = best = results.head(m.layer, m.head)
            top_score = m.score
        others = [h for h in results.heads if h.role != cat and h.role in factor_cats]
        other = max(others, key=lambda h: (h.role_score, -h.layer, -h.head)) if others else None
        other_probe = acc(other.key) if other else float("nan")
        rows.append(FactorCheck(
            factor=factor, category=cat, n_role_heads=len(own),
            top_head=top.key, top_score=float(top_score), top_probe=acc(top.key),
            best_head=best.key, best_probe=acc(best.key), best_eta2=eta_squared(feats(best.key), y),
            other_head=other.key if other else None, other_role=other.role if other else "",
            other_probe=other_probe, other_eta2=eta_squared(feats(other.key), y) if other else float("nan"),
            best_other_probe=max((acc(h.key) for h in results.heads if h.role != cat), default=float("nan")),
            image_probe=probe_accuracy(total, y, seed=seed),
            chance=float(max(np.mean(y == v) for v in np.unique(y))),
            top_passed=bool(own) and other is not None and acc(top.key) >= other_probe + margin,
            passed=bool(own) and other is not None and acc(best.key) >= other_probe + margin,
        ))
    return rows
