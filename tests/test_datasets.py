"""Loaders on the real shared files and on small files written in the other layouts."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from ssfl.data import (
    DATASETS,
    CorruptDatasetError,
    DatasetNotFoundError,
    ImageDataset,
    load_dataset,
)
from ssfl.data.datasets import CIFAR10_MEAN, CIFAR10_STD, digits_split_indices


def _need(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} is not in the shared data folder")
    return path


def _channel_stats(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Exact per-channel mean/std in [0,1] units via 256-bin histograms (no float copy)."""
    arr = images.numpy()
    means, stds = [], []
    values = np.arange(256, dtype=np.float64) / 255.0
    for ch in range(arr.shape[1]):
        hist = np.bincount(arr[:, ch].ravel(), minlength=256).astype(np.float64)
        m = (hist * values).sum() / hist.sum()
        means.append(m)
        stds.append(np.sqrt((hist * (values - m) ** 2).sum() / hist.sum()))
    return np.array(means), np.array(stds)


# ----------------------------------------------------------------- real CIFAR-10


@pytest.fixture(scope="module")
def cifar10_train(shared_data_dir: Path) -> ImageDataset:
    _need(shared_data_dir / "cifar-10-batches-bin")
    return load_dataset("cifar10", shared_data_dir, "train")


@pytest.mark.slow
def test_cifar10_train_real(cifar10_train: ImageDataset) -> None:
    ds = cifar10_train
    assert ds.name == "cifar10" and len(ds) == 50000
    assert ds.images.shape == (50000, 3, 32, 32) and ds.images.dtype == torch.uint8
    assert ds.images.is_contiguous()
    assert ds.labels.dtype == torch.int64
    assert torch.bincount(ds.labels, minlength=10).tolist() == [5000] * 10
    assert ds.num_classes == 10 and ds.class_names[0] == "airplane"
    assert ds.class_names[9] == "truck" and len(ds.class_names) == 10
    assert ds.mean == CIFAR10_MEAN and ds.std == CIFAR10_STD
    mean, std = _channel_stats(ds.images)
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=1e-3)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=1e-3)


def test_cifar10_test_real(shared_data_dir: Path) -> None:
    _need(shared_data_dir / "cifar-10-batches-bin")
    ds = load_dataset("cifar10", shared_data_dir, "test")
    assert ds.images.shape == (10000, 3, 32, 32)
    assert torch.bincount(ds.labels, minlength=10).tolist() == [1000] * 10


def test_cifar10_binary_layout_matches_raw_records(shared_data_dir: Path,
                                                   cifar10_train: ImageDataset) -> None:
    """Image 0 is record 0 of data_batch_1: label byte, then R, G, B planes."""
    raw = np.fromfile(shared_data_dir / "cifar-10-batches-bin" / "data_batch_1.bin",
                      dtype=np.uint8, count=3073)
    assert cifar10_train.labels[0].item() == raw[0]
    np.testing.assert_array_equal(cifar10_train.images[0, 0].numpy().ravel(), raw[1:1025])
    np.testing.assert_array_equal(cifar10_train.images[0, 2].numpy().ravel(), raw[2049:])


# ----------------------------------------------------------------- real CIFAR-100 sample


def test_cifar100_sample_real(shared_data_dir: Path) -> None:
    root = _need(shared_data_dir / "cifar-100-sample")
    train = load_dataset("cifar100", root, "train")
    test = load_dataset("cifar100", root, "test")
    assert train.images.shape == (500, 3, 32, 32) and len(test) == 100
    assert train.num_classes == 100 and len(train.class_names) == 100
    assert train.class_names[0] == "apple"
    for ds in (train, test):
        assert 0 <= ds.labels.min().item() and ds.labels.max().item() < 100
    # The sample holds 5 training and 1 test image per *fine* class.
    assert torch.bincount(train.labels, minlength=100).tolist() == [5] * 100
    assert torch.bincount(test.labels, minlength=100).tolist() == [1] * 100
    raw = np.fromfile(root / "cifar-100-binary" / "train.bin", dtype=np.uint8, count=3074)
    assert train.labels[0].item() == raw[1]  # fine label, not the coarse one
    np.testing.assert_array_equal(train.images[0].numpy().ravel(), raw[2:])


# ----------------------------------------------------------------- real Tiny-ImageNet sample


@pytest.fixture
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    path = tmp_path / "cache"
    monkeypatch.setenv("SSFL_CACHE_DIR", str(path))
    return path


def _tiny_root(shared_data_dir: Path) -> Path:
    root = shared_data_dir / "tiny-imagenet-200-sample"
    _need(root / "tiny-imagenet-200")
    return root


def test_tinyimagenet_train_real(shared_data_dir: Path, cache_dir: Path) -> None:
    from PIL import Image

    root = _tiny_root(shared_data_dir)
    base = root / "tiny-imagenet-200"
    ds = load_dataset("tinyimagenet", root, "train")
    wnids = (base / "wnids.txt").read_text().split()
    n_files = sum(len(list((base / "train" / w / "images").glob("*.JPEG"))) for w in wnids)
    assert ds.images.shape == (n_files, 3, 64, 64) and ds.images.dtype == torch.uint8
    assert ds.num_classes == 200 and ds.class_names[0] == "goldfish"
    assert torch.bincount(ds.labels, minlength=200).min().item() >= 1

    # Files are in wnids order, then by file name: find the grayscale ones.
    files = [p for w in wnids for p in sorted((base / "train" / w / "images").glob("*.JPEG"))]
    gray = [i for i, p in enumerate(files) if Image.open(p).mode == "L"]
    assert gray, "the sample is documented to contain grayscale JPEGs"
    for i in gray:
        img = ds.images[i]
        assert torch.equal(img[0], img[1]) and torch.equal(img[1], img[2])
        assert ds.labels[i].item() == wnids.index(files[i].parent.parent.name)
    # A colour image decodes exactly as PIL does.
    colour = next(i for i in range(len(files)) if i not in gray)
    expected = np.asarray(Image.open(files[colour]).convert("RGB")).transpose(2, 0, 1)
    np.testing.assert_array_equal(ds.images[colour].numpy(), expected)

    # The decoded arrays were cached outside the data root, and the cache is used.
    cached = list(cache_dir.rglob("*.npy"))
    assert len(cached) == 1
    again = load_dataset("tinyimagenet", root, "train")
    assert torch.equal(again.images, ds.images) and torch.equal(again.labels, ds.labels)


def test_tinyimagenet_val_labels_from_annotations(shared_data_dir: Path,
                                                  cache_dir: Path) -> None:
    from PIL import Image

    root = _tiny_root(shared_data_dir)
    base = root / "tiny-imagenet-200"
    wnids = (base / "wnids.txt").read_text().split()
    rows = sorted(line.split("\t")[:2] for line in
                  (base / "val" / "val_annotations.txt").read_text().splitlines() if line)
    ds = load_dataset("tinyimagenet", root, "test")
    assert ds.images.shape == (len(rows), 3, 64, 64)
    assert ds.labels.tolist() == [wnids.index(w) for _, w in rows]
    for i in (0, len(rows) - 1):
        expected = np.asarray(Image.open(base / "val" / "images" / rows[i][0]).convert("RGB"))
        np.testing.assert_array_equal(ds.images[i].numpy(), expected.transpose(2, 0, 1))


def test_tinyimagenet_corrupt_jpeg(tmp_path: Path, cache_dir: Path) -> None:
    base = tmp_path / "tiny-imagenet-200"
    (base / "train" / "n0" / "images").mkdir(parents=True)
    (base / "wnids.txt").write_text("n0\n")
    bad = base / "train" / "n0" / "images" / "n0_0.JPEG"
    bad.write_bytes(b"not a jpeg")
    with pytest.raises(CorruptDatasetError, match="n0_0.JPEG"):
        load_dataset("tinyimagenet", tmp_path, "train")


# ----------------------------------------------------------------- files written by the tests


def _rand_cifar(rng: np.random.Generator, n: int,
                num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    return (rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
            rng.integers(0, num_classes, size=n))


def test_cifar10_python_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    written = []
    for i, fname in enumerate([f"data_batch_{j}" for j in range(1, 6)] + ["test_batch"]):
        data, labels = _rand_cifar(rng, 7, 10)
        # Mix label containers and protocols as real-world copies do.
        obj = {b"data": data, b"labels": labels.tolist() if i % 2 else labels,
               b"batch_label": b"x"}
        with open(folder / fname, "wb") as fh:
            pickle.dump(obj, fh, protocol=2 if i % 2 else 5)
        written.append((data, labels))
    with open(folder / "batches.meta", "wb") as fh:
        pickle.dump({b"label_names": [f"c{i}".encode() for i in range(10)]}, fh, protocol=2)

    train = load_dataset("cifar10", tmp_path, "train")
    assert train.images.shape == (35, 3, 32, 32) and train.images.is_contiguous()
    np.testing.assert_array_equal(train.images.numpy().reshape(35, -1),
                                  np.concatenate([d for d, _ in written[:5]]))
    np.testing.assert_array_equal(train.labels.numpy(),
                                  np.concatenate([labels for _, labels in written[:5]]))
    assert train.class_names == tuple(f"c{i}" for i in range(10))
    test = load_dataset("cifar10", tmp_path, "test")
    np.testing.assert_array_equal(test.labels.numpy(), written[5][1])


def test_cifar100_python_pickles(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    data, fine = _rand_cifar(rng, 9, 100)
    coarse = fine // 5
    for name in ("train", "test"):
        with open(folder / name, "wb") as fh:
            pickle.dump({b"data": data, b"fine_labels": fine.tolist(),
                         b"coarse_labels": coarse.tolist()}, fh, protocol=2)
    ds = load_dataset("cifar100", tmp_path, "train")
    assert ds.num_classes == 100 and len(ds) == 9
    np.testing.assert_array_equal(ds.labels.numpy(), fine)
    np.testing.assert_array_equal(ds.images.numpy().reshape(9, -1), data)


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_code_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    marker = tmp_path / "pwned"
    with open(folder / "test_batch", "wb") as fh:
        pickle.dump({b"data": _Evil(marker), b"labels": [0]}, fh, protocol=2)
    with pytest.raises(CorruptDatasetError) as err:
        load_dataset("cifar10", tmp_path, "test")
    assert "forbidden global" in str(err.value) and "system" in str(err.value)
    assert "test_batch" in str(err.value)
    assert not marker.exists()


def test_truncated_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    data, fine = _rand_cifar(np.random.default_rng(2), 4, 100)
    blob = pickle.dumps({b"data": data, b"fine_labels": fine.tolist()}, protocol=2)
    (folder / "test").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CorruptDatasetError, match="test"):
        load_dataset("cifar100", tmp_path, "test")


def _write_bin(path: Path, labels: list[int], pixels: np.ndarray, label_bytes: int = 1) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    head = np.array(labels, dtype=np.uint8).reshape(-1, label_bytes)
    path.write_bytes(np.concatenate([head, pixels], axis=1).tobytes())


def test_cifar10_small_binary_and_env_root(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """root=None reads $SSFL_DATA_DIR; R, G, B planes land in channels 0, 1, 2."""
    pixels = np.zeros((2, 3072), dtype=np.uint8)
    pixels[:, :1024], pixels[:, 1024:2048], pixels[:, 2048:] = 10, 20, 30
    _write_bin(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", [3, 9], pixels)
    monkeypatch.setenv("SSFL_DATA_DIR", str(tmp_path))
    ds = load_dataset("cifar10", None, "test")
    assert ds.labels.tolist() == [3, 9]
    assert ds.images[:, 0].unique().tolist() == [10]
    assert ds.images[:, 1].unique().tolist() == [20]
    assert ds.images[:, 2].unique().tolist() == [30]


def test_truncated_bin_is_corrupt(tmp_path: Path) -> None:
    path = tmp_path / "cifar-10-batches-bin" / "test_batch.bin"
    _write_bin(path, [1, 2], np.zeros((2, 3072), dtype=np.uint8))
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CorruptDatasetError, match="test_batch.bin.*3073"):
        load_dataset("cifar10", tmp_path, "test")


def test_label_out_of_range_is_corrupt(tmp_path: Path) -> None:
    _write_bin(tmp_path / "cifar-10-batches-bin" / "test_batch.bin", [1, 10],
               np.zeros((2, 3072), dtype=np.uint8))
    with pytest.raises(CorruptDatasetError, match=r"test_batch.bin.*\[0, 10\)"):
        load_dataset("cifar10", tmp_path, "test")
    _write_bin(tmp_path / "cifar-100-binary" / "test.bin", [0, 100],
               np.zeros((1, 3072), dtype=np.uint8), label_bytes=2)
    with pytest.raises(CorruptDatasetError, match="test.bin"):
        load_dataset("cifar100", tmp_path, "test")


def test_missing_folder_names_expected_path(tmp_path: Path) -> None:
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar10", tmp_path / "nowhere", "train")
    msg = str(err.value)
    assert str(tmp_path / "nowhere" / "cifar-10-batches-bin") in msg
    assert "data_batch_1.bin" in msg and "cifar-10-batches-py" in msg
    assert "SSFL_DATA_DIR" in msg and "download=true" in msg
    assert isinstance(err.value, FileNotFoundError)
    with pytest.raises(DatasetNotFoundError, match="tiny-imagenet-200"):
        load_dataset("tinyimagenet", tmp_path, "test")


def test_partial_layout_is_not_found(tmp_path: Path) -> None:
    """One missing training batch: report exactly that file."""
    for i in (1, 2, 3, 5):
        _write_bin(tmp_path / "cifar-10-batches-bin" / f"data_batch_{i}.bin", [0],
                   np.zeros((1, 3072), dtype=np.uint8))
    with pytest.raises(DatasetNotFoundError, match="data_batch_4.bin"):
        load_dataset("cifar10", tmp_path, "train")


# ----------------------------------------------------------------- digits and misc


def test_digits_embedded() -> None:
    train = load_dataset("digits", None, "train")
    test = load_dataset("digits", "/ignored", "test")
    assert len(train) + len(test) == 1797
    assert train.images.shape[1:] == (1, 8, 8) and train.images.dtype == torch.uint8
    assert train.images.max().item() == 255 and train.images.min().item() == 0
    all_labels = torch.cat([train.labels, test.labels])
    per_class = torch.bincount(all_labels, minlength=10)
    expected_test = [int(round(0.2 * n)) for n in per_class.tolist()]
    assert torch.bincount(test.labels, minlength=10).tolist() == expected_test
    pixels = train.images.double() / 255
    assert train.mean == pytest.approx((pixels.mean().item(),))
    assert train.std == pytest.approx((pixels.std(unbiased=False).item(),))
    assert test.mean == train.mean  # normalisation always comes from the train split
    again = load_dataset("digits", None, "test")
    assert torch.equal(again.images, test.images) and torch.equal(again.labels, test.labels)


def test_digits_split_disjoint_and_stratified() -> None:
    labels = np.repeat(np.arange(3), [10, 20, 31])
    train, test = digits_split_indices(labels)
    assert np.intersect1d(train, test).size == 0
    assert np.union1d(train, test).tolist() == list(range(61))
    assert np.bincount(labels[test]).tolist() == [2, 4, 6]
    assert np.array_equal(digits_split_indices(labels)[1], test)


def test_bad_name_and_split() -> None:
    with pytest.raises(ValueError, match="cifar10"):
        load_dataset("mnist", None, "train")
    with pytest.raises(ValueError, match="split"):
        load_dataset("digits", None, "val")  # type: ignore[arg-type]
    # DATASETS is the registry (name -> loader); the built-ins come first, in this order.
    assert tuple(DATASETS) == ("cifar10", "cifar100", "tinyimagenet", "digits")
