"""Atomic writes: nothing half-written under the final name, nothing left behind."""

from __future__ import annotations

import os
import stat

import pytest

from clipdecomp.io import atomic_dir, atomic_path, atomic_write_text, remove_stale_temporaries


def test_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    target = tmp_path / "result.json"
    atomic_write_text(target, "old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["result.json"]


def test_written_files_get_the_usual_permissions(tmp_path):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "x")
    mask = os.umask(0)
    os.umask(mask)
    assert stat.S_IMODE(target.stat().st_mode) == 0o666 & ~mask


def test_atomic_dir_replaces_whole_folders_and_cleans_up_on_error(tmp_path):
    target = tmp_path / "model"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as tmp:
            (tmp / "weights").write_text("v2-partial")
            raise RuntimeError("interrupted")
    assert (target / "weights").read_text() == "v1"
    with atomic_dir(target) as tmp:
        (tmp / "weights").write_text("v2")
    assert (target / "weights").read_text() == "v2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_stale_temporaries_of_a_killed_writer_are_removed(tmp_path):
    (tmp_path / ".shard-00001.safetensors.abc123.tmp").write_bytes(b"partial")
    (tmp_path / "shard-00000.safetensors").write_bytes(b"complete")
    removed = remove_stale_temporaries(tmp_path)
    assert [p.name for p in removed] == [".shard-00001.safetensors.abc123.tmp"]
    assert [p.name for p in tmp_path.iterdir()] == ["shard-00000.safetensors"]
