"""Choosing the attention heads to ablate, and recording why.

Two ways in:

* explicitly, ``"L.H,L.H,..."`` (0-based layer and head indices), validated against the
  model's shape: :func:`parse_heads`, :func:`select_explicit`;
* by role: a TextSpan results file and one or more role queries ("geolocation",
  "background scene"), each resolved by :func:`clipdecomp.roles.heads_for_role` with a
  score ``threshold`` or ``top_n``: :func:`select_by_roles`.

Either way the result is a :class:`HeadSelection`: the heads, in (layer, head) order,
each with the reason it was chosen (role and score for role queries), printable
(:meth:`HeadSelection.describe`) and serialisable (:meth:`HeadSelection.to_json`) so the
choice travels with the repaired model.

:func:`random_heads` draws the random-heads baseline (as many heads, from the same
layers, seeded).
"""

from __future__ import annotations

import os
import random
import re
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Optional, Sequence, Union

from clipdecomp.errors import InputError
from clipdecomp.loading import vision_tower

__all__ = [
    "HeadChoice",
    "HeadSelection",
    "model_shape",
    "parse_heads",
    "format_heads",
    "select_explicit",
    "parse_roles",
    "SCORES",
    "select_by_roles",
    "random_heads",
]

Head = tuple[int, int]

_HEAD_RE = re.compile(r"^\s*L?(\d+)\s*[.:]\s*H?(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class HeadChoice:
    """One chosen head and why.

    Attributes:
        layer, head: 0-based indices.
        reason: ``"explicit"`` or ``"role"``.
        role: the role query that matched (role selection only).
        score: the head's score for the query (see :func:`select_by_roles`, ``score``).
        head_role: the head's own role (its dominant TextSpan category), for context.
    """

    layer: int
    head: int
    reason: str
    role: Optional[str] = None
    score: Optional[float] = None
    head_role: Optional[str] = None

    @property
    def label(self) -> str:
        """``"L5.H2"``."""
        return f"L{self.layer}.H{self.head}"

    def why(self) -> str:
        """Human-readable reason, e.g. ``role 'background scene' (score 0.631)``."""
        if self.reason == "role":
            s = f"role query {self.role!r}"
            if self.score is not None:
                s += f", score {self.score:.4g}"
            if self.head_role:
                s += f" (head's role: {self.head_role!r})"
            return s
        return "listed explicitly"


@dataclass
class HeadSelection:
    """The heads chosen for ablation, with provenance.

    Attributes:
        heads: the choices, sorted by (layer, head), no duplicates.
        method: ``"explicit"`` or ``"roles"``.
        n_layers, n_heads: the model's shape the heads were validated against.
        query: how they were chosen (e.g. ``{"roles": [...], "threshold": 0.5, "textspan": path}``).
    """

    heads: list[HeadChoice]
    method: str
    n_layers: int
    n_heads: int
    query: dict[str, Any] = field(default_factory=dict)

    def pairs(self) -> list[Head]:
        """``[(layer, head), ...]`` for :func:`clipdecomp.ablation.ablated_embedding`."""
        return [(c.layer, c.head) for c in self.heads]

    @property
    def layers(self) -> list[int]:
        """The distinct layers the chosen heads live in, ascending."""
        return sorted({c.layer for c in self.heads})

    def __len__(self) -> int:
        return len(self.heads)

    def spec(self) -> str:
        """The heads as an explicit ``--heads`` value, ``"5.2,5.4"``."""
        return format_heads(self.pairs())

    def describe(self) -> str:
        """Multi-line summary for printing: one line per head with its reason."""
        q = ", ".join(f"{k}={v!r}" for k, v in self.query.items() if v is not None)
        lines = [f"{len(self.heads)} head(s) selected ({self.method}{'; ' + q if q else ''}):"]
        lines += [f"  {c.label:<8} {c.why()}" for c in self.heads]
        if not self.heads:
            lines.append("  (none: the repaired model equals the base model)")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        """JSON-serialisable form (see :meth:`from_json`)."""
        return {
            "method": self.method,
            "n_layers": self.n_layers,
            "n_heads": self.n_heads,
            "query": dict(self.query),
            "heads": [asdict(c) for c in self.heads],
        }

    @staticmethod
    def from_json(obj: dict[str, Any]) -> "HeadSelection":
        try:
            return HeadSelection(
                heads=[HeadChoice(**h) for h in obj["heads"]],
                method=str(obj["method"]),
                n_layers=int(obj["n_layers"]),
                n_heads=int(obj["n_heads"]),
                query=dict(obj.get("query", {})),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise InputError(f"not a HeadSelection record ({type(e).__name__}: {e}).") from e


def model_shape(model: Any) -> tuple[int, int]:
    """``(n_layers, n_heads)`` of the image tower of a LoadedModel / CLIP / VisionTransformer."""
    visual = vision_tower(model)
    blocks = visual.transformer.resblocks
    return len(blocks), int(blocks[0].attn.num_heads)


def _range_text(n_layers: int, n_heads: int) -> str:
    return (
        f"this model has {n_layers} layers (0..{n_layers - 1}) and {n_heads} heads per layer "
        f"(0..{n_heads - 1})"
    )


def _check_shape(n_layers: int, n_heads: int) -> None:
    for v, what in ((n_layers, "n_layers"), (n_heads, "n_heads")):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise InputError(f"{what} must be a positive int, got {v!r}.")


def parse_heads(spec: Union[str, Iterable[Sequence[int]]], n_layers: int, n_heads: int) -> list[Head]:
    """Parse and validate a head list.

    Args:
        spec: ``"L.H,L.H,..."`` (0-based; ``"5.2"``, ``"L5.H2"`` and ``"5:2"`` are accepted;
            an empty string means no heads), or an iterable of ``(layer, head)`` pairs.
        n_layers, n_heads: the model's shape (:func:`model_shape`).

    Returns:
        The ``(layer, head)`` pairs in the order given.

    Raises:
        InputError: a malformed entry, an index out of range, or a duplicate, with a
            message naming the model's layer and head ranges.
    """
    _check_shape(n_layers, n_heads)
    rng = _range_text(n_layers, n_heads)
    items: list[tuple[str, Any, Any]] = []
    if isinstance(spec, str):
        for tok in (t for t in spec.split(",")):
            if not tok.strip():
                if spec.strip():
                    raise InputError(f"empty entry in the head list {spec!r}; expected 'L.H,L.H,...', e.g. '5.2,5.4'.")
                continue
            m = _HEAD_RE.match(tok)
            if not m:
                raise InputError(
                    f"malformed head {tok.strip()!r} in {spec!r}: expected LAYER.HEAD with 0-based "
                    f"integers, e.g. '5.2' or 'L5.H2'; {rng}."
                )
            items.append((tok.strip(), int(m.group(1)), int(m.group(2))))
    else:
        for item in spec:
            if not (isinstance(item, (tuple, list)) and len(item) == 2):
                raise InputError(f"head entries must be (layer, head) pairs, got {item!r}; {rng}.")
            items.append((repr(tuple(item)), item[0], item[1]))
    out: list[Head] = []
    seen: set[Head] = set()
    for text, l, h in items:
        for v, n, what in ((l, n_layers, "layer"), (h, n_heads, "head")):
            if isinstance(v, bool) or not isinstance(v, int):
                raise InputError(f"{what} index in {text} must be an int, got {v!r}; {rng}.")
            if not 0 <= v < n:
                raise InputError(f"{what} index {v} in {text} is out of range: {rng}.")
        if (l, h) in seen:
            raise InputError(f"head L{l}.H{h} is listed twice in the head list; list each head once.")
        seen.add((l, h))
        out.append((l, h))
    return out


def format_heads(heads: Iterable[Head]) -> str:
    """``[(5, 2), (5, 4)]`` -> ``"5.2,5.4"`` (the inverse of :func:`parse_heads`)."""
    return ",".join(f"{l}.{h}" for l, h in heads)


def select_explicit(spec: Union[str, Iterable[Sequence[int]]], n_layers: int, n_heads: int) -> HeadSelection:
    """A :class:`HeadSelection` from an explicit head list (see :func:`parse_heads`)."""
    pairs = sorted(parse_heads(spec, n_layers, n_heads))
    return HeadSelection(
        heads=[HeadChoice(l, h, "explicit") for l, h in pairs],
        method="explicit",
        n_layers=n_layers,
        n_heads=n_heads,
        query={"heads": format_heads(pairs)},
    )


def parse_roles(spec: Union[str, Sequence[str]]) -> list[str]:
    """``"geolocation, background scene"`` -> ``["geolocation", "background scene"]``
    (comma-separated; blanks dropped; duplicates removed, order kept)."""
    parts = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for p in parts:
        if not isinstance(p, str):
            raise InputError(f"role queries must be strings, got {p!r}.")
        p = " ".join(p.split())
        if p and p not in out:
            out.append(p)
    if not out:
        raise InputError(f"no role query in {spec!r}; pass e.g. --roles 'geolocation,background scene'.")
    return out


SCORES: tuple[str, ...] = ("share", "variance")


def _role_matches(results: Any, query: str, *, model: Any, score: str, top_n: Optional[int], threshold: Optional[float]) -> list[Any]:
    """``heads_for_role`` matches of one query, re-scored by ``score``, filtered, best first."""
    from clipdecomp.roles import DEFAULT_TOP_M, RoleMatch, heads_for_role

    if score == "share":
        return heads_for_role(results, query, model=model, top_n=top_n, threshold=threshold)
    ev = {h.key: float(sum(max(0.0, float(v)) for v in h.explained_variance[:DEFAULT_TOP_M])) for h in results.heads}
    out = [RoleMatch(m.layer, m.head, float(m.score) * ev[(m.layer, m.head)] if ev[(m.layer, m.head)] > 0 else 0.0, m.role)
           for m in heads_for_role(results, query, model=model)]  # a head with no texts explains nothing
    if threshold is not None:
        out = [m for m in out if m.score >= threshold]
    out.sort(key=lambda m: (-m.score, m.layer, m.head))
    return out if top_n is None else out[:top_n]


def select_by_roles(
    results: Any,
    roles: Union[str, Sequence[str]],
    n_layers: int,
    n_heads: int,
    *,
    model: Any = None,
    top_n: Optional[int] = None,
    threshold: Optional[float] = None,
    score: str = "share",
    source: Optional[Union[str, os.PathLike]] = None,
) -> HeadSelection:
    """Heads whose TextSpan role matches any of ``roles``.

    Each query is scored for every head by :func:`clipdecomp.roles.heads_for_role`;
    heads are kept by ``threshold`` and/or ``top_n`` (per query); the union over queries
    is taken, and a head matched by several queries keeps its best-scoring one.

    Scores (``score``):

    * ``"share"``: ``heads_for_role``'s score as is -- for a role category, the share of
      the head's first ``m = roles.DEFAULT_TOP_M`` TextSpan texts' explained variance
      that belongs to texts of that category (in [0, 1]); for free text, the
      variance-weighted mean cosine similarity.
    * ``"variance"``: that score times the summed explained variance of the same ``m``
      texts, i.e. for a category the *amount* of the head's output variance that the
      role's texts explain (joint-space units, so thresholds are model-specific: prefer
      ``top_n``). It ranks a head that writes a lot of scene information above one
      whose few, small outputs happen to be all scene.

    Args:
        results: a :class:`clipdecomp.textspan_results.TextSpanResults`, or a path to a
            results file (loaded with ``TextSpanResults.load``).
        roles: the queries, a list or a comma-separated string.
        n_layers, n_heads: the model's shape; matches outside it are an error (results of
            another model).
        model: passed on to ``heads_for_role`` (it may embed free-text queries).
        top_n, threshold: at least one is required; ``top_n`` applies per query.
        score: ``"share"`` (default) or ``"variance"``.
        source: the results file's path, recorded in the query.

    Raises:
        InputError: no query, neither ``top_n`` nor ``threshold``, an unknown ``score``,
            or results that do not fit the model.
    """
    _check_shape(n_layers, n_heads)
    if top_n is None and threshold is None:
        raise InputError(
            "a role query ranks every head; pass a score threshold (--threshold, e.g. 0.5) or a count "
            "(--top-n, per query) to choose among them."
        )
    if score not in SCORES:
        raise InputError(f"score must be one of {list(SCORES)}, got {score!r}.")
    queries = parse_roles(roles)
    if isinstance(results, (str, os.PathLike)):
        from clipdecomp.textspan_results import TextSpanResults

        source = source or results
        results = TextSpanResults.load(results)
    best: dict[Head, HeadChoice] = {}
    for q in queries:
        for m in _role_matches(results, q, model=model, score=score, top_n=top_n, threshold=threshold):
            l, h = int(m.layer), int(m.head)
            if not (0 <= l < n_layers and 0 <= h < n_heads):
                raise InputError(
                    f"the TextSpan results name head L{l}.H{h}, but {_range_text(n_layers, n_heads)}: "
                    "are they the results of another model?"
                )
            value = float(m.score)
            choice = HeadChoice(l, h, "role", role=q, score=value, head_role=str(m.role) if m.role else None)
            old = best.get((l, h))
            if old is None or value > (old.score if old.score is not None else float("-inf")):
                best[(l, h)] = choice
    return HeadSelection(
        heads=[best[k] for k in sorted(best)],
        method="roles",
        n_layers=n_layers,
        n_heads=n_heads,
        query={
            "roles": queries,
            "score": score,
            "top_n": top_n,
            "threshold": threshold,
            "textspan": None if source is None else os.fspath(source),
        },
    )


def random_heads(layers: Sequence[int], n_heads: int, k: int, seed: int) -> list[Head]:
    """``k`` distinct heads drawn uniformly from all heads of ``layers`` (seeded, sorted).

    The random-heads baseline of the paper: as many heads as were chosen, from the same
    layers. The draw may include chosen heads (it is uniform over the layers' heads).
    """
    pool = [(l, h) for l in sorted(set(layers)) for h in range(n_heads)]
    if not 0 <= k <= len(pool):
        raise InputError(f"cannot draw {k} distinct heads from {len(pool)} heads of layers {sorted(set(layers))}.")
    return sorted(random.Random(seed).sample(pool, k))
