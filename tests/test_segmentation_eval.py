"""The segmentation experiment: protocol pipeline, tables, the command, and the toy-set
ordering (ours above every baseline on mIoU) with the bundled trained model."""

from __future__ import annotations

import csv
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CUSTOM, TINY_CUSTOM_CFG

from clipdecomp.data.imagenet_seg import square_crop_pair, write_gtsegs
from clipdecomp.decomposition import decompose
from clipdecomp.experiments.segmentation import (
    METHODS,
    ClassSet,
    evaluate_segmentation,
    table_csv,
    table_markdown,
)
from clipdecomp.heatmaps import text_heatmaps
from clipdecomp.loading import bundled_model_dir
from clipdecomp.segmentation_metrics import SegmentationMeter, upsample_to


def _items(n: int = 5, seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    """Non-square images with a rectangular object mask."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        h, w = (40, 56) if i % 2 else (48, 32)
        img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
        mask = np.zeros((h, w), np.uint8)
        mask[h // 4 : 3 * h // 4, w // 3 : w - 2] = 1
        img[mask == 1] = (220, 40, 40)
        out.append((img, mask))
    return out


@pytest.fixture
def tiny_mat(tmp_path) -> tuple[Path, list]:
    items = _items()
    path = tmp_path / "gtsegs_ijcv.mat"
    write_gtsegs(path, iter(items))
    return path, items


def _classes(D: int, C: int = 4) -> ClassSet:
    g = torch.Generator().manual_seed(3)
    emb = torch.nn.functional.normalize(torch.randn(C, D, generator=g, dtype=torch.float64), dim=-1)
    return ClassSet([f"c{i}" for i in range(C)], emb, "random")


def test_pipeline_matches_an_image_by_image_computation(tiny_custom64, tiny_mat):
    lm = tiny_custom64  # square 32 px input, grid 4 x 4
    path, items = tiny_mat
    classes = _classes(24)
    res = evaluate_segmentation(lm, path, classes, methods=["ours", "raw_attention"], batch_size=2, progress=False)
    assert res["n_images"] == 5 and res["methods"] == ["ours", "raw_attention"]
    meters = {"ours": SegmentationMeter(), "raw_attention": SegmentationMeter()}
    preds = []
    for img, mask in items:  # one image at a time, through the public building blocks
        crop = square_crop_pair(img, mask, 32)
        dec = decompose(lm, lm.preprocess(crop.image)[None].double(), token_layers="all")
        pred = int((dec.total() @ classes.embeddings.T).argmax())
        preds.append(pred)
        ours = text_heatmaps(dec, classes.embeddings, normalizer=classes.embeddings)[0, pred]
        raw = dec.class_attention[0, -1].mean(0)[1:].reshape(4, 4)
        meters["ours"].update(upsample_to(ours, (32, 32)), crop.mask)
        meters["raw_attention"].update(upsample_to(raw, (32, 32)), crop.mask)
    assert res["predictions"] == preds
    for m, meter in meters.items():
        expect = meter.compute()
        for k in ("pixel_accuracy", "miou"):
            assert res["metrics"][m][k] == pytest.approx(expect[k], abs=1e-9), (m, k)
        # scikit-learn's AP groups equal scores; bilinear upsampling makes many pixels equal up
        # to the last bit, so batch-size-dependent rounding (1e-17) moves AP by up to ~1e-4
        assert res["metrics"][m]["map"] == pytest.approx(expect["map"], abs=1e-3), m


def test_limit_and_method_errors(tiny_custom64, tiny_mat):
    from clipdecomp.errors import InputError

    path, _ = tiny_mat
    res = evaluate_segmentation(tiny_custom64, path, _classes(24), methods=["rollout"], limit=2, progress=False)
    assert res["n_images"] == 2 and res["metrics"]["rollout"]["n_images"] == 2
    with pytest.raises(InputError, match="accepted"):
        evaluate_segmentation(tiny_custom64, path, _classes(24), methods=["lrp"], progress=False)


def test_tables():
    metrics = {
        "ours": {"pixel_accuracy": 0.75212, "miou": 0.545, "map": 0.8161, "n_images": 3},
        "rollout": {"pixel_accuracy": 0.6063, "miou": 0.40641, "map": 0.7447, "n_images": 3},
    }
    md = table_markdown(metrics).splitlines()
    assert md[0] == "| method | pixel acc | mIoU | mAP |"
    assert md[2] == "| ours | 75.21 | 54.50 | 81.61 |"
    assert md[3] == "| rollout | 60.63 | 40.64 | 74.47 |"
    rows = list(csv.DictReader(table_csv(metrics).splitlines()))
    assert [r["method"] for r in rows] == ["ours", "rollout"]
    assert float(rows[1]["miou"]) == pytest.approx(0.40641) and rows[0]["n_images"] == "3"


def _hub_folder(lm, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir()
    cfg = {"model_cfg": TINY_CUSTOM_CFG, "preprocess_cfg": {"size": 32}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    state = {k: v.float().contiguous() for k, v in lm.clip.state_dict().items()}
    save_file(state, str(folder / "open_clip_model.safetensors"))
    return folder


def test_command_writes_tables(tiny_custom64, tiny_mat, tmp_path, capsys):
    from clipdecomp.commands.segment_eval import main

    path, _ = tiny_mat
    hub = _hub_folder(tiny_custom64, tmp_path / "hub")
    names = tmp_path / "classes.txt"
    names.write_text("# toy classes\ncat\n\ndog\nbird\n")
    out = tmp_path / "out"
    rc = main(["--model", f"local-dir:{hub}", "--data", str(path), "--classes", str(names), "--templates", "simple",
               "--methods", "ours,gradcam", "--layers", "last1", "--out", str(out), "--quiet"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "table.csv", "table.md"]
    rows = list(csv.DictReader((out / "table.csv").read_text().splitlines()))
    assert [r["method"] for r in rows] == ["ours", "gradcam"] and all(r["n_images"] == "5" for r in rows)
    result = json.loads((out / "results.json").read_text())
    assert result["layers"] == [1] and "3) x 1 templates" in result["classes"]
    assert "| ours |" in capsys.readouterr().out
    assert main(["--model", f"local-dir:{hub}", "--data", str(path), "--methods", "ours,lrp", "--out", str(out)]) == 2
    assert "lrp" in capsys.readouterr().err
    assert main(["--model", f"local-dir:{hub}", "--data", str(tmp_path / "missing.mat"), "--out", str(out)]) == 2
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0


@pytest.mark.skipif(not (bundled_model_dir() / "open_clip_model.safetensors").is_file(), reason="bundled toy model not present")
def test_ours_beats_every_baseline_on_toy_segmentation(tmp_path, capsys):
    """The toy world's segmentation set with the bundled trained model: ours above raw
    attention, rollout and GradCAM on mIoU (60 scenes, seed 4, drawn for this test)."""
    from clipdecomp.commands.segment_eval import main
    from clipdecomp.toyworld.datasets import make_segmentation

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mat = make_segmentation(tmp_path / "seg", seed=4, n=60)
    out = tmp_path / "out"
    assert main(["--data", str(mat), "--classes", "toy", "--out", str(out), "--quiet"]) == 0
    rows = {r["method"]: r for r in csv.DictReader((out / "table.csv").read_text().splitlines())}
    assert set(rows) == set(METHODS)
    miou = {m: float(r["miou"]) for m, r in rows.items()}
    for baseline in ("raw_attention", "rollout", "gradcam"):
        assert miou["ours"] > miou[baseline], miou
