"""Waterbirds (Sagawa et al. 2019): metadata, data set, group accuracies and tables.

On-disk layout (``shared/notes/protocols.md``)::

    ROOT/metadata.csv      columns img_id, img_filename, y, split, place, place_filename
    ROOT/<img_filename>    the images (paths relative to ROOT)

``y = 1`` waterbird, ``y = 0`` landbird; ``place = 1`` water background, ``0`` land;
``split`` 0/1/2 = train/val/test.  Worst-group accuracy is the minimum over the four
``(y, place)`` groups of the test accuracy.

All accuracies here are **fractions in [0, 1]**; the tables print percentages.
"""

from __future__ import annotations

import csv
import io
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image

from ..errors import InputError
from ..io import atomic_path

__all__ = [
    "COLUMNS",
    "SPLITS",
    "GROUPS",
    "GROUP_NAMES",
    "EXPECTED_LAYOUT",
    "read_metadata",
    "validate_metadata",
    "write_metadata",
    "split_code",
    "WaterbirdsDataset",
    "group_accuracies",
    "group_table_markdown",
    "group_table_csv",
]

COLUMNS: tuple[str, ...] = ("img_id", "img_filename", "y", "split", "place", "place_filename")
SPLITS: dict[str, int] = {"train": 0, "val": 1, "test": 2}
GROUPS: tuple[tuple[int, int], ...] = ((0, 0), (0, 1), (1, 0), (1, 1))  # (y, place)
GROUP_NAMES: tuple[str, ...] = ("landbird-land", "landbird-water", "waterbird-land", "waterbird-water")

EXPECTED_LAYOUT = (
    "expected ROOT/metadata.csv with columns img_id, img_filename, y, split, place, place_filename "
    "(y: 1 waterbird / 0 landbird; place: 1 water / 0 land; split: 0 train / 1 val / 2 test) "
    "and the images at ROOT/<img_filename>"
)


def split_code(split: str | int) -> int:
    """``"train"/"val"/"test"`` or ``0/1/2`` -> 0/1/2."""
    if isinstance(split, str) and split.strip().lower() in SPLITS:
        return SPLITS[split.strip().lower()]
    if isinstance(split, (int, np.integer)) and not isinstance(split, bool) and int(split) in SPLITS.values():
        return int(split)
    raise InputError(f"unknown Waterbirds split {split!r}; accepted: 'train', 'val', 'test' or 0, 1, 2")


def _check_binary(df: Any, column: str, source: str) -> None:
    values = pd.to_numeric(df[column], errors="coerce")
    bad = df[column][values.isna() | ~values.isin([0, 1])]
    if len(bad):
        shown = sorted({str(v) for v in bad.tolist()})[:5]
        raise InputError(
            f"{source}: column {column!r} has {len(bad)} value(s) other than 0/1 (e.g. {shown}); {EXPECTED_LAYOUT}"
        )


def validate_metadata(df: Any, root: str | os.PathLike | None = None, *, source: str = "metadata", check_files: bool = True) -> Any:
    """Check a metadata table; return it with ``y``, ``split``, ``place``, ``img_id`` as ints.

    Raises :class:`InputError` for missing columns, non-0/1 ``y`` or ``place``, unknown
    ``split`` values, missing ``img_filename`` entries and -- when ``root`` is given and
    ``check_files`` -- image files absent under ``root``.
    """
    missing = [c for c in COLUMNS if c not in df.columns]
    if missing:
        raise InputError(f"{source}: missing column(s) {missing} (found {list(df.columns)}); {EXPECTED_LAYOUT}")
    _check_binary(df, "y", source)
    _check_binary(df, "place", source)
    split = pd.to_numeric(df["split"], errors="coerce")
    bad = df["split"][split.isna() | ~split.isin(list(SPLITS.values()))]
    if len(bad):
        shown = sorted({str(v) for v in bad.tolist()})[:5]
        raise InputError(f"{source}: column 'split' has {len(bad)} unknown value(s) (e.g. {shown}); accepted are 0 (train), 1 (val), 2 (test)")
    names = df["img_filename"]
    empty = names.isna() | (names.astype(str).str.strip() == "")
    if empty.any():
        raise InputError(f"{source}: {int(empty.sum())} row(s) have an empty img_filename; {EXPECTED_LAYOUT}")
    out = df.copy()
    for c in ("y", "split", "place"):
        out[c] = pd.to_numeric(out[c]).astype(np.int64)
    if root is not None and check_files:
        root = Path(root)
        absent = [n for n in out["img_filename"].astype(str) if not (root / n).is_file()]
        if absent:
            raise InputError(
                f"{source}: {len(absent)} of {len(out)} image file(s) are missing under {root} "
                f"(e.g. {absent[:3]}); {EXPECTED_LAYOUT}"
            )
    return out


def _metadata_path(root: str | os.PathLike) -> tuple[Path, Path]:
    p = Path(root)
    if p.name == "metadata.csv" or p.is_file():
        return p, p.parent
    return p / "metadata.csv", p


def read_metadata(root: str | os.PathLike, *, check_files: bool = True) -> Any:
    """Read and validate ``ROOT/metadata.csv`` (``root`` may also be the csv's own path).

    Returns a pandas DataFrame with all rows (every split).
    """
    csv_path, folder = _metadata_path(root)
    if not csv_path.is_file():
        raise InputError(f"Waterbirds metadata not found: {csv_path}; {EXPECTED_LAYOUT}")
    try:
        df = pd.read_csv(csv_path)
    except Exception as exc:  # empty file, bad quoting, binary junk ...
        raise InputError(f"{csv_path}: cannot be parsed as CSV ({exc}); {EXPECTED_LAYOUT}") from exc
    return validate_metadata(df, folder, source=str(csv_path), check_files=check_files)


def write_metadata(path: str | os.PathLike, rows: Iterable[Mapping[str, Any] | Sequence[Any]]) -> Path:
    """Write ``metadata.csv`` atomically from ``rows`` (dicts with the six columns, or 6-tuples in
    :data:`COLUMNS` order).  Rows are validated (image files are not checked).  Returns the path."""
    records = []
    for i, r in enumerate(rows):
        if isinstance(r, Mapping):
            missing = [c for c in COLUMNS if c not in r]
            if missing:
                raise InputError(f"write_metadata: row {i} lacks {missing}; each row needs {list(COLUMNS)}")
            records.append({c: r[c] for c in COLUMNS})
        else:
            r = list(r)
            if len(r) != len(COLUMNS):
                raise InputError(f"write_metadata: row {i} has {len(r)} values; expected {len(COLUMNS)}: {list(COLUMNS)}")
            records.append(dict(zip(COLUMNS, r)))
    df = pd.DataFrame.from_records(records, columns=list(COLUMNS))
    df = validate_metadata(df, source="write_metadata", check_files=False)
    path = Path(path)
    with atomic_path(path) as tmp:
        df.to_csv(tmp, index=False)
    return path


class WaterbirdsDataset(torch.utils.data.Dataset):
    """One split of Waterbirds; ``ds[i] -> (image, y, place)``.

    ``image`` is the RGB PIL image, or ``transform(image)`` (e.g. open_clip's preprocess, giving a
    ``[3, S, S]`` tensor); ``y`` and ``place`` are ints.  ``ds.y``, ``ds.place`` (int64 arrays
    ``[n]``) and ``ds.metadata`` (the split's rows) are available without reading images.

    Args:
        root: the folder holding ``metadata.csv`` and the images (or the csv's path).
        split: ``"train"``, ``"val"``, ``"test"`` or 0/1/2.
        transform: applied to the PIL image.
        check_files: verify every image of the split exists (default) when building.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str | int = "test",
        transform: Callable[[Image.Image], Any] | None = None,
        *,
        check_files: bool = True,
    ) -> None:
        code = split_code(split)
        csv_path, folder = _metadata_path(root)
        df = read_metadata(csv_path, check_files=False)
        df = df[df["split"] == code].reset_index(drop=True)
        if check_files:
            validate_metadata(df, folder, source=str(csv_path), check_files=True)
        self.root = folder
        self.split = code
        self.transform = transform
        self.metadata = df
        self.y = df["y"].to_numpy(np.int64)
        self.place = df["place"].to_numpy(np.int64)
        self.filenames = [str(n) for n in df["img_filename"]]

    def __len__(self) -> int:
        return len(self.filenames)

    def __getitem__(self, index: int) -> tuple[Any, int, int]:
        path = self.root / self.filenames[index]
        try:
            with Image.open(path) as im:
                image = im.convert("RGB")
        except FileNotFoundError as exc:
            raise InputError(f"Waterbirds image missing: {path}; {EXPECTED_LAYOUT}") from exc
        except OSError as exc:
            raise InputError(f"Waterbirds image unreadable: {path} ({exc})") from exc
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.y[index]), int(self.place[index])

    def __repr__(self) -> str:
        name = {v: k for k, v in SPLITS.items()}[self.split]
        return f"WaterbirdsDataset({str(self.root)!r}, split={name!r}, n={len(self)})"


# --------------------------------------------------------------------------- evaluation


def _as_int_vector(x: Any, name: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    arr = np.asarray(x)
    if arr.ndim != 1:
        raise InputError(f"{name} must be a 1-D array of 0/1 labels, got shape {list(arr.shape)}")
    if arr.size and not np.isin(arr, (0, 1)).all():
        raise InputError(f"{name} holds values {np.unique(arr)[:5].tolist()}; accepted are 0 and 1")
    return arr.astype(np.int64)


def group_accuracies(pred: Any, y: Any, place: Any) -> dict[str, Any]:
    """Accuracy per ``(y, place)`` group, the worst group and the averages.

    Args:
        pred: ``[n]`` predicted labels 0/1, or ``[n, 2]`` scores/logits (argmax is taken).
        y: ``[n]`` true labels (1 waterbird).
        place: ``[n]`` backgrounds (1 water).
    Returns:
        ``{"groups": {name: {"accuracy", "correct", "count"}}`` for the four
        :data:`GROUP_NAMES` (accuracy NaN for an empty group), ``"worst"`` (min over non-empty
        groups), ``"worst_group"`` (its name), ``"average"`` (accuracy over all samples),
        ``"group_mean"`` (mean of the non-empty groups' accuracies), ``"n"``}.
        Accuracies are fractions in [0, 1].
    """
    if isinstance(pred, torch.Tensor):
        pred = pred.detach().cpu().numpy()
    pred = np.asarray(pred)
    if pred.ndim == 2:
        if pred.shape[1] != 2:
            raise InputError(f"pred of shape {list(pred.shape)}: 2-D scores must be [n, 2] (landbird, waterbird)")
        pred = pred.argmax(1)
    pred = _as_int_vector(pred, "pred")
    y = _as_int_vector(y, "y")
    place = _as_int_vector(place, "place")
    if not (len(pred) == len(y) == len(place)):
        raise InputError(f"pred, y and place must have the same length, got {len(pred)}, {len(y)}, {len(place)}")
    if len(y) == 0:
        raise InputError("group_accuracies: no samples (empty pred/y/place)")
    hit = pred == y
    groups: dict[str, dict[str, Any]] = {}
    for name, (gy, gp) in zip(GROUP_NAMES, GROUPS):
        sel = (y == gy) & (place == gp)
        n = int(sel.sum())
        c = int(hit[sel].sum())
        groups[name] = {"accuracy": c / n if n else float("nan"), "correct": c, "count": n}
    present = {k: v["accuracy"] for k, v in groups.items() if v["count"]}
    worst_group = min(present, key=present.get)
    return {
        "groups": groups,
        "worst": present[worst_group],
        "worst_group": worst_group,
        "average": float(hit.mean()),
        "group_mean": float(np.mean(list(present.values()))),
        "n": int(len(y)),
    }


_TABLE_COLUMNS = (*GROUP_NAMES, "worst", "average")


def _row_values(result: Mapping[str, Any]) -> list[float]:
    try:
        return [float(result["groups"][g]["accuracy"]) for g in GROUP_NAMES] + [float(result["worst"]), float(result["average"])]
    except (KeyError, TypeError) as exc:
        raise InputError(f"a table row must be a group_accuracies() result with 'groups', 'worst', 'average'; missing {exc}") from exc


def _fmt(v: float, percent: bool, digits: int) -> str:
    if math.isnan(v):
        return "-"
    return f"{v * 100:.{digits}f}" if percent else f"{v:.{digits}f}"


def group_table_markdown(results: Mapping[str, Mapping[str, Any]], *, percent: bool = True, digits: int = 1) -> str:
    """Markdown table: one row per model (``results`` keys, in order), columns the four groups,
    worst and average.  Values are percentages with ``digits`` decimals (fractions when
    ``percent=False``); an empty group prints ``-``."""
    unit = " (%)" if percent else ""
    header = "| model | " + " | ".join(f"{c}{unit}" for c in _TABLE_COLUMNS) + " |"
    sep = "|---|" + "---:|" * len(_TABLE_COLUMNS)
    lines = [header, sep]
    for name, res in results.items():
        cells = [_fmt(v, percent, digits) for v in _row_values(res)]
        lines.append(f"| {str(name).replace('|', '/')} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def group_table_csv(results: Mapping[str, Mapping[str, Any]], *, percent: bool = True, digits: int = 2) -> str:
    """The same table as CSV text (header ``model,<groups...>,worst,average`` plus per-group
    counts ``n_<group>``).  Empty groups are left blank."""
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["model", *_TABLE_COLUMNS, *(f"n_{g}" for g in GROUP_NAMES)])
    for name, res in results.items():
        vals = ["" if math.isnan(v) else _fmt(v, percent, digits) for v in _row_values(res)]
        counts = [int(res["groups"][g]["count"]) for g in GROUP_NAMES]
        w.writerow([name, *vals, *counts])
    return buf.getvalue()
