"""The repair front end: head selection, means, exact vs baked ablation, export.

All models are tiny random-init towers from ``conftest`` (perturbed norms and biases);
nothing is downloaded."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import clipdecomp
from clipdecomp.ablation import compute_means
from clipdecomp.decomposition import decompose
from clipdecomp.errors import InputError
from clipdecomp.roles import assign_roles
from clipdecomp.textspan_results import HeadSpan, TextSpanResults
from repair import export as export_mod
from repair.bake import (
    bake_ablation,
    class_token_head_outputs,
    compute_repair_means,
    embedding_agreement,
    exact_embeddings,
    head_residual_means,
)
from repair.export import export_repaired, read_provenance
from repair.select import (
    HeadSelection,
    format_heads,
    model_shape,
    parse_heads,
    random_heads,
    select_by_roles,
    select_explicit,
)

from conftest import make_images

REPO = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- helpers


def batches(model, n: int = 6, seed: int = 1, size: int = 3) -> list[torch.Tensor]:
    x = make_images(model.visual, n, seed=seed)
    return list(x.split(size))


def means_for(model, seed: int = 1):
    return compute_repair_means(model, batches(model, seed=seed), progress=False, split="val")


def head_writes(model, dec, layer: int, head: int) -> torch.Tensor:
    """Per-image write of a head into the residual at the class token, after the layer
    scale ``[B, W]``, from the decomposition's stored attention outputs (independent of
    :func:`repair.bake.head_residual_means`)."""
    blk = model.visual.transformer.resblocks[layer]
    attn = blk.attn
    H = attn.num_heads
    W = model.visual.transformer.width
    dh = W // H
    z = class_token_head_outputs(dec)[:, layer, head]  # [B, dh]
    hs = getattr(attn, "head_scale", None)
    s = 1.0 if hs is None else hs.detach().reshape(H)[head]
    w = s * z @ attn.out_proj.weight.detach()[:, head * dh : (head + 1) * dh].t()
    ls = getattr(blk.ls_1, "gamma", None)
    return w if ls is None else w * ls.detach()


def ln2_inputs(clip, layer: int, images: torch.Tensor) -> torch.Tensor:
    """The residual stream after layer ``layer``'s attention (``ln_2``'s input) ``[B, N, W]``."""
    got = {}
    h = clip.visual.transformer.resblocks[layer].ln_2.register_forward_hook(lambda m, i, o: got.setdefault("x", i[0].detach()))
    try:
        with torch.no_grad():
            clip.encode_image(images)
    finally:
        h.remove()
    return got["x"]


# ----------------------------------------------------------------------------- selection


def test_parse_heads_accepts_forms_and_keeps_order():
    assert parse_heads("2.3, 0.1,L1.H0", 3, 4) == [(2, 3), (0, 1), (1, 0)]
    assert parse_heads("", 3, 4) == []
    assert parse_heads([(0, 0), [2, 3]], 3, 4) == [(0, 0), (2, 3)]
    assert format_heads(parse_heads("1.2,0.3", 3, 4)) == "1.2,0.3"


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("3.0", "layer index 3"),
        ("0.4", "head index 4"),
        ("1.2,1.2", "listed twice"),
        ("1-2", "malformed"),
        ("a.b", "malformed"),
        ("1.2.3", "malformed"),
        ("1.2,,0.1", "empty entry"),
        ("-1.0", "malformed"),
    ],
)
def test_parse_heads_errors_name_the_model_range(spec, needle):
    with pytest.raises(InputError) as e:
        parse_heads(spec, 3, 4)
    msg = str(e.value)
    assert needle in msg
    if "twice" not in needle and "empty" not in needle:
        assert "3 layers (0..2)" in msg and "4 heads per layer (0..3)" in msg


def test_select_explicit_records_why_and_sorts(tiny):
    L, H = model_shape(tiny)
    assert (L, H) == (3, 4)
    sel = select_explicit("2.1,0.3", L, H)
    assert sel.pairs() == [(0, 3), (2, 1)] and sel.layers == [0, 2]
    assert "L2.H1" in sel.describe() and "listed explicitly" in sel.describe()
    assert HeadSelection.from_json(json.loads(json.dumps(sel.to_json()))) == sel


def test_random_heads_same_layers_seeded():
    a = random_heads([4, 5], 6, 3, seed=7)
    assert a == random_heads([5, 4], 6, 3, seed=7) and len(set(a)) == 3
    assert all(l in (4, 5) and 0 <= h < 6 for l, h in a)
    assert len({tuple(random_heads([4, 5], 6, 3, seed=s)) for s in range(5)}) > 1
    with pytest.raises(InputError):
        random_heads([5], 6, 7, seed=0)


def _span(layer, head, texts, cats, ev, dim=6):
    k = len(texts)
    cum = (torch.tensor(ev, dtype=torch.float64).cumsum(0) / (2 * sum(ev))).tolist()
    return HeadSpan(layer, head, texts, cats, list(range(k)), ev, cum, 2 * sum(ev), torch.eye(dim)[:k], torch.zeros(dim))


@pytest.fixture
def results_file(tmp_path) -> Path:
    """A results file of a 3-layer, 4-head model, in textspan_results' own format."""
    heads = [
        _span(2, 1, ["on water", "a lake", "red"], ["scenes and settings", "scenes and settings", "colours"], [6.0, 2.0, 2.0]),
        _span(2, 3, ["on grass", "a star"], ["scenes and settings", "shapes"], [3.0, 3.0]),
        _span(1, 0, ["red", "blue"], ["colours", "colours"], [5.0, 1.0]),
        _span(1, 2, ["a beach", "in the north"], ["scenes and settings", "locations and geography"], [1.0, 4.0]),
        _span(1, 1, ["a forest", "red"], ["scenes and settings", "colours"], [18.0, 12.0]),  # big, 60% scene
    ]
    res = TextSpanResults(model="toy", pretrained=None, pool="general", layers=[1, 2], k=3, rank=80,
                          n_images=10, seed=0, embed_dim=6, heads=heads)
    path = tmp_path / "textspan.json"
    assign_roles(res).save(path)
    return path


def test_select_by_roles_threshold_top_n_and_union(results_file):
    sel = select_by_roles(results_file, "background scene", 3, 4, threshold=0.5)
    assert sel.pairs() == [(1, 1), (2, 1), (2, 3)]
    assert [round(c.score, 3) for c in sel.heads] == [0.6, 0.8, 0.5]
    assert all(c.reason == "role" and c.role == "background scene" for c in sel.heads)
    assert sel.heads[1].head_role == "scenes and settings"
    assert sel.query["textspan"] == str(results_file) and sel.query["score"] == "share"
    assert select_by_roles(results_file, ["background"], 3, 4, top_n=1).pairs() == [(2, 1)]
    both = select_by_roles(results_file, "geolocation, background scene", 3, 4, threshold=0.5)
    assert both.pairs() == [(1, 1), (1, 2), (2, 1), (2, 3)]
    assert both.heads[1].role == "geolocation" and both.heads[1].score == pytest.approx(0.8)
    assert "L1.H2" in both.describe() and "geolocation" in both.describe()


def test_select_by_roles_variance_score_weighs_by_explained_variance(results_file):
    """score='variance': share times the top texts' explained variance, so the big
    60%-scene head L1.H1 (18 units of scene variance) outranks the small 80%-scene L2.H1 (8)."""
    sel = select_by_roles(results_file, "background", 3, 4, top_n=2, score="variance")
    assert sel.pairs() == [(1, 1), (2, 1)]
    assert {c.label: c.score for c in sel.heads} == {"L1.H1": pytest.approx(18.0), "L2.H1": pytest.approx(8.0)}
    assert select_by_roles(results_file, "background", 3, 4, threshold=2.0, score="variance").pairs() == [(1, 1), (2, 1), (2, 3)]
    with pytest.raises(InputError, match="score must be one of"):
        select_by_roles(results_file, "background", 3, 4, top_n=1, score="bogus")


def test_select_by_roles_refuses_unbounded_and_foreign_results(results_file):
    with pytest.raises(InputError, match="threshold"):
        select_by_roles(results_file, "background", 3, 4)
    with pytest.raises(InputError, match="another model"):
        select_by_roles(results_file, "background", 2, 4, threshold=0.5)  # L2.H1 does not exist in 2 layers
    with pytest.raises(InputError, match="no role query"):
        select_by_roles(results_file, " , ", 3, 4, threshold=0.5)


# ----------------------------------------------------------------------------- means


def test_repair_means_match_compute_means_and_stored_outputs(tiny64):
    bs = batches(tiny64)
    m = compute_repair_means(tiny64, bs, progress=False, split="val")
    ref = compute_means(tiny64, bs, progress=False)
    assert m.count == ref.count == 6 and m.split == "val"
    for a, b in ((m.parts.heads, ref.heads), (m.parts.mlps, ref.mlps), (m.parts.embed, ref.embed)):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    z = class_token_head_outputs(decompose(tiny64, torch.cat(bs), token_layers=None))
    torch.testing.assert_close(m.z, z.mean(0), rtol=0, atol=1e-12)
    with pytest.raises(InputError, match="no images"):
        compute_repair_means(tiny64, [], progress=False)


# ----------------------------------------------------------------------------- baking


def test_ablating_zero_heads_changes_nothing(tiny):
    means = means_for(tiny)
    baked = bake_ablation(tiny, means, [])
    sd0, sd1 = tiny.clip.state_dict(), baked.state_dict()
    assert sd0.keys() == sd1.keys()
    assert all(torch.equal(sd0[k], sd1[k]) for k in sd0)
    x = make_images(tiny.visual, 4, seed=5)
    with torch.no_grad():
        assert torch.equal(baked.encode_image(x), tiny.clip.encode_image(x))
        dec = decompose(tiny, x, token_layers=None)
    assert torch.equal(exact_embeddings(dec, means, []), dec.total())
    assert baked is not tiny.clip  # a copy; the base model is untouched


def test_bake_edits_only_the_chosen_heads_columns_and_bias(tiny64):
    means = means_for(tiny64)
    baked = bake_ablation(tiny64, means, [(1, 2)])
    sd0, sd1 = tiny64.clip.state_dict(), baked.state_dict()
    changed = sorted(k for k in sd0 if not torch.equal(sd0[k], sd1[k]))
    assert changed == ["visual.transformer.resblocks.1.attn.out_proj.bias", "visual.transformer.resblocks.1.attn.out_proj.weight"]
    w0, w1 = sd0[changed[1]], sd1[changed[1]]
    dh = 16
    assert torch.all(w1[:, 2 * dh : 3 * dh] == 0)
    assert torch.equal(torch.cat([w1[:, : 2 * dh], w1[:, 3 * dh :]], 1), torch.cat([w0[:, : 2 * dh], w0[:, 3 * dh :]], 1))
    m = head_residual_means(tiny64, means.z, [(1, 2)])[(1, 2)]
    torch.testing.assert_close(sd1[changed[0]] - sd0[changed[0]], m, rtol=0, atol=1e-12)


@pytest.mark.parametrize("fixture, layer, heads", [("tiny64", 1, [(1, 0), (1, 3)]), ("tiny_custom64", 0, [(0, 1)]), ("tiny64", 2, [(2, 2)])])
def test_baked_head_writes_exactly_its_mean_at_every_token(request, fixture, layer, heads):
    """In the ablated layer (same inputs, so no indirect effect yet) the residual after
    attention is the original one minus the heads' writes plus their class-token means,
    at the class token and, by construction, the same constant at every patch token.
    Covers layer scale and per-head scale (custom attention)."""
    model = request.getfixturevalue(fixture)
    bs = batches(model)
    x = torch.cat(bs)
    means = compute_repair_means(model, bs, progress=False)
    baked = bake_ablation(model, means, heads)
    dec = decompose(model, x, token_layers=None)
    r0 = ln2_inputs(model.clip, layer, x)
    r1 = ln2_inputs(baked, layer, x)
    expect_cls = r0[:, 0].clone()
    for l, h in heads:
        w = head_writes(model, dec, l, h)  # [B, W]
        expect_cls += w.mean(0) - w  # the mean over these same images is the baked mean
    torch.testing.assert_close(r1[:, 0], expect_cls, rtol=0, atol=1e-10)
    # patch tokens: changed by the same per-image-independent shift minus their own write
    assert not torch.allclose(r1[:, 1:], r0[:, 1:])


def test_last_layer_baked_equals_residual_level_ablation_not_joint_space(tiny64):
    """Ablating last-layer heads, the baked model equals an exact *residual-level*
    ablation: r' = r_mid - w + mean(w), then the last MLP and ln_post on r'. It does not
    equal the joint-space exact repair (ablated_embedding): that keeps each image's own
    ln_post scale and the last MLP's original output, and averages w / sigma instead
    of w. The measured gap is small but far above rounding."""
    model = tiny64
    bs = batches(model)
    x = torch.cat(bs)
    heads = [(2, 0), (2, 3)]
    means = compute_repair_means(model, bs, progress=False)
    baked = bake_ablation(model, means, heads)
    dec = decompose(model, x, token_layers=None)
    v = model.visual
    blk = v.transformer.resblocks[-1]
    r_mid = ln2_inputs(model.clip, 2, x)[:, 0]
    for l, h in heads:
        w = head_writes(model, dec, l, h)
        r_mid = r_mid - w + w.mean(0)
    with torch.no_grad():
        r = r_mid + blk.ls_2(blk.mlp(blk.ln_2(r_mid)))
        ref = v.ln_post(r) @ v.proj
        got = baked.encode_image(x)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    exact = exact_embeddings(dec, means, heads)
    gap = embedding_agreement(got, exact)
    assert gap["rel_l2"] > 1e-6 and gap["mean_cos"] > 0.9


def test_bake_rejects_bad_heads_and_foreign_means(tiny64, tiny_custom64):
    means = means_for(tiny64)
    with pytest.raises(InputError, match="duplicate"):
        bake_ablation(tiny64, means, [(1, 1), (1, 1)])
    with pytest.raises(InputError, match="means of another model"):
        bake_ablation(tiny_custom64, means, [(0, 0)])


# ----------------------------------------------------------------------------- export


@pytest.fixture
def exported(tiny, tmp_path):
    means = means_for(tiny)
    sel = select_explicit("2.1,1.3", *model_shape(tiny))
    baked = bake_ablation(tiny, means, sel.pairs())
    out = export_repaired(tmp_path / "repaired", baked, base=tiny, selection=sel, means=means,
                          agreement={"mean_cos": 0.99, "min_cos": 0.98, "rel_l2": 0.1, "max_rel_l2": 0.2, "n": 6})
    return out, baked, sel


def test_export_loads_in_a_fresh_stock_open_clip_process(exported, tmp_path):
    out, baked, _ = exported
    assert sorted(p.name for p in out.iterdir()) == ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "repair.json"]
    x = make_images(baked.visual, 3, seed=9)
    save_file({"x": x.contiguous()}, str(tmp_path / "in.safetensors"))
    code = (
        "import sys, torch, open_clip\n"
        "from safetensors.torch import load_file, save_file\n"
        "m, _, pre = open_clip.create_model_and_transforms('local-dir:' + sys.argv[1])\n"
        "m.eval()\n"
        "x = load_file(sys.argv[2])['x']\n"
        "with torch.no_grad():\n"
        "    save_file({'y': m.encode_image(x).contiguous()}, sys.argv[3])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(out), str(tmp_path / "in.safetensors"), str(tmp_path / "out.safetensors")],
                          capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    y = load_file(str(tmp_path / "out.safetensors"))["y"]
    with torch.no_grad():
        ref = baked.encode_image(x)
    assert float((y - ref).abs().max()) <= 1e-5


def test_export_records_provenance_config_and_card(exported, tiny):
    out, _, sel = exported
    meta = read_provenance(out)
    assert meta["base_model"] == tiny.name == "cdtest-tiny-vit"
    assert json.loads(meta["ablated_heads"]) == [[1, 3], [2, 1]] and meta["ablated_heads_spec"] == "1.3,2.1"
    assert meta["means_split"] == "val" and meta["means_count"] == "6"
    assert meta["clipdecomp_version"] == clipdecomp.__version__
    assert HeadSelection.from_json(json.loads(meta["selection"])) == sel
    cfg = json.loads((out / "open_clip_config.json").read_text())
    import open_clip

    assert cfg["model_cfg"] == open_clip.get_model_config("cdtest-tiny-vit")
    assert cfg["preprocess_cfg"]["mean"] == list(tiny.clip.visual.preprocess_cfg["mean"])
    card = (out / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: open_clip" in front and "tags:" in front and '"mean-ablation"' in front
    assert "| L1.H3 | explicit |" in card and "`val` split" in card and "mean cosine similarity 0.9900" in card
    assert json.loads((out / "repair.json").read_text())["selection"]["heads"][0]["layer"] == 1
    import os

    mask = os.umask(0)
    os.umask(mask)
    assert out.stat().st_mode & 0o777 == 0o777 & ~mask  # not the private mode of the temporary folder
    assert all(p.stat().st_mode & 0o777 == 0o666 & ~mask for p in out.iterdir())


def test_interrupted_export_leaves_nothing_behind(tiny, tmp_path, monkeypatch):
    means = means_for(tiny)
    sel = select_explicit("2.1", *model_shape(tiny))
    baked = bake_ablation(tiny, means, sel.pairs())

    def boom(*a, **k):  # raised after the config and the weights were written
        raise KeyboardInterrupt("interrupted mid-export")

    monkeypatch.setattr(export_mod, "model_card", boom)
    parent = tmp_path / "exports"
    with pytest.raises(KeyboardInterrupt):
        export_repaired(parent / "new", baked, base=tiny, selection=sel, means=means)
    assert not (parent / "new").exists() and list(parent.iterdir()) == []
    # an existing export stays as it was
    old = parent / "old"
    old.mkdir()
    (old / "marker.txt").write_text("previous export")
    with pytest.raises(KeyboardInterrupt):
        export_repaired(old, baked, base=tiny, selection=sel, means=means)
    assert sorted(p.name for p in parent.iterdir()) == ["old"]
    assert [p.name for p in old.iterdir()] == ["marker.txt"]


def test_export_base_config_keeps_quick_gelu_of_openai_tags(tiny):
    fake = copy.copy(tiny)
    fake.name, fake.pretrained = "ViT-B-16", "openai"
    cfg = export_mod.base_model_config(fake)
    assert cfg["quick_gelu"] is True and cfg["vision_cfg"]["patch_size"] == 16
    assert export_mod.hub_base_model_id(fake) is not None
