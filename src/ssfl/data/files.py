"""Where data set files live: data root, cache folder, official layouts, file errors.

Both :mod:`ssfl.data.datasets` (which reads the files) and :mod:`ssfl.data.download` (which
fetches them) need these pieces. They live here, in a module that imports neither, so that
the two can import each other's needs without an import cycle:
``files`` <- ``download`` <- ``datasets``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "LAYOUTS",
    "CorruptDatasetError",
    "DatasetNotFoundError",
    "Layout",
    "default_cache_dir",
    "resolve_root",
]


class DatasetNotFoundError(FileNotFoundError):
    """The files of a data set are not where the loader looked for them.

    The message names the files looked for, the folder, and the three fixes: put the
    files there, point ``data.root``/``SSFL_DATA_DIR`` elsewhere, or pass
    ``download=true``.
    """


class CorruptDatasetError(ValueError):
    """A data file exists but its content is wrong; the message names file and problem."""


def resolve_root(root: str | os.PathLike[str] | None) -> Path:
    """Data root: ``root`` if given, else ``$SSFL_DATA_DIR``, else ``~/.cache/ssfl/data``."""
    if root is None:
        env = os.environ.get("SSFL_DATA_DIR")
        root = env if env else Path.home() / ".cache" / "ssfl" / "data"
    return Path(root).expanduser()


def default_cache_dir() -> Path:
    """Where decoded caches go: ``$SSFL_CACHE_DIR``, else ``~/.cache/ssfl``.

    Kept apart from the data root because that may be read-only or shared.
    """
    env = os.environ.get("SSFL_CACHE_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "ssfl"


@dataclass(frozen=True)
class Layout:
    """One on-disk layout of a data set: a folder and the files one split needs."""

    folder: str
    files: dict[str, tuple[str, ...]]  # split -> file names inside folder
    archive: str  # key in ssfl.data.download.ARCHIVES that provides this layout

    def missing(self, root: Path, split: str) -> list[Path]:
        base = root / self.folder
        return [base / f for f in self.files[split] if not (base / f).is_file()]


# The official layouts of the built-in file-backed data sets, preferred one first: the first
# layout's archive is what ``download=true`` fetches (the binary versions: no pickles).
LAYOUTS: dict[str, tuple[Layout, ...]] = {
    "cifar10": (
        Layout("cifar-10-batches-bin",
               {"train": tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
                "test": ("test_batch.bin",)},
               "cifar-10-binary"),
        Layout("cifar-10-batches-py",
               {"train": tuple(f"data_batch_{i}" for i in range(1, 6)),
                "test": ("test_batch",)},
               "cifar-10-python"),
    ),
    "cifar100": (
        Layout("cifar-100-binary", {"train": ("train.bin",), "test": ("test.bin",)},
               "cifar-100-binary"),
        Layout("cifar-100-python", {"train": ("train",), "test": ("test",)},
               "cifar-100-python"),
    ),
    "tinyimagenet": (
        Layout("tiny-imagenet-200",
               {"train": ("wnids.txt",), "test": ("wnids.txt", "val/val_annotations.txt")},
               "tiny-imagenet-200"),
    ),
}
