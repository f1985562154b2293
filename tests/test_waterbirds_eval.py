"""Waterbirds evaluation of base / exact / baked / random-heads models, and the
``clipdecomp repair`` / ``clipdecomp waterbirds-eval`` command lines, on a tiny
synthetic Waterbirds folder and tiny random-init models."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipdecomp.data.waterbirds import group_accuracies, write_metadata
from clipdecomp.errors import InputError
from clipdecomp.zeroshot import OPENAI_IMAGENET_TEMPLATES, predict, zero_shot_classifier
from repair.bake import bake_ablation, compute_repair_means
from repair.cli import main as repair_main
from repair.cli import waterbirds_eval_main
from repair.export import read_provenance
from repair.waterbirds_eval import (
    check_means_split,
    evaluate_waterbirds,
    resolve_classnames,
    resolve_templates,
    waterbirds_loader,
)

PER_GROUP = 2  # images per (y, place) group per split


def _write_folder(root: Path, classes: bool = True) -> Path:
    rng = np.random.default_rng(0)
    rows = []
    for split in (0, 1, 2):
        for y in (0, 1):
            for place in (0, 1):
                for _ in range(PER_GROUP):
                    i = len(rows)
                    name = f"img/{i:03d}.png"
                    (root / "img").mkdir(parents=True, exist_ok=True)
                    arr = rng.integers(0, 255, size=(20, 24, 3), dtype=np.uint8)
                    arr[..., 2] = 200 if place else 30  # "water" is blue-ish
                    Image.fromarray(arr).save(root / name)
                    rows.append({"img_id": i, "img_filename": name, "y": y, "split": split, "place": place, "place_filename": "x"})
    write_metadata(root / "metadata.csv", rows)
    if classes:
        (root / "classes.json").write_text(json.dumps({"0": "square", "1": "triangle"}))
    return root


@pytest.fixture(scope="module")
def wb(tmp_path_factory) -> Path:
    return _write_folder(tmp_path_factory.mktemp("wb"))


def _cli(fn, argv, capsys):
    code = fn([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ----------------------------------------------------------------------------- options


def test_classnames_precedence_and_errors(wb, tmp_path):
    assert resolve_classnames(wb) == ["square", "triangle"]
    assert resolve_classnames(wb, "land bird, water bird") == ["land bird", "water bird"]
    assert resolve_classnames(tmp_path) == ["landbird", "waterbird"]
    with pytest.raises(InputError, match="exactly two"):
        resolve_classnames(wb, "a,b,c")
    (tmp_path / "classes.json").write_text('["a", "b"]')
    with pytest.raises(InputError, match="classes.json"):
        resolve_classnames(tmp_path)


def test_templates_default_simple_file_and_errors(tmp_path):
    assert len(resolve_templates(None)) == len(resolve_templates("openai")) == 80
    assert resolve_templates("simple") == ["a photo of a {}."]
    f = tmp_path / "t.txt"
    f.write_text("# mine\na {}.\n\nthe {} again\n")
    assert resolve_templates(f) == ["a {}.", "the {} again"]
    f.write_text("no slot here\n")
    with pytest.raises(InputError, match="must contain"):
        resolve_templates(f)
    with pytest.raises(InputError, match="'openai', 'simple'"):
        resolve_templates(tmp_path / "missing.txt")


def test_means_split_must_differ_from_eval_split():
    assert check_means_split("val", "test") == "val"
    assert check_means_split(0, "test") == "train"
    with pytest.raises(InputError, match="leaks"):
        check_means_split("test", "test")
    assert check_means_split("test", 2, allow_eval_split=True) == "test"


# ----------------------------------------------------------------------------- bad folders


@pytest.mark.parametrize(
    "content, needle",
    [
        (None, "metadata not found"),
        ("img_id,img_filename,y,split\n0,img/000.png,0,2\n", "missing column"),
        ("img_id,img_filename,y,split,place,place_filename\n0,img/000.png,2,2,0,x\n", "other than 0/1"),
        ("img_id,img_filename,y,split,place,place_filename\n0,img/000.png,0,7,0,x\n", "unknown value"),
        ("img_id,img_filename,y,split,place,place_filename\n0,img/nope.png,0,2,0,x\n", "missing under"),
        ("", "cannot be parsed"),
    ],
)
def test_missing_or_malformed_metadata_is_a_clear_error(tiny, tmp_path, capsys, content, needle):
    root = tmp_path / "wb"
    _write_folder(root)
    if content is None:
        (root / "metadata.csv").unlink()
    else:
        (root / "metadata.csv").write_text(content)
    with pytest.raises(InputError, match=needle):
        waterbirds_loader(root, "test", tiny.preprocess)
    code, _, err = _cli(waterbirds_eval_main, ["--model", "cdtest-tiny-vit", "--data", root, "--no-progress"], capsys)
    assert code == 2 and err.startswith("error: ") and needle in err


# ----------------------------------------------------------------------------- evaluation


def _direct_result(clip, root, preprocess, classifier, split="test"):
    ys, ps, preds = [], [], []
    with torch.no_grad():
        for x, y, p in waterbirds_loader(root, split, preprocess, batch_size=5):
            preds.append(predict(clip.encode_image(x), classifier))
            ys.append(y)
            ps.append(p)
    return group_accuracies(torch.cat(preds), torch.cat(ys), torch.cat(ps))


def test_evaluate_rows_match_direct_model_outputs(tiny, wb):
    heads = [(2, 1), (1, 3)]
    means = compute_repair_means(tiny, waterbirds_loader(wb, "val", tiny.preprocess, batch_size=3), progress=False, split="val")
    baked = bake_ablation(tiny, means, heads)
    rep = evaluate_waterbirds(tiny, wb, heads=heads, means=means, baked=baked, templates=["a {}."], random_trials=3,
                              batch_size=3, progress=False)
    assert list(rep.rows) == ["base", "exact repair (2 heads)", "baked repair (2 heads)", "random heads (best of 3)"]
    classifier = zero_shot_classifier(tiny, ["square", "triangle"], ["a {}."])
    assert rep.rows["base"] == _direct_result(tiny.clip, wb, tiny.preprocess, classifier)
    assert rep.rows["baked repair (2 heads)"] == _direct_result(baked, wb, tiny.preprocess, classifier)
    assert rep.meta["n"] == 4 * PER_GROUP and rep.meta["classnames"] == ["square", "triangle"]
    assert rep.meta["means_split"] == "val" and rep.meta["means_count"] == 4 * PER_GROUP
    # random draws: 2 heads each from layers {1, 2}, the best by worst group is reported
    assert len(rep.random_trials) == 3
    assert all(len(t["heads"]) == 2 and {l for l, _ in t["heads"]} <= {1, 2} for t in rep.random_trials)
    best = max(t["result"]["worst"] for t in rep.random_trials)
    assert rep.rows["random heads (best of 3)"]["worst"] == best
    assert rep.agreement["n"] == 4 * PER_GROUP and 0.0 < rep.agreement["mean_cos"] <= 1.0 + 1e-12
    md, table = rep.markdown(), list(csv.reader(io.StringIO(rep.csv())))
    assert "| baked repair (2 heads) |" in md and "Baked vs exact embeddings" in md and "Ablated heads (2): 2.1,1.3" in md
    assert table[0][:3] == ["model", "landbird-land", "landbird-water"] and [r[0] for r in table[1:]] == list(rep.rows)
    json.dumps(rep.to_json())


def test_evaluate_without_heads_and_with_zero_heads(tiny, wb):
    rep = evaluate_waterbirds(tiny, wb, templates=["a {}."], batch_size=8, progress=False)
    assert list(rep.rows) == ["base"] and rep.agreement is None and rep.random_trials == []
    means = compute_repair_means(tiny, waterbirds_loader(wb, "val", tiny.preprocess), progress=False, split="val")
    rep0 = evaluate_waterbirds(tiny, wb, heads=[], means=means, baked=bake_ablation(tiny, means, []),
                               templates=["a {}."], batch_size=8, progress=False, exact_options={"mlps": [0]})
    assert rep0.rows["baked repair (0 heads)"] == rep.rows["base"]
    with pytest.raises(InputError, match="without means"):
        evaluate_waterbirds(tiny, wb, heads=[(0, 0)], progress=False)


# ----------------------------------------------------------------------------- commands


def test_waterbirds_eval_command(tiny, wb, tmp_path, capsys):
    code, out, err = _cli(waterbirds_eval_main, ["--model", "cdtest-tiny-vit", "--data", wb, "--heads", "2.1,0.0",
                                                  "--templates", "simple", "--random-trials", "2", "--no-progress",
                                                  "--out", tmp_path / "ev"], capsys)
    assert code == 0, err
    assert "L0.H0" in out and "listed explicitly" in out and "| exact repair (2 heads) |" in out
    assert sorted(p.name for p in (tmp_path / "ev").iterdir()) == ["waterbirds_eval.csv", "waterbirds_eval.json", "waterbirds_eval.md"]
    saved = json.loads((tmp_path / "ev" / "waterbirds_eval.json").read_text())
    assert saved["meta"]["selection"]["heads"][0]["layer"] == 0


@pytest.mark.parametrize(
    "extra, needle",
    [
        (["--heads", "3.0"], "3 layers (0..2) and 4 heads per layer (0..3)"),
        (["--heads", "1.1,1.1"], "listed twice"),
        (["--heads", "1.1", "--means-split", "test"], "leaks"),
        (["--heads", "1.1", "--roles", "scene"], "either --heads or --textspan"),
        (["--roles", "scene"], "needs both --textspan"),
    ],
)
def test_command_errors_exit_2_with_a_message(tiny, wb, capsys, extra, needle):
    code, _, err = _cli(waterbirds_eval_main, ["--model", "cdtest-tiny-vit", "--data", wb, "--no-progress", *extra], capsys)
    assert code == 2 and needle in err


def test_repair_command_exports_with_evaluation(tiny, wb, tmp_path, capsys):
    out_dir = tmp_path / "repaired"
    code, out, err = _cli(repair_main, ["--model", "cdtest-tiny-vit", "--heads", "2.1", "--data", wb, "--out", out_dir,
                                        "--evaluate", "--templates", "simple", "--random-trials", "2", "--no-progress"], capsys)
    assert code == 0, err
    assert "| baked repair (1 heads) |" in out and f"exported: {out_dir}" in out
    names = sorted(p.name for p in out_dir.iterdir())
    assert names == ["README.md", "open_clip_config.json", "open_clip_model.safetensors", "repair.json",
                     "waterbirds_eval.csv", "waterbirds_eval.md"]
    meta = read_provenance(out_dir)
    assert meta["ablated_heads_spec"] == "2.1" and meta["means_split"] == "val" and meta["base_model"] == "cdtest-tiny-vit"
    card = (out_dir / "README.md").read_text()
    assert "## Evaluation" in card and "| random heads (best of 2) |" in card
    record = json.loads((out_dir / "repair.json").read_text())
    assert record["agreement"]["n"] == 4 * PER_GROUP and record["evaluation"]["meta"]["split"] == "test"


def test_repair_command_without_evaluation_measures_agreement_on_the_means_split(tiny_configs, wb, tmp_path, capsys):
    out_dir = tmp_path / "r"
    code, out, err = _cli(repair_main, ["--model", "cdtest-tiny-vit", "--heads", "1.2,2.0", "--data", wb, "--out", out_dir,
                                        "--means-split", "train", "--no-progress"], capsys)
    assert code == 0, err
    assert "baked vs exact embeddings (8 images)" in out
    record = json.loads((out_dir / "repair.json").read_text())
    assert record["agreement"]["split"] == "train" and record["evaluation"] is None
    assert read_provenance(out_dir)["means_split"] == "train"
    assert "## Evaluation" not in (out_dir / "README.md").read_text()


def test_repair_command_requires_a_selection_and_refuses_eval_means(tiny_configs, wb, tmp_path, capsys):
    base = ["--model", "cdtest-tiny-vit", "--data", wb, "--out", tmp_path / "o", "--no-progress"]
    code, _, err = _cli(repair_main, base, capsys)
    assert code == 2 and "choose the heads" in err
    code, _, err = _cli(repair_main, [*base, "--heads", "1.0", "--evaluate", "--means-split", "test"], capsys)
    assert code == 2 and "leaks" in err
    assert not (tmp_path / "o").exists()


def test_help_texts(capsys):
    for fn in (repair_main, waterbirds_eval_main):
        with pytest.raises(SystemExit) as e:
            fn(["--help"])
        assert e.value.code == 0
    out = capsys.readouterr().out
    assert "hub layout" in out and "--allow-eval-split-means" in out and "--push-to-hub" in out
