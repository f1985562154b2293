"""The committed toy model (assets/toyclip) reaches the zero-shot bars of the toy world
on a fixed-seed sample of held-out scenes (every factor drawn independently, no spurious cue)."""

from __future__ import annotations

import pytest

from clipdecomp.loading import load_model
from clipdecomp.toyworld.evaluate import FACTOR_BARS, heldout_scenes, zero_shot_factor_accuracy

N_SCENES = 500
MARGIN = 0.03  # sampling noise on 500 scenes: the model card's figures are on 1,000
# Texture has no bar; this floor holds the level reached (0.778 and 0.764 on 1,000 scenes by
# the last two models; 0.766 on these 500), so that a retrained model cannot regress silently.
REACHED_FLOORS = {"texture": 0.75}


@pytest.fixture(scope="module")
def accuracy() -> dict[str, float]:
    model = load_model()
    return zero_shot_factor_accuracy(model.clip, model.tokenizer, heldout_scenes(N_SCENES))


@pytest.mark.parametrize("factor", [f for f, bar in FACTOR_BARS.items() if bar > 0 and f not in REACHED_FLOORS])
def test_bundled_model_meets_the_zero_shot_bar(accuracy, factor):
    assert accuracy[factor] >= FACTOR_BARS[factor] - MARGIN, f"{factor}: {accuracy[factor]:.3f} < bar {FACTOR_BARS[factor]}"


@pytest.mark.parametrize("factor", sorted(REACHED_FLOORS))
def test_bundled_model_keeps_the_level_reached(accuracy, factor):
    assert accuracy[factor] >= REACHED_FLOORS[factor], f"{factor}: {accuracy[factor]:.3f} < {REACHED_FLOORS[factor]}"
