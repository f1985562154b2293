"""decompose_to_disk: shards + manifest, atomic writes, resume after interruption,
bounded memory, and refusal of non-deterministic loaders."""

from __future__ import annotations

import json
import weakref

import pytest
import torch
from conftest import make_images
from torch.utils.data import DataLoader, TensorDataset

import clipdecomp.streaming as streaming
from clipdecomp.decomposition import decompose
from clipdecomp.errors import InputError, StoreError
from clipdecomp.streaming import DecompositionStore, decompose_to_disk

PARTS = ("embed", "mlps", "heads", "total")


@pytest.fixture(scope="module")
def data(tiny):
    x = make_images(tiny.clip.visual, 10, seed=7)
    y = torch.arange(10) % 3
    return x, y


@pytest.fixture(scope="module")
def one_shot(tiny, data):
    x, _ = data
    dec = decompose(tiny, x, token_layers=None)
    return {"embed": dec.embed, "mlps": dec.mlps, "heads": dec.heads, "total": dec.total()}


def loader_of(data, batch_size=3):
    return DataLoader(TensorDataset(*data), batch_size=batch_size, shuffle=False)


class Interrupted(RuntimeError):
    pass


def interrupting(loader, after_batches):
    for i, batch in enumerate(loader):
        if i == after_batches:
            raise Interrupted("simulated crash")
        yield batch


def no_temp_files(d):
    return not [p.name for p in d.iterdir() if p.name.endswith(".tmp")]


def assert_matches(store, one_shot, tol=1e-5):
    for part, ref in one_shot.items():
        got = store.load(part)
        assert got.shape == ref.shape, part
        assert torch.allclose(got, ref, rtol=tol, atol=tol), part


def test_shards_and_manifest(tiny, data, one_shot, tmp_path):
    store = decompose_to_disk(tiny, loader_of(data), tmp_path, parts=PARTS, shard_size=4, progress=False)
    files = sorted(p.name for p in tmp_path.iterdir())
    assert files == ["manifest.json", "shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors"]
    m = json.loads((tmp_path / "manifest.json").read_text())
    assert m["model"] == tiny.name and m["parts"] == list(PARTS) and m["complete"] and m["num_images"] == 10
    assert m["shapes"] == {"embed": [24], "mlps": [3, 24], "heads": [3, 4, 24], "total": [24]}
    assert [(s["first"], s["last"], s["count"]) for s in m["shards"]] == [(0, 3, 4), (4, 7, 4), (8, 9, 2)]
    assert len(store) == 10 and store.complete and store.parts == PARTS + ("labels",)
    assert_matches(store, one_shot)
    assert torch.equal(store.load("labels"), data[1])
    shards = list(store)
    assert [s["heads"].shape[0] for s in shards] == [4, 4, 2]
    with pytest.raises(InputError, match="not stored"):
        store.load("norm")


def test_interrupt_then_resume(tiny, data, one_shot, tmp_path, monkeypatch):
    # batches of 3, shards of 4: after 3 batches (9 images) two shards are on disk
    with pytest.raises(Interrupted):
        decompose_to_disk(tiny, interrupting(loader_of(data), 3), tmp_path, parts=PARTS, shard_size=4, progress=False)
    partial = DecompositionStore(tmp_path)
    assert not partial.complete and len(partial) == 8 and len(partial.manifest["shards"]) == 2
    assert no_temp_files(tmp_path)
    first_shard = (tmp_path / "shard-00000.safetensors").read_bytes()

    decomposed = []
    real = streaming.decompose

    def counting(model, images, **kw):
        decomposed.append(images.shape[0])
        return real(model, images, **kw)

    monkeypatch.setattr(streaming, "decompose", counting)
    store = decompose_to_disk(tiny, loader_of(data), tmp_path, parts=PARTS, shard_size=4, progress=False)
    assert sum(decomposed) == 2  # only images 8 and 9 were decomposed again
    assert store.complete and len(store) == 10
    assert (tmp_path / "shard-00000.safetensors").read_bytes() == first_shard
    assert_matches(store, one_shot)
    assert torch.equal(store.load("labels"), data[1])
    assert no_temp_files(tmp_path)

    # a complete store is not recomputed (the loader is not even iterated)
    decomposed.clear()
    decompose_to_disk(tiny, interrupting(loader_of(data), 0), tmp_path, parts=PARTS, shard_size=4, progress=False)
    assert decomposed == []


def test_resume_after_crash_mid_write(tiny, data, one_shot, tmp_path):
    """A stray temp file and a shard missing from disk are recovered from."""
    decompose_to_disk(tiny, loader_of(data), tmp_path, parts=PARTS, shard_size=4, progress=False)
    (tmp_path / ".tmp-shard-00003.safetensors").write_bytes(b"half written")
    (tmp_path / "shard-00001.safetensors").unlink()
    store = decompose_to_disk(tiny, loader_of(data, 5), tmp_path, parts=PARTS, shard_size=4, progress=False)
    assert no_temp_files(tmp_path) and store.complete
    assert_matches(store, one_shot)


def test_other_run_in_same_folder_refused(tiny, data, tmp_path):
    with pytest.raises(Interrupted):
        decompose_to_disk(tiny, interrupting(loader_of(data), 2), tmp_path, shard_size=4, progress=False)
    with pytest.raises(StoreError, match="another run"):
        decompose_to_disk(tiny, loader_of(data), tmp_path, parts=("heads",), shard_size=4, progress=False)
    with pytest.raises(StoreError, match="another run"):
        decompose_to_disk(tiny, loader_of(data), tmp_path, shard_size=2, progress=False)


def test_nondeterministic_loader_detected_on_resume(tiny, data, tmp_path):
    with pytest.raises(Interrupted):
        decompose_to_disk(tiny, interrupting(loader_of(data), 3), tmp_path, shard_size=4, progress=False)
    x, y = data
    perm = torch.randperm(10, generator=torch.Generator().manual_seed(0))
    with pytest.raises(StoreError, match="not deterministic"):
        decompose_to_disk(tiny, loader_of((x[perm], y[perm])), tmp_path, shard_size=4, progress=False)


def test_shuffling_loader_refused(tiny, data, tmp_path):
    with pytest.raises(InputError, match="shuffle=False"):
        decompose_to_disk(tiny, DataLoader(TensorDataset(*data), batch_size=2, shuffle=True), tmp_path, progress=False)


def test_bad_arguments(tiny, data, tmp_path):
    with pytest.raises(InputError, match="parts"):
        decompose_to_disk(tiny, loader_of(data), tmp_path, parts=("heads", "tokens"), progress=False)
    with pytest.raises(InputError, match="shard_size"):
        decompose_to_disk(tiny, loader_of(data), tmp_path, shard_size=0, progress=False)
    with pytest.raises(StoreError, match="no manifest.json"):
        DecompositionStore(tmp_path / "absent")


def test_memory_does_not_grow_with_dataset(tiny, tmp_path, monkeypatch):
    """Results produced per batch are released once their shard is written: the number
    alive at any time is bounded by shard_size + batch, not by the dataset size."""
    alive = {"now": 0, "max": 0}
    real = streaming._part_tensors

    def tracked(dec, parts):
        out = real(dec, parts)
        for t in out.values():
            alive["now"] += t.shape[0]
            weakref.finalize(t, lambda n=t.shape[0]: alive.__setitem__("now", alive["now"] - n))
        alive["max"] = max(alive["max"], alive["now"])
        return out

    monkeypatch.setattr(streaming, "_part_tensors", tracked)
    x = make_images(tiny.clip.visual, 2, seed=1)
    loader = [x] * 20  # 40 images, batches of 2, shards of 4
    decompose_to_disk(tiny, loader, tmp_path, parts=("heads",), shard_size=4, progress=False)
    assert len(DecompositionStore(tmp_path)) == 40
    assert alive["max"] <= 4 + 2  # one shard plus one batch of images, whatever the dataset size
