"""The toy world's generator, captions and training loop."""

from __future__ import annotations

import json

import numpy as np
import pytest

from clipdecomp.toyworld import world
from clipdecomp.toyworld.batches import sample_group, training_batch
from clipdecomp.toyworld.captions import caption, zero_shot_prompts
from clipdecomp.toyworld.world import (
    COLOURS,
    FACTOR_VALUES,
    IMAGE_SIZE,
    _REGION_ORIGIN,
    render,
    sample_scene,
)


def test_render_is_deterministic_by_seed():
    a = [render(sample_scene(np.random.default_rng(7)))[0] for _ in range(2)]
    assert np.array_equal(np.asarray(a[0]), np.asarray(a[1]))
    b = render(sample_scene(np.random.default_rng(8)))[0]
    assert not np.array_equal(np.asarray(a[0]), np.asarray(b))


def test_training_batches_are_a_function_of_seed_and_step():
    i1, c1, s1 = training_batch(3, 11, 16, 4, 0.95)
    i2, c2, s2 = training_batch(3, 11, 16, 4, 0.95)
    assert c1 == c2 and s1 == s2
    assert all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(i1, i2))
    assert training_batch(3, 12, 16, 4, 0.95)[1] != c1


@pytest.mark.parametrize("seed", range(12))
def test_masks_match_the_drawn_objects(seed):
    rng = np.random.default_rng(seed)
    scene = sample_scene(rng)
    image, masks = render(scene)
    pixels = np.asarray(image).astype(int)
    assert masks.shape == (scene.count, IMAGE_SIZE, IMAGE_SIZE) and masks.dtype == bool
    # Objects are disjoint and non-empty.
    assert (masks.sum(0) <= 1).all() and (masks.sum((1, 2)) > 20).all()
    # Inside each object (away from its outline) every pixel is the object's colour or its texture shade.
    base = np.array(COLOURS[scene.colour])
    interior = world._erode(world._erode(masks.any(0)))
    inside = pixels[interior]
    is_base = (inside == base).all(-1)
    is_shade = (np.abs(inside - (base * 0.45 if scene.colour != "white" else 120)) <= 1).all(-1)
    assert (is_base | is_shade).all()
    if scene.texture == "plain":
        assert is_base.all()
    else:
        assert is_shade.any() and is_base.any()
    # Each object's centroid is where the scene says, inside the scene's region box.
    ox, oy = _REGION_ORIGIN[scene.region]
    half = IMAGE_SIZE // 2
    for mask, obj in zip(masks, scene.objects):
        ys, xs = np.nonzero(mask)
        assert abs(xs.mean() - obj.x) < 3 and abs(ys.mean() - obj.y) < 3.5
        # Star points and triangle corners may poke a pixel or two past the box.
        assert ox - 3 <= xs.min() and xs.max() <= ox + half + 2 and oy - 3 <= ys.min() and ys.max() <= oy + half + 2


def test_every_factor_value_is_reachable():
    rng = np.random.default_rng(0)
    seen = {f: set() for f in FACTOR_VALUES}
    for _ in range(600):
        scene = sample_scene(rng, spurious=None)
        for f in FACTOR_VALUES:
            seen[f].add(getattr(scene, f))
    for f, values in FACTOR_VALUES.items():
        assert seen[f] == set(values), f


def test_objects_sit_in_grid_cells_at_one_size_and_lone_objects_keep_their_region():
    """Every object, lone or not, is drawn at a cell of its region's 2 x 2 grid at the
    same size (the model's shape features are tied to those positions), and a lone
    object's position tells its region: corner and centre boxes share cells."""
    rng = np.random.default_rng(0)
    cell = IMAGE_SIZE / 4
    lone_cells: dict[str, set] = {}
    for region in world.REGIONS:
        ox, oy = _REGION_ORIGIN[region]
        for count in world.COUNTS:
            for _ in range(60):
                objects = world.place_objects(region, count, rng)
                assert len(objects) == count
                for o in objects:
                    i, j = round((o.x - ox) / cell - 0.5), round((o.y - oy) / cell - 0.5)
                    assert 0 <= i <= 1 and 0 <= j <= 1
                    assert abs(o.x - (ox + (i + 0.5) * cell)) <= 1.5 and abs(o.y - (oy + (j + 0.5) * cell)) <= 1.5
                    assert 0.36 * cell <= o.radius <= 0.42 * cell
                    if count == 1:
                        lone_cells.setdefault(region, set()).add((ox + i * cell, oy + j * cell))
    corners = set().union(*(lone_cells[r] for r in world.REGIONS if r != "centre"))
    assert len(lone_cells["centre"]) == 4 and not corners & lone_cells["centre"]
    assert all(len(lone_cells[r]) == 3 for r in world.REGIONS if r != "centre")


def test_spurious_cue_has_the_stated_strength():
    rng = np.random.default_rng(1)
    triangles = [sample_scene(rng, fixed={"shape": "triangle"}) for _ in range(400)]
    squares = [sample_scene(rng, fixed={"shape": "square"}) for _ in range(400)]
    wet_or_dry = world.WATER_BACKGROUNDS + world.LAND_BACKGROUNDS
    on_water = np.mean([s.background == "water" for s in triangles if s.background in wet_or_dry])
    sq_land = np.mean([s.background in world.LAND_BACKGROUNDS for s in squares if s.background in wet_or_dry])
    assert 0.92 < on_water < 0.98 and 0.92 < sq_land < 0.98
    # The cue decides water against land only: both shapes are still seen on every background.
    for shape_scenes in (triangles, squares):
        assert {s.background for s in shape_scenes} == set(world.BACKGROUNDS)


def test_bad_factor_values_are_refused():
    with pytest.raises(ValueError, match="accepted"):
        sample_scene(np.random.default_rng(0), fixed={"shape": "pentagon"})
    with pytest.raises(ValueError, match="factors are"):
        sample_scene(np.random.default_rng(0), fixed={"size": 3})


def test_hard_negative_groups_differ_in_their_focus_only():
    rng = np.random.default_rng(5)
    checked = 0
    for _ in range(60):
        scenes, focus = sample_group(rng, 4, spurious=None)
        if focus is None:
            continue
        checked += 1
        assert len({getattr(s, focus) for s in scenes}) == len(scenes)
        for other in FACTOR_VALUES:
            if other != focus:
                assert len({getattr(s, other) for s in scenes}) == 1, (focus, other)
    assert checked > 30


def test_captions_name_forced_factors():
    rng = np.random.default_rng(2)
    for _ in range(50):
        scene = sample_scene(rng, spurious=None)
        text = caption(scene, rng, force=("shape", "background"))
        assert (scene.shape in text) or (scene.shape == "cross" and "crosses" in text)
        bg_words = {"water": "water", "grass": "grass", "sand": "sand", "snow": "snow", "night sky": "night", "forest": "forest"}
        assert any(w in text for w in (bg_words[scene.background], "lake", "lawn", "beach", "trees"))


def test_zero_shot_prompts_cover_every_value():
    for factor, values in FACTOR_VALUES.items():
        prompts = zero_shot_prompts(factor)
        assert set(prompts) == set(values)
        assert all(prompts[v] for v in values)
    with pytest.raises(ValueError):
        zero_shot_prompts("size")


def test_training_smoke_run_writes_a_loadable_hub_folder(tmp_path):
    """A few steps of the real training loop, resumed once, exported in open_clip's hub layout."""
    import open_clip
    import torch

    from clipdecomp.toyworld import train

    args = ["--out", str(tmp_path), "--batch-size", "8", "--eval-n", "16", "--eval-every", "0", "--checkpoint-every", "1"]
    assert train.main([*args, "--steps", "2"]) == 0
    first = json.loads((tmp_path / "training.json").read_text())
    assert first["final"]["step"] == 2
    assert abs(sum(first["focus_probs"].values()) - 1) < 1e-9 and "shape" in first["focus_probs"]  # the defaults, recorded
    assert train.main([*args, "--steps", "3"]) == 0  # resumes at step 2
    log = json.loads((tmp_path / "training.json").read_text())["log"]
    assert [e["step"] for e in log] == [1, 2, 3]
    assert set(log[-1]["zero_shot"]) == set(FACTOR_VALUES)
    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{tmp_path}")
    x = torch.randn(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    assert model.encode_image(x).shape == (1, 64)
    assert not list(tmp_path.glob("*.tmp"))


def test_locked_text_tower_stays_at_its_initialisation(tmp_path):
    """--lock-text-steps N: the text tower is not updated in the first N steps, the image tower is."""
    import torch
    from safetensors.torch import load_file

    from clipdecomp.toyworld import train

    args = ["--batch-size", "8", "--eval-n", "16", "--eval-every", "0", "--fp32", "--steps", "2"]
    assert train.main([*args, "--out", str(tmp_path / "locked"), "--lock-text-steps", "2"]) == 0
    assert train.main([*args, "--out", str(tmp_path / "free"), "--lock-text-steps", "0"]) == 0
    init = train.build_model(0)
    names = {n for n, _ in init.named_parameters()}
    text = {n for n, p in init.named_parameters() if any(p is q for q in train.text_parameters(init))}
    assert text and all(not n.startswith("visual.") for n in text) and "token_embedding.weight" in text
    assert names - text == {n for n in names if n.startswith("visual.")} | {"logit_scale"}
    start = init.state_dict()
    locked = load_file(str(tmp_path / "locked" / "open_clip_model.safetensors"))
    free = load_file(str(tmp_path / "free" / "open_clip_model.safetensors"))
    for n in text:
        assert torch.equal(locked[n], start[n]), n
    assert any(not torch.equal(free[n], start[n]) for n in text)
    assert not torch.equal(locked["visual.conv1.weight"], start["visual.conv1.weight"])


def test_direct_penalty_enters_the_loss_and_is_logged(tmp_path):
    """--direct-penalty changes the update; the share it penalises is logged with or without it."""
    import torch
    from safetensors.torch import load_file

    from clipdecomp.toyworld import train

    args = ["--batch-size", "8", "--eval-n", "16", "--eval-every", "0", "--fp32", "--steps", "2"]
    assert train.main([*args, "--out", str(tmp_path / "plain"), "--direct-penalty", "0"]) == 0
    assert train.main([*args, "--out", str(tmp_path / "penalised"), "--direct-penalty", "5"]) == 0
    for run in ("plain", "penalised"):
        log = json.loads((tmp_path / run / "training.json").read_text())["log"]
        assert all(0 < e["direct_share"] for e in log)
    plain = load_file(str(tmp_path / "plain" / "open_clip_model.safetensors"))
    penalised = load_file(str(tmp_path / "penalised" / "open_clip_model.safetensors"))
    assert not torch.equal(plain["visual.transformer.resblocks.0.mlp.c_fc.weight"],
                           penalised["visual.transformer.resblocks.0.mlp.c_fc.weight"])
    for bad in (["--direct-penalty", "-1"], ["--late-layers", "7"]):
        with pytest.raises(SystemExit) as e:
            train.main([*args, "--out", str(tmp_path / "bad"), *bad])
        assert e.value.code == 2
