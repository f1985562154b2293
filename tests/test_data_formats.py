"""Tests of the benchmark data formats: gtsegs_ijcv.mat, Waterbirds metadata, ImageFolder."""
from __future__ import annotations

import math
import pickle
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image
from torchvision import transforms

from clipdecomp.data.imagefolder import classnames, image_folder
from clipdecomp.data.imagenet_seg import (
    ImageNetSegmentation,
    crop_box_for,
    square_crop_pair,
    write_gtsegs,
)
from clipdecomp.data.waterbirds import (
    COLUMNS,
    GROUP_NAMES,
    GROUPS,
    WaterbirdsDataset,
    group_accuracies,
    group_table_csv,
    group_table_markdown,
    read_metadata,
    write_metadata,
)
from clipdecomp.errors import InputError

# ----------------------------------------------------------------- ImageNet-segmentation file

SIZES = [(5, 7), (9, 4), (6, 6), (3, 11)]  # (H, W), mostly non-square


def _items(seed: int = 0) -> list[tuple[np.ndarray, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [
        (rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (rng.random((h, w)) > 0.5).astype(np.uint8))
        for h, w in SIZES
    ]


@pytest.fixture()
def gtsegs(tmp_path: Path) -> tuple[Path, list[tuple[np.ndarray, np.ndarray]]]:
    items = _items()
    path = tmp_path / "gtsegs_ijcv.mat"
    assert write_gtsegs(path, (pair for pair in items)) == len(items)  # a generator is fine
    return path, items


def test_gtsegs_round_trip(gtsegs) -> None:
    path, items = gtsegs
    ds = ImageNetSegmentation(path)
    assert len(ds) == len(items)
    for (image, mask), (want_img, want_mask) in zip(ds, items):
        assert image.dtype == np.uint8 and mask.dtype == np.uint8
        np.testing.assert_array_equal(image, want_img)
        np.testing.assert_array_equal(mask, want_mask)
    np.testing.assert_array_equal(ds[-1][0], items[-1][0])
    with pytest.raises(IndexError):
        ds[len(items)]
    assert sorted(p.name for p in path.parent.iterdir()) == ["gtsegs_ijcv.mat"]  # no temp file left


def test_gtsegs_raw_layout_matches_protocol(gtsegs) -> None:
    path, items = gtsegs
    with open(path, "rb") as fh:
        head = fh.read(128)
    assert head.startswith(b"MATLAB 7.3 MAT-file") and head[126:128] == b"IM"
    with h5py.File(path, "r") as f:
        img, gt = f["value/img"], f["value/gt"]
        assert img.shape == (len(items), 1) and gt.shape == (len(items), 1)
        assert h5py.check_dtype(ref=img.dtype) is h5py.Reference
        assert h5py.check_dtype(ref=gt.dtype) is h5py.Reference
        assert f.userblock_size == 512
        for i, (h, w) in enumerate(SIZES):
            stored = f[img[i, 0]]
            assert stored.shape == (3, w, h) and stored.dtype == np.uint8
            np.testing.assert_array_equal(stored[()].transpose(2, 1, 0), items[i][0])
            cell = f[gt[i, 0]]
            mask = f[cell[0, 0]]
            assert mask.shape == (w, h)
            np.testing.assert_array_equal(mask[()].T, items[i][1])


def test_gtsegs_pickles_and_transform(gtsegs) -> None:
    path, items = gtsegs
    ds = ImageNetSegmentation(path, transform=lambda im, m: (im.shape, int(m.sum())))
    assert ds[0] == (items[0][0].shape, int(items[0][1].sum()))
    plain = ImageNetSegmentation(path)
    plain[0]  # opens the handle
    clone = pickle.loads(pickle.dumps(plain))  # what DataLoader workers receive
    np.testing.assert_array_equal(clone[1][1], items[1][1])
    plain.close()
    np.testing.assert_array_equal(plain[2][0], items[2][0])  # reopens


def test_gtsegs_missing_and_not_hdf5(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        ImageNetSegmentation(tmp_path / "nope.mat")
    with pytest.raises(InputError, match="not a file"):
        ImageNetSegmentation(tmp_path)
    old = tmp_path / "v5.mat"
    old.write_bytes(b"MATLAB 5.0 MAT-file" + b"\0" * 200)
    with pytest.raises(InputError, match="HDF5"):
        ImageNetSegmentation(old)


def _h5(path: Path, build) -> Path:
    with h5py.File(path, "w") as f:
        build(f)
    return path


def test_gtsegs_malformed_layouts(tmp_path: Path) -> None:
    def no_value(f):
        f.create_dataset("img", data=np.zeros((1, 1)))

    def numeric_img(f):
        f.create_dataset("value/img", data=np.zeros((2, 1)))
        f.create_dataset("value/gt", data=np.zeros((2, 1)))

    def refs(f, n_img, n_gt, cols=1):
        d = f.create_dataset("data", data=np.zeros((3, 2, 2), np.uint8))
        for key, n in (("img", n_img), ("gt", n_gt)):
            ds = f.create_dataset(f"value/{key}", shape=(n, cols), dtype=h5py.ref_dtype)
            for i in range(n):
                ds[i, 0] = d.ref

    cases = {
        "no group /value": no_value,
        "not an array of object references": numeric_img,
        r"expected \[n, 1\]": lambda f: refs(f, 2, 2, cols=2),
        "same length": lambda f: refs(f, 2, 3),
    }
    for i, (message, build) in enumerate(cases.items()):
        with pytest.raises(InputError, match=message):
            ImageNetSegmentation(_h5(tmp_path / f"bad{i}.mat", build))


def test_gtsegs_malformed_items(tmp_path: Path) -> None:
    def build(f, image, mask):
        d_img = f.create_dataset("r/img", data=image)
        d_mask = f.create_dataset("r/mask", data=mask)
        cell = f.create_dataset("r/cell", shape=(1, 1), dtype=h5py.ref_dtype)
        cell[0, 0] = d_mask.ref
        f.create_dataset("value/img", shape=(1, 1), dtype=h5py.ref_dtype)[0, 0] = d_img.ref
        f.create_dataset("value/gt", shape=(1, 1), dtype=h5py.ref_dtype)[0, 0] = cell.ref

    good_img = np.zeros((3, 4, 5), np.uint8)  # [3, W, H]
    cases = {
        r"expected \[3, W, H\]": (np.zeros((4, 5, 3), np.uint8), np.zeros((4, 5), np.uint8)),
        "same size": (good_img, np.zeros((5, 4), np.uint8)),
        "accepted values are 0": (good_img, np.full((4, 5), 255, np.uint8)),
    }
    for i, (message, (image, mask)) in enumerate(cases.items()):
        ds = ImageNetSegmentation(_h5(tmp_path / f"item{i}.mat", lambda f: build(f, image, mask)))
        with pytest.raises(InputError, match=message):
            ds[0]
        ds.close()


def test_write_gtsegs_rejects_bad_items(tmp_path: Path) -> None:
    img = np.zeros((4, 5, 3), np.uint8)
    bad = {
        r"expected \[H, W, 3\]": [(np.zeros((4, 5)), np.zeros((4, 5)))],
        "the image's height and width": [(img, np.zeros((5, 4)))],
        "accepted are 0 and 1": [(img, np.full((4, 5), 2))],
        "expected uint8": [(img.astype(np.float32) + 0.5, np.zeros((4, 5)))],
        "not an .image, mask. pair": [img],
    }
    target = tmp_path / "out.mat"
    for message, items in bad.items():
        with pytest.raises(InputError, match=message):
            write_gtsegs(target, items)
        assert list(tmp_path.iterdir()) == []  # atomic: nothing left behind


# ----------------------------------------------------------------- aligned square crop


def test_crop_box_geometry() -> None:
    c = crop_box_for(100, 200, 50)  # landscape: resize to 50 x 100, crop columns 25..75
    assert c.resized_hw == (50, 100) and c.box == (25, 0, 75, 50)
    assert c.source_box == (50.0, 0.0, 150.0, 100.0) and c.native_box == (50, 0, 150, 100)
    c = crop_box_for(10, 15, 4)  # resize to 4 x int(6.0) = 6, left = round(1.0) = 1
    assert c.resized_hw == (4, 6) and c.box == (1, 0, 5, 4)
    assert c.source_box == pytest.approx((2.5, 0.0, 12.5, 10.0))
    c = crop_box_for(9, 7, 3)  # portrait: resize to int(3 * 9 / 7) = 3 x 3 -> no crop
    assert c.resized_hw == (3, 3) and c.box == (0, 0, 3, 3) and c.native_box == (0, 0, 7, 9)
    with pytest.raises(InputError):
        crop_box_for(10, 10, 0)


@pytest.mark.parametrize("hw", [(37, 53), (64, 29), (40, 40), (24, 41)])
def test_square_crop_matches_torchvision_preprocess(hw: tuple[int, int]) -> None:
    rng = np.random.default_rng(1)
    h, w = hw
    image = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    mask = (rng.random((h, w)) > 0.5).astype(np.uint8)
    size = 24
    ref = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.BICUBIC), transforms.CenterCrop(size)])
    out = square_crop_pair(image, mask, size)
    assert out.image.size == (size, size) and out.mask.shape == (size, size) and out.mask.dtype == np.uint8
    np.testing.assert_array_equal(np.asarray(out.image), np.asarray(ref(Image.fromarray(image))))
    ref_mask = transforms.Compose([transforms.Resize(size, interpolation=transforms.InterpolationMode.NEAREST), transforms.CenterCrop(size)])
    np.testing.assert_array_equal(out.mask, np.asarray(ref_mask(Image.fromarray(mask))))


def test_square_crop_keeps_mask_aligned() -> None:
    # 40 x 60 image: the object is the left third (columns 0..19), drawn white in the image too.
    mask = np.zeros((40, 60), np.uint8)
    mask[:, :20] = 1
    image = np.repeat((mask * 255)[..., None], 3, axis=2).astype(np.uint8)
    out = square_crop_pair(Image.fromarray(image), mask.astype(bool), 20)
    # resized 20 x 30, crop columns 5..25: object columns 0..4 of the crop
    want = np.zeros((20, 20), np.uint8)
    want[:, :5] = 1
    np.testing.assert_array_equal(out.mask, want)
    assert ((np.asarray(out.image)[..., 0] > 127) == want.astype(bool)).mean() >= 0.95
    # the known flaw: squashing the mask to 20 x 20 marks 7 columns instead of 5
    squashed = np.asarray(Image.fromarray(mask).resize((20, 20), Image.NEAREST))
    assert (squashed != want).mean() >= 0.09
    native = out.crop.crop_native(mask)  # same region at the mask's own resolution
    assert native.shape == (40, 40) and native[:, :10].all() and not native[:, 10:].any()
    with pytest.raises(InputError):
        out.crop.crop_native(np.zeros((5, 5)))


def test_square_crop_rejects_mismatch() -> None:
    with pytest.raises(InputError, match="must match"):
        square_crop_pair(np.zeros((4, 6, 3), np.uint8), np.zeros((6, 4)), 4)
    with pytest.raises(InputError, match="uint8"):
        square_crop_pair(np.zeros((4, 6), np.uint8), np.zeros((4, 6)), 4)


# ----------------------------------------------------------------- Waterbirds

def _rows(n_per_split: int = 4) -> list[dict]:
    rows = []
    for split in (0, 1, 2):
        for k in range(n_per_split):
            y, place = GROUPS[k % 4]
            i = len(rows)
            rows.append({
                "img_id": i, "img_filename": f"{'water' if y else 'land'}bird/img_{i:03d}.png",
                "y": y, "split": split, "place": place, "place_filename": f"/bg/{i}.png",
            })
    return rows


@pytest.fixture()
def waterbirds(tmp_path: Path) -> Path:
    root = tmp_path / "waterbirds"
    rows = _rows()
    for r in rows:
        p = root / r["img_filename"]
        p.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.full((4, 5, 3), r["img_id"], np.uint8)).save(p)
    write_metadata(root / "metadata.csv", rows)
    return root


def test_waterbirds_metadata_round_trip(waterbirds: Path) -> None:
    df = read_metadata(waterbirds)
    assert list(df.columns) == list(COLUMNS) and len(df) == 12
    assert df.equals(read_metadata(waterbirds / "metadata.csv"))
    assert df.to_dict("records") == _rows()
    tuples = [tuple(r[c] for c in COLUMNS) for r in _rows()]
    write_metadata(waterbirds / "copy.csv", tuples)
    assert pd.read_csv(waterbirds / "copy.csv").equals(pd.read_csv(waterbirds / "metadata.csv"))


def test_waterbirds_dataset(waterbirds: Path) -> None:
    ds = WaterbirdsDataset(waterbirds, "test")
    assert len(ds) == 4 and ds.split == 2
    assert [tuple(g) for g in zip(ds.y, ds.place)] == list(GROUPS)
    image, y, place = ds[1]
    assert isinstance(image, Image.Image) and image.mode == "RGB" and (y, place) == (0, 1)
    assert np.asarray(image)[0, 0, 0] == 9  # img_id 9 is the second test row
    tds = WaterbirdsDataset(waterbirds, 0, transform=transforms.ToTensor())
    t, y, place = tds[3]
    assert isinstance(t, torch.Tensor) and t.shape == (3, 4, 5) and (y, place) == (1, 1)
    assert len(WaterbirdsDataset(waterbirds / "metadata.csv", "VAL")) == 4


def _write_csv(root: Path, df: pd.DataFrame) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    df.to_csv(root / "metadata.csv", index=False)
    return root


def test_waterbirds_validation_errors(waterbirds: Path, tmp_path: Path) -> None:
    good = pd.read_csv(waterbirds / "metadata.csv")
    with pytest.raises(InputError, match="not found"):
        read_metadata(tmp_path / "empty")
    cases = {
        r"missing column\(s\) \['place'\]": good.drop(columns=["place"]),
        "'y' has 1 value": good.assign(y=[2] + good["y"].tolist()[1:]),
        "'place' has 1 value": good.assign(place=["water"] + good["place"].tolist()[1:]),
        "'split' has 2 unknown": good.assign(split=[3, -1] + good["split"].tolist()[2:]),
        "empty img_filename": good.assign(img_filename=[""] + good["img_filename"].tolist()[1:]),
    }
    for i, (message, df) in enumerate(cases.items()):
        root = _write_csv(tmp_path / f"case{i}", df)
        with pytest.raises(InputError, match=message):
            read_metadata(root, check_files=False)
    (waterbirds / "waterbird/img_011.png").unlink()  # a test image
    with pytest.raises(InputError, match="1 of 12 image file"):
        read_metadata(waterbirds)
    WaterbirdsDataset(waterbirds, "train")  # other splits unaffected
    with pytest.raises(InputError, match="1 of 4 image file"):
        WaterbirdsDataset(waterbirds, "test")
    ds = WaterbirdsDataset(waterbirds, "test", check_files=False)
    with pytest.raises(InputError, match="missing"):
        ds[3]
    with pytest.raises(InputError, match="accepted: 'train', 'val', 'test'"):
        WaterbirdsDataset(waterbirds, "validation")
    (tmp_path / "blank").mkdir()
    (tmp_path / "blank" / "metadata.csv").write_text("")
    with pytest.raises(InputError, match="cannot be parsed"):
        read_metadata(tmp_path / "blank")
    with pytest.raises(InputError, match="lacks"):
        write_metadata(tmp_path / "m.csv", [{"img_id": 0}])
    with pytest.raises(InputError, match="expected 6"):
        write_metadata(tmp_path / "m.csv", [(0, "a.png", 1)])
    with pytest.raises(InputError, match="'y'"):
        write_metadata(tmp_path / "m.csv", [(0, "a.png", 5, 0, 0, "b.png")])
    assert not (tmp_path / "m.csv").exists()


# Hand-made case:
#   landbird-land   (y0 p0): rows 0-2, pred 0 0 1 -> 2/3
#   landbird-water  (y0 p1): rows 3-4, pred 1 1   -> 0/2
#   waterbird-land  (y1 p0): row 5,    pred 1     -> 1/1
#   waterbird-water (y1 p1): rows 6-7, pred 1 0   -> 1/2
#   worst 0 (landbird-water); average 4/8; group mean (2/3 + 0 + 1 + 1/2) / 4 = 13/24
Y = [0, 0, 0, 0, 0, 1, 1, 1]
PLACE = [0, 0, 0, 1, 1, 0, 1, 1]
PRED = [0, 0, 1, 1, 1, 1, 1, 0]


def test_group_accuracies_hand_case() -> None:
    r = group_accuracies(PRED, Y, PLACE)
    accs = [r["groups"][g]["accuracy"] for g in GROUP_NAMES]
    assert accs == pytest.approx([2 / 3, 0.0, 1.0, 0.5])
    assert [r["groups"][g]["count"] for g in GROUP_NAMES] == [3, 2, 1, 2]
    assert r["worst"] == 0.0 and r["worst_group"] == "landbird-water"
    assert r["average"] == pytest.approx(0.5) and r["group_mean"] == pytest.approx(13 / 24)
    assert r["n"] == 8
    logits = torch.tensor([[1.0, 0.0] if p == 0 else [0.0, 1.0] for p in PRED])
    assert group_accuracies(logits, torch.tensor(Y), np.array(PLACE)) == r


def test_group_accuracies_empty_group_and_errors() -> None:
    # waterbird-water: rows 0-1, pred 1 0 -> 1/2; landbird-land: row 2, pred 1 -> 0; the other two are empty
    r = group_accuracies([1, 0, 1], [1, 1, 0], [1, 1, 0])
    assert r["groups"]["waterbird-land"]["count"] == 0 and math.isnan(r["groups"]["waterbird-land"]["accuracy"])
    assert r["groups"]["landbird-water"]["count"] == 0
    assert r["worst"] == 0.0 and r["worst_group"] == "landbird-land"  # pred 1 for y 0
    assert r["group_mean"] == pytest.approx(0.25)  # (0 + 1/2) / 2, over the two present groups
    assert r["average"] == pytest.approx(1 / 3)
    with pytest.raises(InputError, match="same length"):
        group_accuracies([0, 1], [0], [0])
    with pytest.raises(InputError, match="accepted are 0 and 1"):
        group_accuracies([0, 2], [0, 1], [0, 1])
    with pytest.raises(InputError, match=r"\[n, 2\]"):
        group_accuracies(np.zeros((2, 3)), [0, 1], [0, 1])
    with pytest.raises(InputError, match="no samples"):
        group_accuracies([], [], [])


def test_group_tables() -> None:
    a = group_accuracies(PRED, Y, PLACE)
    b = group_accuracies(Y, Y, PLACE)  # perfect
    md = group_table_markdown({"ViT-B-16": a, "ablated": b})
    lines = md.strip().split("\n")
    assert lines[0] == (
        "| model | landbird-land (%) | landbird-water (%) | waterbird-land (%) | waterbird-water (%) | worst (%) | average (%) |"
    )
    assert lines[2] == "| ViT-B-16 | 66.7 | 0.0 | 100.0 | 50.0 | 0.0 | 50.0 |"
    assert lines[3] == "| ablated | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 | 100.0 |"
    text = group_table_csv({"ViT-B-16": a}, percent=False, digits=4)
    header, row = text.strip().split("\n")
    assert header.split(",")[:7] == ["model", *GROUP_NAMES, "worst", "average"]
    assert row == "ViT-B-16,0.6667,0.0000,1.0000,0.5000,0.0000,0.5000,3,2,1,2"
    with pytest.raises(InputError, match="group_accuracies"):
        group_table_markdown({"x": {"worst": 1.0}})


# ----------------------------------------------------------------- ImageFolder


def test_imagefolder(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="not found"):
        image_folder(tmp_path / "missing")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        classnames(tmp_path / "file.txt")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputError, match="no class sub-folders"):
        image_folder(empty)
    root = tmp_path / "cls"
    for name in ("tench", "great_white_shark"):
        (root / name).mkdir(parents=True)
        Image.fromarray(np.zeros((3, 3, 3), np.uint8)).save(root / name / "a.png")
    (root / "zebra").mkdir()
    with pytest.raises(InputError, match="zebra"):  # a class folder without images
        image_folder(root)
    (root / "zebra").rmdir()
    assert classnames(root) == ["great white shark", "tench"]
    ds = image_folder(root, transform=transforms.ToTensor())
    assert len(ds) == 2 and ds.classes == ["great_white_shark", "tench"]
    image, label = ds[1]
    assert image.shape == (3, 3, 3) and label == 1
