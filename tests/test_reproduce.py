"""Layer ablations (clipdecomp.experiments.layers) and the one-command report
(clipdecomp reproduce), on tiny random-init models and tiny toy data sets."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import open_clip
import pytest
import torch
from PIL import Image

from clipdecomp.decomposition import decompose
from clipdecomp.errors import InputError
from clipdecomp.experiments.layers import (
    SETTINGS,
    class_token_term,
    setting_embeddings,
    stream_layer_means,
)
from conftest import make_images

REPRO = "cdtest-repro-tiny"
REPRO_CFG = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "patch_size": 8, "width": 32, "layers": 3, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


# ----------------------------------------------------------------------------- pure functions


@pytest.fixture(scope="module")
def batch(tiny64):
    images = make_images(tiny64.visual, 6, seed=3)
    return images, decompose(tiny64, images, token_layers="all")


def test_class_token_term_is_the_token0_share_of_the_heads(tiny64, batch):
    images, dec = batch
    cls = class_token_term(dec)
    assert cls.shape == (dec.batch_size, dec.embed_dim)
    # token 0 plus the other tokens gives every head's whole contribution
    rest = sum(dec.head_tokens(l)[:, 1:].sum((1, 2)) for l in range(dec.layers))
    torch.testing.assert_close(cls + rest, dec.heads.sum((1, 2)), rtol=1e-10, atol=1e-10)
    assert float(cls.std(0).norm()) > 1e-3  # image-dependent, so ablating it changes something
    no_tokens = decompose(tiny64, images, token_layers=[0])
    with pytest.raises(InputError, match="token_layers='all'"):
        class_token_term(no_tokens)


def test_settings_ablate_what_they_say(tiny64, batch):
    images, dec = batch
    loader = [images[:4], (images[4:], torch.zeros(2))]  # two batches, both loader item shapes
    means = stream_layer_means(tiny64, loader, progress=False)
    # streamed means equal the means over the whole set
    torch.testing.assert_close(means.parts.heads, dec.heads.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(means.cls, class_token_term(dec).mean(0), rtol=1e-10, atol=1e-10)
    assert means.count == 6
    embs = setting_embeddings(dec, means)
    L = dec.layers
    assert list(embs) == [*SETTINGS, *(f"heads_up_to:{l}" for l in range(L + 1))]
    total = dec.total()
    torch.testing.assert_close(embs["base"], total)
    torch.testing.assert_close(embs["heads_up_to:0"], total)  # ablating nothing
    # mean-ablation keeps the batch mean (the means are this batch's) and removes the variation
    for key, emb in embs.items():
        torch.testing.assert_close(emb.mean(0), total.mean(0), rtol=1e-9, atol=1e-9)
    cls = class_token_term(dec)
    torch.testing.assert_close(embs["class_token"], total - cls + cls.mean(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(embs["mlps"], total - dec.mlps.sum(1) + dec.mlps.mean(0).sum(0), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(embs["class_token+mlps"] - embs["mlps"], embs["class_token"] - total, rtol=1e-10, atol=1e-10)
    # all heads ablated: only the embedding term and the MLPs vary
    torch.testing.assert_close(embs[f"heads_up_to:{L}"] - (dec.embed + dec.mlps.sum(1)),
                               (dec.heads.mean(0).sum((0, 1))).expand_as(total), rtol=1e-9, atol=1e-9)


def test_prompt_sets_give_the_segmentation_toy_classes(tiny64):
    from clipdecomp.zeroshot import class_embeddings
    from clipdecomp.experiments.segmentation import class_set
    from clipdecomp.toyworld.captions import zero_shot_prompts

    prompts = zero_shot_prompts("shape")
    ref = class_set(tiny64, "toy")
    names = sorted(ref.names)  # ImageFolder order differs from the toy world's order
    got = class_embeddings(tiny64, names, prompts)
    torch.testing.assert_close(got, ref.embeddings[[ref.names.index(n) for n in names]], rtol=1e-6, atol=1e-6)
    with pytest.raises(InputError, match=r"no prompt set for class\(es\) \['dog'\]"):
        class_embeddings(tiny64, ["circle", "dog"], prompts)


# ----------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def toy_data(tmp_path_factory) -> Path:
    from clipdecomp.toyworld.datasets import make_datasets

    root = tmp_path_factory.mktemp("repro_data")
    make_datasets(root, seed=0, scale=0.02)
    return root


@pytest.fixture(scope="module")
def repro_model(tmp_path_factory) -> tuple[str, Path]:
    """A registered tiny config and fixed random weights (every run loads the same model)."""
    from safetensors.torch import save_file

    d = tmp_path_factory.mktemp("repro_cfg")
    (d / f"{REPRO}.json").write_text(json.dumps(REPRO_CFG))
    open_clip.add_model_config(d)
    torch.manual_seed(0)
    model = open_clip.create_model(REPRO)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, d / "weights.safetensors")
    return REPRO, d / "weights.safetensors"


def _argv(data: Path, out: Path, model: tuple[str, Path]) -> list[str]:
    return ["--model", model[0], "--pretrained", str(model[1]), "--imagenet", str(data / "classification"), "--waterbirds", str(data / "waterbirds"),
            "--segmentation", str(data / "segmentation" / "gtsegs_ijcv.mat"), "--classes", "toy",
            "--textspan-layers", "2", "--textspan-k", "6", "--random-size", "64", "--ks", "0", "1", "3", "6",
            "--random-trials", "2", "--top-n", "2", "--max-images", "12", "--batch-size", "8", "--quiet", "--out", str(out)]


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


@pytest.fixture(scope="module")
def report(toy_data, repro_model, tmp_path_factory):
    from clipdecomp.cli import main

    out = tmp_path_factory.mktemp("report")
    argv = _argv(toy_data, out, repro_model)
    assert main(["reproduce", *argv]) == 0
    return out, argv


def test_every_table_and_plot_is_written(report):
    out, argv = report
    for name in ("report.md", "layers.csv", "completeness.csv", "waterbirds.csv", "segmentation.csv", "head_roles.csv",
                 "segmentation/table.md", "segmentation/table.csv"):
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    for name in ("layers.png", "completeness_general.png", "completeness_words.png", "completeness_random.png"):
        with Image.open(out / name) as im:
            assert im.format == "PNG" and im.size[0] > 100
    text = (out / "report.md").read_text()
    assert "clipdecomp reproduce " + " ".join(argv) in text
    assert f"torch {torch.__version__.split('+')[0]}" in text and "open_clip_torch" in text
    for title in ("Layer ablations", "TextSpan completeness", "Waterbirds", "Zero-shot segmentation", "Head roles"):
        assert f"## {title}" in text
    # the paper's figures sit beside ours
    assert "75.25" in text and "72.77" in text and "57.5" in text and "75.21" in text
    assert "## Not run" not in text
    assert not list(out.rglob("*.tmp"))


def test_numbers_are_consistent(report):
    out, _ = report
    layers = json.loads((out / "cache" / "layers.json").read_text())["result"]
    n = layers["n_images"]
    assert n == 16 and len(layers["curve"]) == REPRO_CFG["vision_cfg"]["layers"] + 1
    assert layers["n_means"] == 12  # --max-images: a subset of the 16 train images
    assert layers["curve"][0]["accuracy"] == layers["accuracy"]["base"]  # nothing ablated at l = 0
    rows = _csv(out / "layers.csv")
    assert [r["setting"] for r in rows[:4]] == list(SETTINGS)
    assert float(rows[0]["accuracy"]) == layers["accuracy"]["base"]
    assert all(int(r["correct"]) == round(float(r["accuracy"]) * n) for r in rows)
    comp = _csv(out / "completeness.csv")
    fixed = {r["setting"]: float(r["accuracy"]) for r in comp if r["setting"] != "textspan"}
    assert fixed["base"] == layers["accuracy"]["base"]  # same images, same class texts
    for pool in ("general", "words", "random"):
        ks = {int(r["k"]): float(r["accuracy"]) for r in comp if r["pool"] == pool}
        assert list(ks) == [0, 1, 3, 6] and ks[0] == fixed["ablated"]
    wb = json.loads((out / "cache" / "waterbirds.json").read_text())["result"]
    heads = wb["meta"]["heads"]
    assert 1 <= len(heads) <= 2 and all(l in (1, 2) for l, _ in heads)  # from the analysed (last 2) layers
    assert wb["meta"]["means_split"] == "val" and wb["meta"]["split"] == "test"
    wb_rows = _csv(out / "waterbirds.csv")
    assert wb_rows[0]["model"] == "base" and float(wb_rows[0]["worst"]) == pytest.approx(100 * wb["rows"]["base"]["worst"], abs=0.01)
    seg = _csv(out / "segmentation.csv")
    assert [r["method"] for r in seg] == ["ours", "raw_attention", "rollout", "gradcam"]
    assert all(0 <= float(r["miou"]) <= 1 for r in seg)
    for pool in ("general", "words", "random"):
        assert json.loads((out / "cache" / f"textspan_{pool}_summary.json").read_text())["result"]["n_images"] == 12
    roles = _csv(out / "head_roles.csv")
    assert len(roles) == 3 * 2 * 2  # pools x layers x heads


def test_cached_rerun_recomputes_nothing(report, monkeypatch):
    import clipdecomp.commands.textspan as ts
    import clipdecomp.experiments.completeness as comp
    import clipdecomp.experiments.layers as layers
    import clipdecomp.experiments.segmentation as seg
    import repair.waterbirds_eval as wbe
    from clipdecomp.experiments.reproduce import main

    out, argv = report
    before = (out / "report.md").read_text()
    stamps = {p: p.stat().st_mtime_ns for p in (out / "cache").iterdir()}

    def boom(*a, **k):
        raise AssertionError("recomputed an experiment that was cached")

    for mod, fn in ((layers, "run_layer_experiments"), (comp, "run_completeness"), (ts, "run_textspan"),
                    (seg, "evaluate_segmentation"), (wbe, "evaluate_waterbirds")):
        monkeypatch.setattr(mod, fn, boom)
    assert main(argv) == 0
    assert (out / "report.md").read_text() == before
    assert {p: p.stat().st_mtime_ns for p in (out / "cache").iterdir()} == stamps


def test_interrupted_run_resumes_only_the_missing_experiment(report, monkeypatch):
    import clipdecomp.experiments.completeness as comp
    from clipdecomp.experiments.reproduce import main

    out, argv = report
    before = (out / "report.md").read_text()
    (out / "cache" / "completeness.json").unlink()
    calls = []
    real = comp.run_completeness
    monkeypatch.setattr(comp, "run_completeness", lambda *a, **k: calls.append(1) or real(*a, **k))
    assert main(argv) == 0
    assert calls == [1] and (out / "cache" / "completeness.json").is_file()
    # deterministic: the recomputed numbers match; only the timing line may differ
    strip = lambda t: [ln for ln in t.splitlines() if "Computed in" not in ln]  # noqa: E731
    assert strip((out / "report.md").read_text()) == strip(before)


def test_bad_arguments_fail_before_loading(tmp_path, capsys):
    from clipdecomp.experiments.reproduce import main

    (tmp_path / "inet" / "train").mkdir(parents=True)
    assert main(["--imagenet", str(tmp_path / "inet"), "--out", str(tmp_path / "r")]) == 2
    assert "needs val/" in capsys.readouterr().err
    assert main(["--waterbirds", str(tmp_path / "nope"), "--out", str(tmp_path / "r")]) == 2
    assert "--waterbirds" in capsys.readouterr().err
    assert main(["--scale", "0", "--out", str(tmp_path / "r")]) == 2
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "--textspan-images" in capsys.readouterr().out
