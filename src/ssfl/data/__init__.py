"""Data layer: data set loaders, client partitioning, batch augmentation, downloads.

Add a data set with :func:`register_dataset` (see :mod:`ssfl.data.datasets`).
"""

from .augment import normalize, random_crop_flip
from .datasets import (
    DATASETS,
    CorruptDatasetError,
    DatasetNotFoundError,
    ImageDataset,
    default_cache_dir,
    load_dataset,
    register_dataset,
    resolve_root,
)
from .download import ARCHIVES, download_and_extract
from .partition import PARTITIONS, class_counts, matching_test_splits, partition

__all__ = [
    "ARCHIVES",
    "DATASETS",
    "PARTITIONS",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "ImageDataset",
    "class_counts",
    "default_cache_dir",
    "download_and_extract",
    "load_dataset",
    "normalize",
    "matching_test_splits",
    "partition",
    "random_crop_flip",
    "register_dataset",
    "resolve_root",
]
