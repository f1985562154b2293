"""Training batches for the toy world: groups of hard negatives.

A contrastive loss only learns what tells the images of a batch apart. In a
batch of independent scenes the easy factors (colour, background) already do,
and shape or region stay at chance (see shared/notes/toyworld-trials.md). So a
batch is made of small groups: the scenes of a group share every factor but one
(the group's focus), and every caption of the group names the focus. Telling
the group apart then requires exactly that factor.
"""

from __future__ import annotations

import numpy as np
import torch

from .captions import caption
from .world import FACTOR_VALUES, IMAGE_SIZE, Scene, place_objects, render, sample_scene, spurious_background

# How often a group focuses on each factor; None: independent scenes, no forced factor.
FOCUS_PROBS: dict[str | None, float] = {
    "shape": 0.35,
    "region": 0.20,
    "count": 0.25,
    "texture": 0.10,
    "colour": 0.02,  # colour and background separate groups anyway: they need no groups of their own
    "background": 0.02,
    None: 0.06,
}


def sample_group(
    rng: np.random.Generator, group_size: int, spurious: float | None, focus_probs: dict[str | None, float] | None = None
) -> tuple[list[Scene], str | None]:
    """Scenes of one group and its focus factor."""
    probs = focus_probs or FOCUS_PROBS
    focuses = list(probs)
    focus = focuses[rng.choice(len(focuses), p=np.array(list(probs.values())))]
    if focus is None:
        return [sample_scene(rng, spurious=spurious) for _ in range(group_size)], None
    base = sample_scene(rng, spurious=spurious)
    values = FACTOR_VALUES[focus]
    chosen = [values[i] for i in rng.choice(len(values), size=min(group_size, len(values)), replace=False)]
    shape = base.shape
    if focus == "background" and spurious is not None and shape in ("triangle", "square"):
        # A background-focus group would break the shape-background correlation.
        others = [s for s in FACTOR_VALUES["shape"] if s not in ("triangle", "square")]
        shape = others[rng.integers(len(others))]
    scenes = []
    for value in chosen:
        f = {**base.factors(), "shape": shape, focus: value}
        if focus == "shape" and spurious is not None:
            f["background"] = spurious_background(str(value), spurious, rng, default=base.background)
        objects = place_objects(str(f["region"]), int(f["count"]), rng)
        scenes.append(Scene(objects=objects, seed=int(rng.integers(2**31)), **f))  # type: ignore[arg-type]
    return scenes, focus


def to_tensor(images: list, mean: tuple[float, ...], std: tuple[float, ...]) -> torch.Tensor:
    """PIL images (already IMAGE_SIZE square) -> normalised float batch `[B, 3, H, W]`."""
    arr = np.stack([np.asarray(im, dtype=np.float32) for im in images]) / 255.0
    x = torch.from_numpy(arr).permute(0, 3, 1, 2)
    m = torch.tensor(mean, dtype=torch.float32)[None, :, None, None]
    s = torch.tensor(std, dtype=torch.float32)[None, :, None, None]
    return (x - m) / s


def training_batch(
    seed: int,
    step: int,
    batch_size: int,
    group_size: int,
    spurious: float | None,
    focus_probs: dict[str | None, float] | None = None,
) -> tuple[list, list[str], list[Scene]]:
    """The images, captions and scenes of one training step; a pure function of (seed, step)."""
    rng = np.random.default_rng([seed, step])
    images, captions, scenes = [], [], []
    while len(scenes) < batch_size:
        group, focus = sample_group(rng, group_size, spurious, focus_probs)
        for scene in group[: batch_size - len(scenes)]:
            image, _ = render(scene, rng)
            images.append(image)
            captions.append(caption(scene, rng, force=(focus,) if focus else ()))
            scenes.append(scene)
    assert images[0].size == (IMAGE_SIZE, IMAGE_SIZE)
    return images, captions, scenes
