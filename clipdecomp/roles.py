"""Head roles: what property of the image each attention head's TextSpan texts describe.

Role of a head (:func:`assign_role`)
    Take the head's first ``m`` (default 10) TextSpan texts and their explained
    variances ``ev_1..ev_m``. The *share* of a pool category is the fraction of
    ``sum(ev_1..ev_m)`` contributed by texts of that category. The role is the
    category with the largest share, the role score that share (in ``[0, 1]``; 1
    means every top text is of that category). Texts without a category count as
    ``"uncategorised"``. For pools with fewer than two categories (``words``,
    ``random``, plain files) shares say nothing, so the role is the head's first
    text and the score its share of the first ``m`` texts' explained variance.

Finding heads for a role (:func:`heads_for_role`)
    * ``query`` names a category of the results (case-insensitive) or an alias
      (:data:`ROLE_ALIASES`: ``"colour"`` -> ``"colours"``, ``"background"`` ->
      ``"scenes and settings"``, ...): each head's score is its share of that category.
    * otherwise (free text, e.g. ``"stripes"``): the query and the head's first ``m``
      texts are embedded with the model's text encoder (unit norm), and the score is
      the explained-variance-weighted mean cosine similarity
      ``sum_i ev_i cos(q, t_i) / sum_i ev_i`` over those texts (in ``[-1, 1]``). The
      model must be the one the results were computed with (only ``D`` is checked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from .errors import InputError
from .textspan_results import HeadSpan, TextSpanResults

__all__ = [
    "DEFAULT_TOP_M",
    "ROLE_ALIASES",
    "UNCATEGORISED",
    "RoleAssignment",
    "RoleMatch",
    "assign_role",
    "assign_roles",
    "category_shares",
    "heads_for_role",
    "known_categories",
    "resolve_role",
]

#: Number of leading TextSpan texts whose explained variance decides a head's role.
DEFAULT_TOP_M = 10
#: Category label for texts that have none.
UNCATEGORISED = "uncategorised"

#: Alternative names of the ``general`` pool's categories (keys are normalised: lower case,
#: single spaces, ``-``/``_`` read as spaces).
ROLE_ALIASES: dict[str, str] = {
    "colour": "colours", "color": "colours", "colors": "colours",
    "shape": "shapes",
    "texture": "textures and patterns", "textures": "textures and patterns",
    "pattern": "textures and patterns", "patterns": "textures and patterns",
    "geolocation": "locations and geography", "geography": "locations and geography",
    "locations": "locations and geography",
    "count": "counts and numbers", "counts": "counts and numbers",
    "number": "counts and numbers", "numbers": "counts and numbers", "counting": "counts and numbers",
    "letters": "letters and text", "text": "letters and text", "ocr": "letters and text",
    "object": "objects", "animal": "animals", "person": "people",
    "background": "scenes and settings", "background scene": "scenes and settings",
    "scene": "scenes and settings", "scenes": "scenes and settings", "setting": "scenes and settings",
    "season": "seasons and weather", "seasons": "seasons and weather", "weather": "seasons and weather",
    "style": "photographic and artistic styles", "styles": "photographic and artistic styles",
    "emotion": "emotions",
    "position": "image position", "location in image": "image position", "region": "image position",
    "image location": "image position", "spatial position": "image position",
}


def _norm(text: str) -> str:
    return " ".join(text.replace("-", " ").replace("_", " ").split()).casefold()


@dataclass(frozen=True)
class RoleAssignment:
    """A head's role, its score in ``[0, 1]`` and all ``(role, share)`` pairs, largest first."""

    role: str
    score: float
    shares: tuple[tuple[str, float], ...]


@dataclass(frozen=True)
class RoleMatch:
    """One head's match to a role query: ``score`` (see :func:`heads_for_role`) and the head's own role."""

    layer: int
    head: int
    score: float
    role: str


def _weights(explained_variance: Sequence[float], m: int) -> torch.Tensor:
    if isinstance(m, bool) or not isinstance(m, int) or m < 1:
        raise InputError(f"m (number of top texts) must be an int >= 1, got {m!r}.")
    ev = torch.tensor([float(v) for v in explained_variance[:m]], dtype=torch.float64).clamp_min(0)
    if ev.numel() == 0:
        return ev
    total = ev.sum()
    return ev / total if total > 0 else torch.full_like(ev, 1.0 / ev.numel())


def category_shares(categories: Sequence[str], explained_variance: Sequence[float],
                    m: int = DEFAULT_TOP_M) -> list[tuple[str, float]]:
    """Share of the first ``m`` texts' explained variance per category, largest first
    (ties in order of first appearance). Empty categories count as :data:`UNCATEGORISED`.
    If all ``m`` variances are zero the texts are weighted equally. Shares sum to 1."""
    if len(categories) != len(explained_variance):
        raise InputError(f"{len(categories)} categories but {len(explained_variance)} explained variances.")
    w = _weights(explained_variance, m)
    shares: dict[str, float] = {}
    for cat, wi in zip(categories[: len(w)], w.tolist()):
        key = cat or UNCATEGORISED
        shares[key] = shares.get(key, 0.0) + wi
    order = {c: i for i, c in enumerate(shares)}
    return sorted(shares.items(), key=lambda kv: (-kv[1], order[kv[0]]))


def assign_role(head: HeadSpan, *, m: int = DEFAULT_TOP_M, categorised: bool = True) -> RoleAssignment:
    """The role of one head (see the module docstring). ``categorised=False`` (a pool
    without categories) names the role after the head's first text. A head with no
    texts gets role ``""`` and score 0."""
    if not head.texts:
        return RoleAssignment("", 0.0, ())
    if categorised:
        shares = tuple(category_shares(head.categories, head.explained_variance, m))
    else:
        w = _weights(head.explained_variance, m)
        shares = tuple(zip(head.texts[: len(w)], w.tolist()))  # in TextSpan order
    return RoleAssignment(shares[0][0], float(shares[0][1]), shares)


def assign_roles(results: TextSpanResults, *, m: int = DEFAULT_TOP_M,
                 categorised: Optional[bool] = None) -> TextSpanResults:
    """Set ``role``, ``role_score`` and ``top_roles`` of every head (in place; returns ``results``).

    ``categorised=None`` decides from the texts: roles come from categories when the
    chosen texts of all heads carry at least two distinct non-empty categories.
    The method is recorded in ``results.info["roles"]``.
    """
    if categorised is None:
        cats = {c for h in results.heads for c in h.categories if c}
        categorised = len(cats) >= 2
    for h in results.heads:
        a = assign_role(h, m=m, categorised=categorised)
        h.role, h.role_score, h.top_roles = a.role, a.score, list(a.shares)
    results.info["roles"] = {
        "method": "category share of explained variance" if categorised else "first text",
        "top_m": m,
    }
    return results


def known_categories(results: TextSpanResults) -> list[str]:
    """Distinct categories of the chosen texts of all heads, in order of first appearance."""
    return list(dict.fromkeys(c or UNCATEGORISED for h in results.heads for c in h.categories))


def resolve_role(query: str, categories: Sequence[str]) -> Optional[str]:
    """The category among ``categories`` that ``query`` names, directly (case-insensitive)
    or through :data:`ROLE_ALIASES`; ``None`` if it names none of them."""
    q = _norm(query)
    by_norm = {_norm(c): c for c in categories}
    if q in by_norm:
        return by_norm[q]
    alias = ROLE_ALIASES.get(q)
    if alias is not None and _norm(alias) in by_norm:
        return by_norm[_norm(alias)]
    return None


def _free_text_scores(results: TextSpanResults, query: str, model: Any, m: int,
                      tokenizer: Optional[Callable]) -> dict[tuple[int, int], float]:
    from .zeroshot import text_embeddings

    texts = list(dict.fromkeys(t for h in results.heads for t in h.texts[:m]))
    emb = text_embeddings(model, [query] + texts, tokenizer=tokenizer).to(torch.float64)
    if emb.shape[1] != results.embed_dim:
        raise InputError(
            f"the model's text embeddings have D={emb.shape[1]} but the results have D={results.embed_dim}; "
            f"pass the model the results were computed with ({results.model or 'the bundled toy model'})."
        )
    q, rows = emb[0], {t: i + 1 for i, t in enumerate(texts)}
    scores = {}
    for h in results.heads:
        if not h.texts:
            scores[h.key] = float("-inf")
            continue
        w = _weights(h.explained_variance, m)
        sims = emb[[rows[t] for t in h.texts[: len(w)]]] @ q
        scores[h.key] = float(w @ sims)
    return scores


def heads_for_role(
    results: TextSpanResults,
    query: str,
    *,
    model: Any = None,
    top_n: Optional[int] = None,
    threshold: Optional[float] = None,
    m: int = DEFAULT_TOP_M,
    tokenizer: Optional[Callable] = None,
) -> list[RoleMatch]:
    """Heads ranked by how well they match a role, best first.

    Args:
        results: TextSpan results (:class:`~clipdecomp.textspan_results.TextSpanResults`).
        query: a category of the results' pool, an alias of one (:data:`ROLE_ALIASES`),
            or free text (needs ``model``); see the module docstring for the scores.
        model: a :class:`~clipdecomp.loading.LoadedModel` (or an open_clip model with
            ``tokenizer``), used only for free-text queries.
        top_n: keep at most this many heads.
        threshold: keep heads with ``score >= threshold``.
        m: number of leading texts per head that the scores use (as for roles).

    Returns:
        :class:`RoleMatch` list sorted by score (descending), ties by (layer, head).

    Raises:
        InputError: empty query, bad ``top_n``, or a free-text query (one that names no
            category of these results) without ``model``.
    """
    if not isinstance(query, str) or not query.strip():
        raise InputError(f"query must be a non-empty string (a role such as 'colours', or free text), got {query!r}.")
    if top_n is not None and (isinstance(top_n, bool) or not isinstance(top_n, int) or top_n < 1):
        raise InputError(f"top_n must be None or an int >= 1, got {top_n!r}.")
    category = resolve_role(query, known_categories(results))
    if category is not None:
        scores = {h.key: dict(category_shares(h.categories, h.explained_variance, m)).get(category, 0.0)
                  for h in results.heads}
    elif model is None:
        known = ", ".join(repr(c) for c in known_categories(results))
        raise InputError(
            f"{query!r} is not a role of these results (known: {known}; aliases such as 'colour', "
            f"'background', 'position'); for a free-text query pass model=... (the model the results "
            f"were computed with, {results.model or 'the bundled toy model'})."
        )
    else:
        scores = _free_text_scores(results, query, model, m, tokenizer)
    matches = [RoleMatch(h.layer, h.head, scores[h.key], h.role) for h in results.heads]
    if threshold is not None:
        matches = [r for r in matches if r.score >= threshold]
    matches.sort(key=lambda r: (-r.score, r.layer, r.head))
    return matches if top_n is None else matches[:top_n]
