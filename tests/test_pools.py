"""Tests for the TextSpan text pools and their loaders (clipdecomp.pools)."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from clipdecomp import pools
from clipdecomp.pools import (
    GENERAL_CATEGORIES,
    POOL_NAMES,
    TOY_ROLE_CATEGORIES,
    TextPool,
    category_names,
    load_pool,
    random_pool_embeddings,
    random_text_pool,
)

REPO = Path(__file__).resolve().parent.parent

# The toy world's values, by role (see the project brief / clipdecomp.toyworld).
TOY_VALUES: dict[str, tuple[str, ...]] = {
    "shape": ("circle", "square", "triangle", "star", "cross", "diamond", "heart", "hexagon"),
    "colour": ("red", "green", "blue", "yellow", "orange", "purple", "pink", "white", "cyan", "brown"),
    "texture": ("plain", "striped", "dotted", "checkered"),
    "count": ("one", "two", "three", "four"),
    "region": ("top left", "top right", "bottom left", "bottom right", "centre"),
    "background": ("water", "grass", "sand", "snow", "night sky", "forest"),
}


def _key(t: str) -> str:
    return " ".join(t.split()).casefold()


def _value_regex(value: str) -> re.Pattern[str]:
    # whole words; a space in the value may also be a hyphen ("top-left")
    body = r"[\s-]".join(re.escape(w) for w in value.split())
    return re.compile(rf"\b{body}\b", re.IGNORECASE)


@pytest.fixture(scope="module")
def general() -> TextPool:
    return load_pool("general")


@pytest.fixture(scope="module")
def words() -> TextPool:
    return load_pool("words")


def test_constants() -> None:
    assert POOL_NAMES == ("general", "words", "random")
    if not os.environ.get("CLIPDECOMP_ASSETS"):
        assert pools.ASSETS_DIR == REPO / "assets"
    assert (pools.ASSETS_DIR / "pools" / "general.txt").is_file()
    assert set(TOY_ROLE_CATEGORIES) == set(TOY_VALUES)
    assert set(TOY_ROLE_CATEGORIES.values()) <= set(GENERAL_CATEGORIES)


def test_builtin_pools_load_with_sizes(general: TextPool, words: TextPool) -> None:
    assert general.name == "general" and words.name == "words"
    assert len(general) >= 3000 and len(words) >= 3000
    assert len(general.texts) == len(general.categories)
    assert len(words.texts) == len(words.categories)
    big, small = max(len(general), len(words)), min(len(general), len(words))
    assert (big - small) / big <= 0.05, (len(general), len(words))


@pytest.mark.parametrize("spec", ["general", "words"])
def test_builtin_files_have_no_duplicates_or_empties(spec: str) -> None:
    # check the raw file, not only the de-duplicating loader
    lines = [ln.strip() for ln in pools.pool_path(spec).read_text(encoding="utf-8").splitlines()]
    texts = [ln for ln in lines if ln and not ln.startswith("#")]
    dup = [k for k, c in Counter(_key(t) for t in texts).items() if c > 1]
    assert not dup, dup[:10]
    assert len(load_pool(spec)) == len(texts)


def test_general_texts_are_short(general: TextPool) -> None:
    lengths = [len(t.split()) for t in general.texts]
    assert min(lengths) >= 1 and max(lengths) <= 8
    # mostly proper descriptions (2..8 words), single words are the exception
    assert sum(n >= 2 for n in lengths) / len(lengths) > 0.9


def test_words_pool_is_common_alphabetic_words(words: TextPool) -> None:
    assert set(words.categories) == {"word"}
    assert all(w.isascii() and w.isalpha() and len(w) >= 3 and w == w.lower() for w in words.texts)
    # frequency order: very common words come first
    assert {"the", "and", "for", "that"} <= set(words.texts[:20])


def test_general_categories_present_and_substantial(general: TextPool) -> None:
    counts = Counter(general.categories)
    assert category_names(general) == list(GENERAL_CATEGORIES)
    for cat in GENERAL_CATEGORIES:
        assert counts[cat] >= 150, (cat, counts[cat])
    assert "" not in counts  # every line sits under a header


@pytest.mark.parametrize(
    "role,value", [(r, v) for r, vals in TOY_VALUES.items() for v in vals]
)
def test_toy_values_named_in_their_category(general: TextPool, role: str, value: str) -> None:
    cat = TOY_ROLE_CATEGORIES[role]
    rx = _value_regex(value)
    hits = [t for t, c in zip(general.texts, general.categories) if c == cat and rx.search(t)]
    assert len(hits) >= 3, (role, value, hits)


def test_toy_values_match_toy_world(general: TextPool) -> None:
    """The toy world's own factor values (if that module is present) all appear too."""
    world = pytest.importorskip("clipdecomp.toyworld.world")
    number_words = {1: "one", 2: "two", 3: "three", 4: "four", 5: "five", 6: "six"}
    for role, cat in TOY_ROLE_CATEGORIES.items():
        values = world.FACTOR_VALUES[role]
        for v in values:
            word = number_words.get(v, str(v)) if isinstance(v, int) else v
            rx = _value_regex(word)
            hits = sum(1 for t, c in zip(general.texts, general.categories) if c == cat and rx.search(t))
            assert hits >= 3, (role, v, hits)


def test_user_file_with_headers(tmp_path: Path) -> None:
    f = tmp_path / "mine.txt"
    f.write_text(
        "# a comment line, ignored\n"
        "  untagged line  \n"
        "\n"
        "# category: fruit\n"
        "an apple\n"
        "a   ripe banana\n"
        "An Apple\n"  # duplicate (case-insensitive): dropped
        "#category:Vehicles\n"
        "a red car\n"
        "a ripe banana\n"  # duplicate after whitespace normalisation: first kept
        "   \n",
        encoding="utf-8",
    )
    p = load_pool(str(f))
    assert p.name == "mine"
    assert p.texts == ["untagged line", "an apple", "a ripe banana", "a red car"]
    assert p.categories == ["", "fruit", "fruit", "Vehicles"]
    assert category_names(p) == ["", "fruit", "Vehicles"]
    assert load_pool(f).texts == p.texts  # Path objects work too


def test_assets_dir_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pools").mkdir()
    (tmp_path / "pools" / "words.txt").write_text("alpha\nbeta\nalpha\n", encoding="utf-8")
    monkeypatch.setattr(pools, "ASSETS_DIR", tmp_path)
    p = load_pool("words")
    assert p.texts == ["alpha", "beta"] and p.categories == ["word", "word"]
    with pytest.raises(ValueError, match="general"):
        load_pool("general")  # not present under the overridden folder


def test_env_var_sets_assets_dir(tmp_path: Path) -> None:
    env = dict(os.environ, CLIPDECOMP_ASSETS=str(tmp_path))
    out = subprocess.run(
        [sys.executable, "-c", "from clipdecomp import pools; print(pools.ASSETS_DIR)"],
        env=env, capture_output=True, text=True, check=True, cwd=REPO,
    )
    assert Path(out.stdout.strip()) == tmp_path


def test_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"'general'.*'words'"):
        load_pool(str(tmp_path / "does_not_exist.txt"))
    with pytest.raises(ValueError, match=r"unknown text pool 'generl'.*'general'"):
        load_pool("generl")
    with pytest.raises(ValueError, match="random_pool_embeddings"):
        load_pool("random")
    with pytest.raises(ValueError, match="'general'"):
        load_pool("")
    empty = tmp_path / "empty.txt"
    empty.write_text("# category: x\n# only comments\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match="no texts"):
        load_pool(str(empty))


def test_random_pool_unit_norm_and_deterministic() -> None:
    a = random_pool_embeddings(500, 64, seed=3)
    assert a.shape == (500, 64) and a.dtype == torch.float32
    torch.testing.assert_close(a.norm(dim=1), torch.ones(500), rtol=0, atol=1e-5)
    assert torch.equal(a, random_pool_embeddings(500, 64, seed=3))
    assert not torch.allclose(a, random_pool_embeddings(500, 64, seed=4))
    # the global RNG is untouched
    torch.manual_seed(0)
    before = torch.rand(3)
    torch.manual_seed(0)
    random_pool_embeddings(10, 8, seed=1)
    assert torch.equal(before, torch.rand(3))
    # roughly isotropic: mean near zero, directions nearly orthogonal in high dim
    b = random_pool_embeddings(2000, 512, seed=0)
    assert b.mean(0).norm() < 0.1
    off = (b[:100] @ b[:100].T - torch.eye(100)).abs().max()
    assert off < 0.3
    with pytest.raises(ValueError):
        random_pool_embeddings(0, 8)


def test_random_text_pool() -> None:
    p = random_text_pool(4)
    assert p.name == "random" and len(p) == 4
    assert set(p.categories) == {"random"}
    assert len(set(p.texts)) == 4


def test_textpool_is_frozen_and_checked() -> None:
    p = TextPool(name="x", texts=["a"], categories=["c"])
    with pytest.raises(Exception):
        p.name = "y"  # type: ignore[misc]
    with pytest.raises(ValueError):
        TextPool(name="x", texts=["a", "b"], categories=["c"])


def test_make_words_pool_script(tmp_path: Path) -> None:
    pytest.importorskip("wordfreq")
    out = tmp_path / "w.txt"
    script = REPO / "tools" / "make_words_pool.py"
    r = subprocess.run([sys.executable, str(script), "--n", "200", "--out", str(out)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    got = out.read_text(encoding="utf-8").split("\n")
    assert got[-1] == "" and len(got[:-1]) == 200
    # same procedure as the committed file: its first 200 lines
    assert got[:-1] == load_pool("words").texts[:200]
    assert not list(tmp_path.glob("*.tmp"))  # atomic write left no temp file
    h = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True)
    assert h.returncode == 0 and "--n" in h.stdout and "--out" in h.stdout


def test_words_pool_leaves_out_profanity_and_slurs() -> None:
    import importlib.util

    spec = importlib.util.spec_from_file_location("make_words_pool", REPO / "tools" / "make_words_pool.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    words = {w.lower() for w in load_pool("words").texts}
    assert len(module.EXCLUDED) > 10 and not module.EXCLUDED & words
