"""Benchmark data in their published on-disk formats (see ``shared/notes/protocols.md``).

* :mod:`.imagenet_seg` -- ImageNet-segmentation ``gtsegs_ijcv.mat`` reader/writer and the
  aligned image/mask square crop.
* :mod:`.waterbirds` -- Waterbirds ``metadata.csv``, the data set and group accuracies.
* :mod:`.imagefolder` -- ``ROOT/CLASS/*.jpg`` classification folders.
"""

from .imagefolder import class_folders, classnames, image_folder
from .imagenet_seg import CropBox, ImageNetSegmentation, SquareCrop, crop_box_for, square_crop_pair, write_gtsegs
from .waterbirds import (
    GROUP_NAMES,
    GROUPS,
    WaterbirdsDataset,
    group_accuracies,
    group_table_csv,
    group_table_markdown,
    read_metadata,
    write_metadata,
)

__all__ = [
    "ImageNetSegmentation",
    "write_gtsegs",
    "square_crop_pair",
    "crop_box_for",
    "CropBox",
    "SquareCrop",
    "WaterbirdsDataset",
    "GROUPS",
    "GROUP_NAMES",
    "group_accuracies",
    "group_table_markdown",
    "group_table_csv",
    "read_metadata",
    "write_metadata",
    "image_folder",
    "classnames",
    "class_folders",
]
