"""Captions for toy-world scenes, and the zero-shot prompts that score them.

Captions name a random subset of the factors through varied templates, the
way web alt-text names some properties of a photo and not others. Training can
force one factor into every caption (the factor a batch group differs in).
"""

from __future__ import annotations

import numpy as np

from .world import BACKGROUNDS, COLOURS, COUNTS, REGIONS, SHAPES, TEXTURES, Scene

COUNT_WORDS = {1: "one", 2: "two", 3: "three", 4: "four"}
PLURALS = {"cross": "crosses"}

_REGION_PHRASES = {
    "top left": ("in the top left", "in the top left corner", "at the upper left"),
    "top right": ("in the top right", "in the top right corner", "at the upper right"),
    "bottom left": ("in the bottom left", "in the bottom left corner", "at the lower left"),
    "bottom right": ("in the bottom right", "in the bottom right corner", "at the lower right"),
    "centre": ("in the centre", "in the middle", "at the center"),
}
_BACKGROUND_PHRASES = {
    "water": ("on water", "on the water", "over a lake"),
    "grass": ("on grass", "on the grass", "on a lawn"),
    "sand": ("on sand", "on the sand", "on a beach"),
    "snow": ("on snow", "on the snow", "in the snow"),
    "night sky": ("on a night sky", "against the night sky", "at night"),
    "forest": ("in a forest", "in the forest", "among trees"),
}
_TEXTURE_WORDS = {"plain": "plain", "striped": "striped", "dotted": "dotted", "checkered": "checkered"}
_PREFIXES = ("", "", "a photo of ", "an image of ", "a picture of ", "a drawing of ")

# Probability that a caption names each factor when it is not forced.
MENTION_PROB = {"shape": 0.85, "colour": 0.7, "texture": 0.5, "count": 0.6, "region": 0.6, "background": 0.6}


def plural(shape: str) -> str:
    return PLURALS.get(shape, shape + "s")


def noun_phrase(shape: str | None, colour: str | None, texture: str | None, count: int | None) -> str:
    """`"three red striped stars"`, `"a blue object"`, `"two shapes"` ..."""
    many = count is not None and count > 1
    noun = (plural(shape) if many else shape) if shape else ("objects" if many else "object")
    words = [w for w in (colour, _TEXTURE_WORDS.get(texture or "", None)) if w]
    if count is None or count == 1:
        first = (words or [noun])[0]
        return " ".join(["an" if first[0] in "aeiou" else "a", *words, noun])
    return " ".join([COUNT_WORDS[count], *words, noun])


def caption(scene: Scene, rng: np.random.Generator, force: tuple[str, ...] = ()) -> str:
    """One random caption of `scene`, always naming the factors in `force`."""
    named = {f for f, p in MENTION_PROB.items() if f in force or rng.random() < p}
    if not named:
        named = {"shape"}
    phrase = noun_phrase(
        scene.shape if "shape" in named else None,
        scene.colour if "colour" in named else None,
        scene.texture if "texture" in named else None,
        scene.count,
    )
    if "count" not in named and scene.count > 1:
        phrase = phrase.split(" ", 1)[1]  # "three red stars" -> "red stars": plural, number unnamed
    if "count" in named and scene.count == 1 and rng.random() < 0.5:
        phrase = phrase.replace("a ", "a single ", 1).replace("an ", "a single ", 1)
    tails = []
    if "region" in named:
        options = _REGION_PHRASES[scene.region]
        tails.append(options[rng.integers(len(options))])
    if "background" in named:
        options = _BACKGROUND_PHRASES[scene.background]
        tails.append(options[rng.integers(len(options))])
    rng.shuffle(tails)
    return (_PREFIXES[rng.integers(len(_PREFIXES))] + " ".join([phrase, *tails])).strip()


def zero_shot_prompts(factor: str) -> dict[object, list[str]]:
    """Prompt ensembles per value of one factor.

    Each value is named inside noun phrases that run over every shape and every
    count ("a red circle", "two red circles", ... "four red hearts"): captions
    name single objects in the singular and groups in the plural, so a prompt
    set in the singular alone would only describe a quarter of the scenes.
    Averaging the normalised text embeddings of an ensemble gives the class embedding.
    """
    def phrases(colour: str | None = None, texture: str | None = None, shape: str | None = None) -> list[str]:
        shapes = [shape] if shape else list(SHAPES)
        return [noun_phrase(s, colour, texture, n) for s in shapes for n in COUNTS]

    if factor == "colour":
        return {c: phrases(colour=c) for c in COLOURS}
    if factor == "shape":
        return {s: phrases(shape=s) for s in SHAPES}
    if factor == "texture":
        return {t: phrases(texture=t) for t in TEXTURES}
    if factor == "count":
        return {n: [noun_phrase(s, None, None, n) for s in SHAPES] for n in COUNTS}
    if factor == "region":
        return {r: [f"{p} {_REGION_PHRASES[r][0]}" for p in phrases()] for r in REGIONS}
    if factor == "background":
        return {b: [f"{p} {_BACKGROUND_PHRASES[b][0]}" for p in phrases()] for b in BACKGROUNDS}
    raise ValueError(f"unknown factor {factor!r}; accepted: colour, shape, texture, count, region, background")
