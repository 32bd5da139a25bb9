"""Image data sets as whole uint8 tensors, read from their official on-disk layouts.

Every loader returns an :class:`ImageDataset` holding *all* images of one split as a
single contiguous ``uint8`` tensor ``[N, C, H, W]``.  Federated training then only
indexes into that tensor (client shards, mini-batches) and augments whole batches at
once (see :mod:`ssfl.data.augment`), which is far cheaper than per-image
``Dataset.__getitem__`` calls for small images such as CIFAR.

Built-in data sets (names in :data:`DATASETS`):

* ``cifar10``: ``root/cifar-10-batches-bin/`` (binary version) or
  ``root/cifar-10-batches-py/`` (python version).
* ``cifar100``: ``root/cifar-100-binary/`` or ``root/cifar-100-python/``; fine labels.
* ``tinyimagenet``: ``root/tiny-imagenet-200/`` (official folder layout, JPEGs); split
  ``"test"`` is the official *val* set, because the official test set has no labels.
  Decoded images are cached as ``.npy`` under ``SSFL_CACHE_DIR`` (never in ``root``).
* ``digits``: scikit-learn's bundled 8x8 handwritten digits; needs no files at all.

Files on disk are validated (record sizes, label ranges, array shapes) and never
checksum-verified: only archives that are *downloaded* are (see
:mod:`ssfl.data.download`), so re-packed or re-ordered copies of the data still load.
Python-version pickles are read with a restricted unpickler that can only rebuild
numpy arrays, so a malicious file cannot run code.

Adding a data set from user code: decorate a loader ``(root, split, download) ->
ImageDataset`` with :func:`register_dataset`; :func:`load_dataset` and the config's
``data.dataset`` then accept its name. ``root`` arrives resolved (the ``root`` argument,
else ``$SSFL_DATA_DIR``, else ``~/.cache/ssfl/data``); ``split`` is ``"train"`` or
``"test"``. Register before the config is validated, e.g. at import of your module (every
process that loads data, such as a Flower node, must import that module too)::

    import torch
    from ssfl.data import ImageDataset, load_dataset, register_dataset

    @register_dataset("noise")
    def load_noise(root, split, download):
        g = torch.Generator().manual_seed(0 if split == "train" else 1)
        images = torch.randint(0, 256, (100, 1, 8, 8), dtype=torch.uint8, generator=g)
        labels = torch.randint(0, 2, (100,), generator=g)
        return ImageDataset("noise", images, labels, num_classes=2,
                            class_names=("a", "b"), mean=(0.5,), std=(0.29,))

    train = load_dataset("noise", None, "train")

A loader that reads files should also pass ``files=`` (see :func:`register_dataset`), so
that caches derived from the data notice when the files change.
"""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from types import MappingProxyType
from typing import Any, Callable, Literal, Protocol, Sequence, TypeVar

import numpy as np
import torch

from .download import download_and_extract

# Defined in .files so that download.py can use them without importing this module;
# re-exported here, where callers have always imported them from.
from .files import (
    LAYOUTS,
    CorruptDatasetError,
    DatasetNotFoundError,
    Layout,
    default_cache_dir,
    resolve_root,
)

__all__ = [
    "DATASETS",
    "CorruptDatasetError",
    "DatasetLoader",
    "DatasetNotFoundError",
    "ImageDataset",
    "SourceFiles",
    "default_cache_dir",
    "load_dataset",
    "register_dataset",
    "resolve_root",
    "source_files",
]

Split = Literal["train", "test"]

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
TINYIMAGENET_MEAN = (0.4802, 0.4481, 0.3975)
TINYIMAGENET_STD = (0.2302, 0.2265, 0.2262)

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)

_CIFAR_PIXELS = 3 * 32 * 32
_TINY_SIZE = 64
# Bump when the tinyimagenet cache format or decoding changes, to invalidate old caches.
_TINY_CACHE_VERSION = 1


# --------------------------------------------------------------------------- types


@dataclass(frozen=True, eq=False)
class ImageDataset:
    """One split of an image data set, fully in memory.

    Immutable; ``eq=False`` because field-wise ``==`` on tensors is ambiguous (identity
    comparison and hashing instead).

    ``images`` is ``uint8 [N, C, H, W]`` (contiguous) and ``labels`` is ``int64 [N]``;
    ``mean``/``std`` are the per-channel normalisation constants in [0, 1] units that
    :func:`ssfl.data.augment.normalize` expects.
    """

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def __post_init__(self) -> None:
        # Catch loader bugs at construction time rather than deep inside training.
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"{self.name}: images must be uint8 [N,C,H,W], got "
                             f"{self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dtype != torch.int64 or self.labels.shape != (self.images.shape[0],):
            raise ValueError(f"{self.name}: labels must be int64 [N] with N="
                             f"{self.images.shape[0]}, got {self.labels.dtype} "
                             f"{tuple(self.labels.shape)}")
        channels = self.images.shape[1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"{self.name}: mean/std need {channels} entries")
        if len(self.class_names) != self.num_classes:
            raise ValueError(f"{self.name}: {len(self.class_names)} class names for "
                             f"{self.num_classes} classes")

    def __len__(self) -> int:
        return int(self.labels.shape[0])


# --------------------------------------------------------------------------- registry


class DatasetLoader(Protocol):
    """Loads one split: ``(root, split, download) -> ImageDataset``.

    ``root`` is already resolved (see :func:`resolve_root`); loaders that need no files
    ignore it, and ``download`` too. Raise :class:`DatasetNotFoundError` for missing and
    :class:`CorruptDatasetError` for malformed files.
    """

    def __call__(self, root: Path, split: Split, download: bool) -> ImageDataset: ...


class SourceFiles(Protocol):
    """The files a loader reads for ``(root, split)``, without reading them."""

    def __call__(self, root: Path, split: Split) -> list[Path]: ...


LoaderT = TypeVar("LoaderT", bound=DatasetLoader)

_LOADERS: dict[str, DatasetLoader] = {}
_SOURCE_FILES: dict[str, SourceFiles] = {}

#: Registered data sets, name -> loader, in registration order (built-ins first). A read-only
#: live view: add entries with :func:`register_dataset`, which checks for clashes.
DATASETS: Mapping[str, DatasetLoader] = MappingProxyType(_LOADERS)


def _normalize(name: str) -> str:
    # Lookups forgive case, "-" and "_" ("CIFAR-10", "tiny_imagenet"), as they always have.
    return name.lower().replace("-", "").replace("_", "")


def _registered_name(name: str) -> str | None:
    """The registered name that ``name`` spells, ignoring case, ``-`` and ``_``."""
    if name in _LOADERS:
        return name
    key = _normalize(name)
    return next((known for known in _LOADERS if _normalize(known) == key), None)


def _known_name(name: str) -> str:
    known = _registered_name(name)
    if known is None:
        raise ValueError(f"unknown data set {name!r}; choose one of {', '.join(_LOADERS)}")
    return known


def register_dataset(
    name: str, *, files: SourceFiles | None = None, replace: bool = False
) -> Callable[[LoaderT], LoaderT]:
    """Decorator that makes a loader available to :func:`load_dataset` as ``name``.

    Args:
        name: the data set's name (``data.dataset`` in a config). Lookups ignore case,
            ``-`` and ``_``, so a name that differs from a registered one only in those
            counts as the same name.
        files: optional ``(root, split) -> list[Path]`` naming the files the loader reads;
            :func:`source_files` returns it, so caches of derived data (the Flower nodes'
            partition caches) notice when the files change. Without it the data set counts
            as having no files: fine for generated or bundled data.
        replace: allow replacing a registered loader (e.g. a patched built-in).

    Returns the loader unchanged, so it can still be called directly.

    Raises:
        ValueError: ``name`` is empty, or already registered and ``replace`` is false.
    """
    if not isinstance(name, str) or not _normalize(name):
        raise ValueError(f"a data set name must be a non-empty string, got {name!r}")

    def decorate(loader: LoaderT) -> LoaderT:
        if not callable(loader):
            raise TypeError(f"register_dataset({name!r}) needs a callable, got {loader!r}")
        existing = _registered_name(name)
        if existing is not None:
            if not replace:
                raise ValueError(f"data set {name!r} is already registered as {existing!r}; "
                                 f"pass replace=True to replace it")
            _LOADERS.pop(existing)
            _SOURCE_FILES.pop(existing, None)
        _LOADERS[name] = loader
        if files is not None:
            _SOURCE_FILES[name] = files
        return loader

    return decorate


# --------------------------------------------------------------------------- paths


def _not_found_message(name: str, root: Path, split: str, missing: list[list[Path]]) -> str:
    layouts = LAYOUTS[name]
    lines = [f"Data set {name!r} (split {split!r}) was not found under {root}."]
    for layout, miss in zip(layouts, missing):
        wanted = ", ".join(layout.files[split])
        lines.append(f"  looked in {root / layout.folder} for: {wanted}")
        lines.append(f"    missing: {', '.join(str(p) for p in miss)}")
    lines.append(
        f"Fix: put the files in {root / layouts[0].folder} (or the alternative folder "
        f"above), or set data.root / the SSFL_DATA_DIR environment variable to the folder "
        f"that contains {layouts[0].folder}, or pass download=true to fetch them."
    )
    return "\n".join(lines)


def _find_layout(name: str, root: Path, split: str, download: bool) -> Layout:
    """First layout whose files for ``split`` are all present; download if allowed."""
    layouts = LAYOUTS[name]
    missing = [layout.missing(root, split) for layout in layouts]
    for layout, miss in zip(layouts, missing):
        if not miss:
            return layout
    if download:
        download_and_extract(layouts[0].archive, root)
        if not layouts[0].missing(root, split):
            return layouts[0]
        missing = [layout.missing(root, split) for layout in layouts]
    raise DatasetNotFoundError(_not_found_message(name, root, split, missing))


def source_files(name: str, root: str | os.PathLike[str] | None, split: Split) -> list[Path]:
    """The files (and for tinyimagenet also the image folder) that :func:`load_dataset` reads
    for one split, without reading them: what a cache of data derived from the split checks
    for changes. ``digits`` ships with scikit-learn: no files; nor has a registered data set
    that gave no ``files=``. Raises :class:`DatasetNotFoundError` when the files are missing
    and ``ValueError`` for an unknown name."""
    files = _SOURCE_FILES.get(_known_name(name))
    return [] if files is None else files(resolve_root(root), split)


def _layout_files(name: str, root: Path, split: str) -> list[Path]:
    """The files of the first complete official layout of ``name`` (no download)."""
    layout = _find_layout(name, root, split, download=False)
    return [root / layout.folder / f for f in layout.files[split]]


# --------------------------------------------------------------------------- pickles

# Exactly the globals numpy needs to rebuild arrays/scalars from a pickle (protocol 2..5,
# numpy 1.x "numpy.core" and 2.x "numpy._core" module names); nothing that runs code.
_ALLOWED_PICKLE_GLOBALS: frozenset[tuple[str, str]] = frozenset({
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"),
    ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
})


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that refuses every global except those needed to rebuild ndarrays.

    ``pickle.load`` on a downloaded file can execute arbitrary code (``os.system`` …);
    CIFAR's python version only holds dicts, lists, bytes and numpy arrays.
    """

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_PICKLE_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(
            f"forbidden global {module}.{name}: only numpy array globals are allowed"
        )


def safe_load_pickle(path: Path) -> Any:
    """Load a CIFAR python-version pickle without running code; errors name the file."""
    try:
        with open(path, "rb") as fh:
            return _ArrayOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, ImportError) as exc:
        raise CorruptDatasetError(
            f"{path}: cannot read this pickle ({type(exc).__name__}: {exc}). The file is "
            f"truncated, corrupt or not a CIFAR python-version batch; delete it and "
            f"re-download (download=true)."
        ) from exc


def _dict_get(d: Any, key: str, path: Path) -> Any:
    """Look up ``key`` in an unpickled CIFAR dict (keys are bytes or str)."""
    if not isinstance(d, dict):
        raise CorruptDatasetError(f"{path}: expected a pickled dict, got {type(d).__name__}")
    for k in (key.encode(), key):
        if k in d:
            return d[k]
    raise CorruptDatasetError(f"{path}: pickled dict has no {key!r} entry "
                              f"(keys: {sorted(map(repr, d))[:8]})")


def _read_cifar_pickle(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 [N,3,32,32], labels int64 [N]) from one python-version batch."""
    d = safe_load_pickle(path)
    data = _dict_get(d, "data", path)
    labels = _dict_get(d, label_key, path)
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != _CIFAR_PIXELS:
        shape = getattr(data, "shape", None)
        dtype = getattr(data, "dtype", type(data).__name__)
        raise CorruptDatasetError(f"{path}: 'data' must be a uint8 array [N, 3072], "
                                  f"got {dtype} {shape}")
    try:
        labels_arr = np.asarray(labels, dtype=np.int64).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise CorruptDatasetError(f"{path}: {label_key!r} is not a list of integers") from exc
    if labels_arr.shape[0] != data.shape[0]:
        raise CorruptDatasetError(f"{path}: {data.shape[0]} images but "
                                  f"{labels_arr.shape[0]} labels")
    return data.reshape(-1, 3, 32, 32), labels_arr


# --------------------------------------------------------------------------- binaries


def _read_cifar_bin(path: Path, label_bytes: int,
                    label_index: int) -> tuple[np.ndarray, np.ndarray]:
    """(images, labels) from a binary-version file of records ``labels… + 3072 pixels``."""
    record = label_bytes + _CIFAR_PIXELS
    size = path.stat().st_size
    if size == 0 or size % record:
        raise CorruptDatasetError(
            f"{path}: size {size} bytes is not a positive multiple of the {record}-byte "
            f"record ({size / record:.3f} records); the file is truncated or not this "
            f"data set's binary version. Delete it and re-download (download=true)."
        )
    raw = np.fromfile(path, dtype=np.uint8).reshape(-1, record)
    labels = raw[:, label_index].astype(np.int64)
    images = raw[:, label_bytes:].reshape(-1, 3, 32, 32)
    return images, labels


def _check_labels(labels: np.ndarray, num_classes: int, path: Path) -> None:
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = labels[(labels < 0) | (labels >= num_classes)]
        raise CorruptDatasetError(
            f"{path}: labels must lie in [0, {num_classes}), found {bad[:5].tolist()}; "
            f"the file is corrupt or belongs to another data set."
        )


def _read_names(path: Path, count: int) -> tuple[str, ...] | None:
    """Class names, one per non-empty line, if the file exists and has ``count`` of them."""
    if not path.is_file():
        return None
    names = tuple(line.strip() for line in path.read_text().splitlines() if line.strip())
    return names if len(names) == count else None


def _pickled_names(path: Path, key: str, count: int) -> tuple[str, ...] | None:
    if not path.is_file():
        return None
    try:
        raw = _dict_get(safe_load_pickle(path), key, path)
        names = tuple(n.decode() if isinstance(n, bytes) else str(n) for n in raw)
    except (CorruptDatasetError, UnicodeDecodeError, TypeError):
        return None  # names are cosmetic; a bad meta file must not block training
    return names if len(names) == count else None


def _load_cifar(name: str, root: Path, split: str, download: bool) -> ImageDataset:
    is10 = name == "cifar10"
    num_classes = 10 if is10 else 100
    layout = _find_layout(name, root, split, download)
    base = root / layout.folder
    binary = layout.folder.endswith(("-bin", "-binary"))

    chunks: list[np.ndarray] = []
    label_chunks: list[np.ndarray] = []
    for fname in layout.files[split]:
        path = base / fname
        if binary:
            images, labels = _read_cifar_bin(path, label_bytes=1 if is10 else 2,
                                             label_index=0 if is10 else 1)
        else:
            images, labels = _read_cifar_pickle(path, "labels" if is10 else "fine_labels")
        _check_labels(labels, num_classes, path)
        chunks.append(images)
        label_chunks.append(labels)

    if is10:
        names = (_read_names(base / "batches.meta.txt", 10) if binary
                 else _pickled_names(base / "batches.meta", "label_names", 10))
        names = names or CIFAR10_CLASSES
        mean, std = CIFAR10_MEAN, CIFAR10_STD
    else:
        names = (_read_names(base / "fine_label_names.txt", 100) if binary
                 else _pickled_names(base / "meta", "fine_label_names", 100))
        names = names or tuple(f"class_{i}" for i in range(100))
        mean, std = CIFAR100_MEAN, CIFAR100_STD

    images_np = np.ascontiguousarray(np.concatenate(chunks) if len(chunks) > 1 else chunks[0])
    labels_np = np.concatenate(label_chunks)
    return ImageDataset(
        name=name,
        images=torch.from_numpy(images_np),
        labels=torch.from_numpy(labels_np),
        num_classes=num_classes,
        class_names=tuple(names),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------- tiny-imagenet


def _tiny_file_list(base: Path, split: str) -> tuple[list[Path], np.ndarray, list[str]]:
    """(image paths, labels, wnids) in a fixed order: wnids.txt order, then file name."""
    wnids = [w.strip() for w in (base / "wnids.txt").read_text().splitlines() if w.strip()]
    if len(set(wnids)) != len(wnids) or not wnids:
        raise CorruptDatasetError(f"{base / 'wnids.txt'}: expected unique class ids, one a line")
    index = {w: i for i, w in enumerate(wnids)}
    paths: list[Path] = []
    labels: list[int] = []
    if split == "train":
        for wnid, label in index.items():
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise CorruptDatasetError(
                    f"{folder}: missing training folder of class {wnid} listed in wnids.txt; "
                    f"the extraction is incomplete. Re-extract tiny-imagenet-200.zip there.")
            files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".jpeg", ".jpg"))
            paths.extend(files)
            labels.extend([label] * len(files))
    else:
        ann = base / "val" / "val_annotations.txt"
        rows = []
        for lineno, line in enumerate(ann.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise CorruptDatasetError(
                    f"{ann}, line {lineno}: expected 'file<TAB>wnid<TAB>box…' with a wnid "
                    f"from wnids.txt, got {line!r}")
            rows.append((parts[0], index[parts[1]]))
        for fname, label in sorted(rows):
            paths.append(base / "val" / "images" / fname)
            labels.append(label)
    if not paths:
        raise CorruptDatasetError(f"{base}: no {split} images found")
    return paths, np.asarray(labels, dtype=np.int64), wnids


def _tiny_cache_key(paths: Sequence[Path], labels: np.ndarray, base: Path, split: str) -> str:
    """Hash of the relative file list, file sizes and labels (cheap: no file reads)."""
    h = hashlib.sha256(f"tinyimagenet-v{_TINY_CACHE_VERSION}-{split}\n".encode())
    for p, label in zip(paths, labels.tolist()):
        try:
            size = p.stat().st_size
        except FileNotFoundError:
            size = -1
        h.update(f"{p.relative_to(base).as_posix()}\t{size}\t{label}\n".encode())
    return h.hexdigest()[:24]


def _decode_jpeg(path: Path) -> np.ndarray:
    """One image as uint8 [3, 64, 64]; grayscale/CMYK are converted to RGB."""
    from PIL import Image, UnidentifiedImageError  # Pillow ships with matplotlib

    try:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    except FileNotFoundError as exc:
        raise CorruptDatasetError(f"{path}: listed image is missing; re-extract the "
                                  f"archive") from exc
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise CorruptDatasetError(f"{path}: cannot decode image ({exc}); delete it and "
                                  f"re-extract the archive") from exc
    if arr.shape != (_TINY_SIZE, _TINY_SIZE, 3):
        raise CorruptDatasetError(f"{path}: image is {arr.shape[1]}x{arr.shape[0]}, "
                                  f"Tiny-ImageNet images must be 64x64")
    return arr.transpose(2, 0, 1)


def _decode_all(paths: Sequence[Path], decode: Callable[[Path], np.ndarray]) -> np.ndarray:
    out = np.empty((len(paths), 3, _TINY_SIZE, _TINY_SIZE), dtype=np.uint8)

    def work(i: int) -> None:
        out[i] = decode(paths[i])

    # PIL releases the GIL while decoding, so threads give a real speed-up.
    workers = min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(work, range(len(paths)), chunksize=256))
    return out


def _load_cached(images_file: Path, n: int) -> np.ndarray | None:
    if not images_file.is_file():
        return None
    try:
        arr = np.load(images_file, mmap_mode=None, allow_pickle=False)
    except (OSError, ValueError):
        return None  # unreadable cache: just decode again
    if arr.dtype != np.uint8 or arr.shape != (n, 3, _TINY_SIZE, _TINY_SIZE):
        return None
    return arr


def _save_cache(images_file: Path, images: np.ndarray) -> None:
    """Write atomically (temp file + rename) so concurrent runs never read half a file."""
    try:
        images_file.parent.mkdir(parents=True, exist_ok=True)
        tmp = images_file.with_name(f"{images_file.name}.{os.getpid()}.tmp")
        with open(tmp, "wb") as fh:
            np.save(fh, images, allow_pickle=False)
        os.replace(tmp, images_file)
    except OSError:
        pass  # caching is an optimisation; a read-only cache dir must not fail loading


def _load_tinyimagenet(root: Path, split: str, download: bool) -> ImageDataset:
    layout = _find_layout("tinyimagenet", root, split, download)
    base = root / layout.folder
    paths, labels, wnids = _tiny_file_list(base, split)
    key = _tiny_cache_key(paths, labels, base, split)
    cache_file = default_cache_dir() / "tinyimagenet" / f"{split}-{key}-images.npy"
    images = _load_cached(cache_file, len(paths))
    if images is None:
        images = _decode_all(paths, _decode_jpeg)
        _save_cache(cache_file, images)

    words: dict[str, str] = {}
    words_file = base / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text().splitlines():
            wnid, _, text = line.partition("\t")
            if text:
                words[wnid.strip()] = text.split(",")[0].strip()
    names = tuple(words.get(w, w) for w in wnids)
    return ImageDataset(
        name="tinyimagenet",
        images=torch.from_numpy(np.ascontiguousarray(images)),
        labels=torch.from_numpy(labels),
        num_classes=len(wnids),
        class_names=names,
        mean=TINYIMAGENET_MEAN,
        std=TINYIMAGENET_STD,
    )


# --------------------------------------------------------------------------- digits


def digits_split_indices(labels: np.ndarray, test_fraction: float = 0.2,
                         seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split: ``round(test_fraction * n_c)`` test samples per class.

    One ``default_rng(seed)`` is consumed class by class in label order, so the split is
    identical on every machine and run.  Returns sorted (train, test) index arrays.
    """
    rng = np.random.default_rng(seed)
    test: list[np.ndarray] = []
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        n_test = int(round(test_fraction * idx.size))
        test.append(rng.choice(idx, size=n_test, replace=False))
    test_idx = np.sort(np.concatenate(test)).astype(np.int64)
    train_mask = np.ones(labels.shape[0], dtype=bool)
    train_mask[test_idx] = False
    return np.flatnonzero(train_mask).astype(np.int64), test_idx


def _load_digits(split: str) -> ImageDataset:
    from sklearn.datasets import load_digits  # bundled with scikit-learn: works offline

    bunch = load_digits()
    # Pixel values are 0..16; scale to the 0..255 range every other data set uses.
    images = np.rint(np.asarray(bunch.images, dtype=np.float64) * (255.0 / 16.0))
    images = images.astype(np.uint8)[:, None, :, :]
    labels = np.asarray(bunch.target, dtype=np.int64)
    train_idx, test_idx = digits_split_indices(labels)
    train_pixels = images[train_idx].astype(np.float64) / 255.0
    mean = (float(train_pixels.mean()),)
    std = (float(train_pixels.std()),)
    idx = train_idx if split == "train" else test_idx
    return ImageDataset(
        name="digits",
        images=torch.from_numpy(np.ascontiguousarray(images[idx])),
        labels=torch.from_numpy(labels[idx]),
        num_classes=10,
        class_names=tuple(str(i) for i in range(10)),
        mean=mean,
        std=std,
    )


# --------------------------------------------------------------------------- entry point


def load_dataset(
    name: str,
    root: str | os.PathLike[str] | None,
    split: Split,
    download: bool = False,
) -> ImageDataset:
    """Load one split of a data set as whole uint8 tensors.

    Args:
        name: one of :data:`DATASETS` (built-in or added with :func:`register_dataset`);
            case, ``-`` and ``_`` are ignored.
        root: folder holding the data set folders; ``None`` means ``$SSFL_DATA_DIR``,
            else ``~/.cache/ssfl/data``.  Ignored by ``digits``.
        split: ``"train"`` or ``"test"`` (for tinyimagenet, ``"test"`` is the val set).
        download: fetch and verify the official archive into ``root`` if files are missing.

    Raises:
        DatasetNotFoundError: files are missing (message says where and how to fix).
        CorruptDatasetError: files exist but are malformed (message names the file).
        ValueError: unknown name or split.
    """
    loader = _LOADERS[_known_name(name)]
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    dataset = loader(resolve_root(root), split, download)
    # A registered loader is user code: fail here, not deep inside training.
    if not isinstance(dataset, ImageDataset):
        raise TypeError(f"the loader of data set {name!r} returned {type(dataset).__name__}, "
                        f"not an ImageDataset")
    return dataset


# --------------------------------------------------------------------------- built-ins
# Registered in this order because DATASETS lists them in registration order.


def _tiny_files(root: Path, split: Split) -> list[Path]:
    # The image folder too: its listing, not only the index files, decides what is loaded.
    images = root / LAYOUTS["tinyimagenet"][0].folder / ("train" if split == "train" else "val")
    return [*_layout_files("tinyimagenet", root, split), images]


@register_dataset("cifar10", files=partial(_layout_files, "cifar10"))
def _cifar10(root: Path, split: Split, download: bool) -> ImageDataset:
    return _load_cifar("cifar10", root, split, download)


@register_dataset("cifar100", files=partial(_layout_files, "cifar100"))
def _cifar100(root: Path, split: Split, download: bool) -> ImageDataset:
    return _load_cifar("cifar100", root, split, download)


register_dataset("tinyimagenet", files=_tiny_files)(_load_tinyimagenet)


@register_dataset("digits")
def _digits(root: Path, split: Split, download: bool) -> ImageDataset:
    return _load_digits(split)  # bundled with scikit-learn: no root, nothing to download

