"""The toy benchmark data sets read back with the standard readers."""

from __future__ import annotations

import h5py
import numpy as np
import pandas as pd
import pytest
from torchvision.datasets import ImageFolder

from clipdecomp.toyworld.datasets import make_datasets
from clipdecomp.toyworld.world import SHAPES


@pytest.fixture(scope="module")
def toydata(tmp_path_factory):
    out = tmp_path_factory.mktemp("toydata")
    make_datasets(out, seed=3, scale=0.02)
    return out


def test_waterbirds_layout_reads_with_pandas(toydata):
    meta = pd.read_csv(toydata / "waterbirds" / "metadata.csv")
    assert list(meta.columns) == ["img_id", "img_filename", "y", "split", "place", "place_filename"]
    assert set(meta["split"]) == {0, 1, 2} and set(meta["y"]) == {0, 1} and set(meta["place"]) == {0, 1}
    assert all((toydata / "waterbirds" / f).is_file() for f in meta["img_filename"])
    test = meta[meta["split"] == 2]
    counts = test.groupby(["y", "place"]).size()
    assert len(counts) == 4 and counts.max() - counts.min() <= 1  # balanced groups
    train = meta[meta["split"] == 0]
    assert (train["y"] == train["place"]).mean() > 0.8  # the spurious correlation


def test_segmentation_mat_reads_with_h5py(toydata):
    with h5py.File(toydata / "segmentation" / "gtsegs_ijcv.mat", "r") as f:
        imgs, gts = f["/value/img"], f["/value/gt"]
        assert imgs.shape == gts.shape and imgs.shape[1] == 1 and imgs.shape[0] >= 8
        image = np.array(f[imgs[0, 0]]).transpose(2, 1, 0)
        mask = np.array(f[f[gts[0, 0]][0, 0]]).T
    assert image.shape[2] == 3 and image.dtype == np.uint8
    assert mask.shape == image.shape[:2] and set(np.unique(mask)) <= {0, 1} and mask.sum() > 50


def test_classification_reads_with_imagefolder(toydata):
    for split in ("train", "val"):
        ds = ImageFolder(str(toydata / "classification" / split))
        assert sorted(ds.classes) == sorted(SHAPES)
        assert len(ds) == 2 * len(SHAPES)


def test_datasets_are_deterministic_by_seed(tmp_path, toydata):
    make_datasets(tmp_path, seed=3, scale=0.02)
    a = pd.read_csv(toydata / "waterbirds" / "metadata.csv")
    b = pd.read_csv(tmp_path / "waterbirds" / "metadata.csv")
    assert a.equals(b)
    first = a["img_filename"][0]
    assert (toydata / "waterbirds" / first).read_bytes() == (tmp_path / "waterbirds" / first).read_bytes()
