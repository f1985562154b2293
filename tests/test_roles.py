"""Head roles (clipdecomp.roles) on hand-made TextSpan results, and free-text role
queries through a random-init toy model's text encoder."""

from __future__ import annotations

import warnings

import pytest
import torch

from clipdecomp.errors import InputError
from clipdecomp.roles import (
    UNCATEGORISED,
    assign_role,
    assign_roles,
    category_shares,
    heads_for_role,
    resolve_role,
)
from clipdecomp.textspan_results import HeadSpan, TextSpanResults

D = 6


def head(layer: int, h: int, texts: list[str], categories: list[str], ev: list[float], dim: int = D) -> HeadSpan:
    k = len(texts)
    total = sum(ev) * 2
    cum = torch.tensor(ev, dtype=torch.float64).cumsum(0) / total
    return HeadSpan(layer, h, texts, categories, list(range(k)), ev, cum.tolist(), total, torch.eye(dim)[:k],
                    torch.zeros(dim))


def make_results(heads: list[HeadSpan], layers=(4, 5)) -> TextSpanResults:
    return TextSpanResults(model="toy", pretrained=None, pool="general", layers=list(layers), k=12, rank=80,
                           n_images=100, seed=0, embed_dim=int(heads[0].mean.shape[0]), heads=heads)


@pytest.fixture
def results() -> TextSpanResults:
    colour = head(4, 0, ["red", "blue", "a circle", "green"], ["colours", "colours", "shapes", "colours"],
                  [5.0, 3.0, 1.0, 1.0])
    shape = head(4, 1, ["a star", "red", "a square"], ["shapes", "colours", "shapes"], [4.0, 4.0, 2.0])
    scene = head(5, 0, ["on water", "a lake", "a star"], ["scenes and settings", "scenes and settings", "shapes"],
                 [6.0, 1.0, 3.0])
    return assign_roles(make_results([scene, shape, colour]))


def test_shares_are_explained_variance_fractions_of_the_first_m_texts():
    cats = ["a", "b", "a", "c", "b"]
    ev = [4.0, 3.0, 2.0, 1.0, 100.0]  # the 5th text is beyond m=4 and must not count
    shares = category_shares(cats, ev, m=4)
    assert [c for c, _ in shares] == ["a", "b", "c"]
    assert [s for _, s in shares] == pytest.approx([0.6, 0.3, 0.1])
    assert category_shares(cats, ev, m=10)[0] == ("b", pytest.approx(103 / 110))


def test_shares_ties_empty_categories_and_zero_variance():
    # equal shares keep the order of first appearance; "" counts as uncategorised
    assert category_shares(["x", "", "x", ""], [1.0, 1.0, 1.0, 1.0]) == [("x", 0.5), (UNCATEGORISED, 0.5)]
    # all-zero variances: texts weighted equally (and tiny negative rounding noise clamps to 0)
    assert category_shares(["p", "q", "q"], [0.0, -1e-18, 0.0]) == [("q", pytest.approx(2 / 3)), ("p", pytest.approx(1 / 3))]
    with pytest.raises(InputError, match="categories"):
        category_shares(["a"], [1.0, 2.0])
    with pytest.raises(InputError, match="m"):
        category_shares(["a"], [1.0], m=0)


def test_assign_role_is_the_argmax_share(results):
    colour = results.head(4, 0)
    assert (colour.role, colour.role_score) == ("colours", pytest.approx(0.9))
    assert colour.top_roles == [("colours", pytest.approx(0.9)), ("shapes", pytest.approx(0.1))]
    shape = results.head(4, 1)  # shapes 4+2 vs colours 4
    assert (shape.role, shape.role_score) == ("shapes", pytest.approx(0.6))
    scene = results.head(5, 0)
    assert (scene.role, scene.role_score) == ("scenes and settings", pytest.approx(0.7))
    assert results.info["roles"] == {"method": "category share of explained variance", "top_m": 10}


def test_uncategorised_pool_names_the_role_after_the_first_text():
    h = head(4, 0, ["stripes", "zebra", "lines"], ["word", "word", "word"], [2.0, 1.0, 1.0])
    a = assign_role(h, categorised=False)
    assert (a.role, a.score) == ("stripes", pytest.approx(0.5))
    assert a.shares == (("stripes", 0.5), ("zebra", 0.25), ("lines", 0.25))
    r = assign_roles(make_results([h], layers=(4,)))  # a single category: inferred as uncategorised
    assert r.head(4, 0).role == "stripes" and r.info["roles"]["method"] == "first text"
    empty = HeadSpan(4, 1, [], [], [], [], [], 0.0, torch.zeros(0, D), torch.zeros(D))
    assert assign_role(empty) == assign_role(empty, categorised=False)
    assert assign_role(empty).role == ""


@pytest.mark.parametrize("query, category", [
    ("colours", "colours"), ("COLOURS", "colours"), ("color", "colours"), ("colour", "colours"),
    ("shape", "shapes"), ("background", "scenes and settings"), ("background scene", "scenes and settings"),
    ("Background-Scene", "scenes and settings"),
])
def test_resolve_role_names_and_aliases(query, category):
    assert resolve_role(query, ["colours", "shapes", "scenes and settings"]) == category


def test_resolve_role_needs_the_category_in_the_results():
    assert resolve_role("geolocation", ["colours", "locations and geography"]) == "locations and geography"
    assert resolve_role("geolocation", ["colours"]) is None
    assert resolve_role("stripy things", ["colours"]) is None


def test_heads_for_role_by_category(results):
    got = heads_for_role(results, "colour")
    assert [(m.layer, m.head) for m in got] == [(4, 0), (4, 1), (5, 0)]
    assert [m.score for m in got] == pytest.approx([0.9, 0.4, 0.0])
    assert [m.role for m in got] == ["colours", "shapes", "scenes and settings"]
    assert [(m.layer, m.head) for m in heads_for_role(results, "shapes")] == [(4, 1), (5, 0), (4, 0)]
    assert [(m.layer, m.head) for m in heads_for_role(results, "shapes", top_n=1)] == [(4, 1)]
    assert [(m.layer, m.head) for m in heads_for_role(results, "background", threshold=0.5)] == [(5, 0)]
    assert heads_for_role(results, "colours", threshold=0.95) == []


def test_heads_for_role_errors(results):
    with pytest.raises(InputError, match="pass model="):
        heads_for_role(results, "things with stripes")
    with pytest.raises(InputError, match="non-empty"):
        heads_for_role(results, "  ")
    with pytest.raises(InputError, match="top_n"):
        heads_for_role(results, "colours", top_n=0)


@pytest.fixture(scope="module")
def toy_model():
    from clipdecomp.loading import load_model
    from clipdecomp.registry import register_model_configs

    register_model_configs()
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        return load_model("toyclip-vit")


def test_heads_for_role_free_text_is_the_weighted_cosine(toy_model):
    from clipdecomp.zeroshot import text_embeddings

    query = "a striped yellow heart"
    exact = head(4, 0, [query, "a dotted blue star"], ["shapes", "shapes"], [3.0, 0.0], dim=64)  # all weight on the query
    other = head(4, 1, ["on water", "two squares", "a dotted blue star"], ["scenes and settings", "counts", "shapes"],
                 [2.0, 1.0, 1.0], dim=64)
    r = assign_roles(make_results([exact, other], layers=(4,)))
    got = heads_for_role(r, query, model=toy_model)
    assert [(m.layer, m.head) for m in got] == [(4, 0), (4, 1)]
    assert got[0].score == pytest.approx(1.0, abs=1e-5)
    e = text_embeddings(toy_model, [query, "on water", "two squares", "a dotted blue star"]).double()
    expected = float((e[1:] @ e[0]) @ torch.tensor([0.5, 0.25, 0.25], dtype=torch.float64))
    assert got[1].score == pytest.approx(expected, abs=1e-5)
    # a category query never needs the model, a free-text one cannot use a model of another width
    assert heads_for_role(r, "shapes", model=toy_model)[0].score == pytest.approx(1.0)
    wide = make_results([head(4, 0, ["x"], ["shapes"], [1.0], dim=7)], layers=(4,))
    with pytest.raises(InputError, match="D=64"):
        heads_for_role(wide, "something else", model=toy_model)
