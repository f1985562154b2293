"""The `clipdecomp` entry point: every subcommand answers --help; decompose writes a store."""

from __future__ import annotations

import numpy as np
import pytest

from clipdecomp import cli


def test_top_level_help_lists_every_command(capsys):
    assert cli.main(["--help"]) == 0
    out = capsys.readouterr().out
    for name in cli.COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", list(cli.COMMANDS))
def test_every_command_has_help(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*name.split(), "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_unknown_command_is_refused(capsys):
    assert cli.main(["frobnicate"]) == 2
    assert "unknown command" in capsys.readouterr().err


def test_decompose_command_writes_a_resumable_store(tmp_path):
    import torch

    from clipdecomp.streaming import DecompositionStore
    from clipdecomp.toyworld.world import render, sample_scene

    images = tmp_path / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(5):
        render(sample_scene(rng))[0].save(images / f"{i}.png")
    out = tmp_path / "store"
    args = ["decompose", "--images", str(images), "--out", str(out), "--batch-size", "2", "--shard-size", "2"]
    assert cli.main(args) == 0
    store = DecompositionStore(out)
    assert len(store) == 5
    heads = store.load("heads")
    assert heads.shape[:1] == (5,) and heads.ndim == 4
    # Rerunning resumes: nothing is recomputed, the content stays the same.
    assert cli.main(args) == 0
    assert torch.equal(DecompositionStore(out).load("heads"), heads)
    assert cli.main(["decompose", "--images", str(tmp_path / "missing"), "--out", str(out)]) == 2


def test_toyworld_eval_prints_every_factor_and_refuses_a_bad_model(capsys):
    import json

    from clipdecomp.toyworld.world import FACTORS

    assert cli.main(["toyworld", "eval", "--n", "8", "--device", "cpu", "--json"]) == 0
    acc = json.loads(capsys.readouterr().out)
    assert set(acc) == set(FACTORS) and all(0.0 <= v <= 1.0 for v in acc.values())
    assert cli.main(["toyworld", "eval", "--model", "no-such-architecture"]) == 2
    err = capsys.readouterr().err
    assert "no-such-architecture" in err and "Traceback" not in err
