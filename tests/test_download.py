"""Download, checksum and safe extraction, all offline (file:// URLs built in tmp_path)."""

from __future__ import annotations

import hashlib
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from ssfl.data import CorruptDatasetError, DatasetNotFoundError, download, load_dataset
from ssfl.data.download import ARCHIVES, Archive, download_and_extract, safe_extract


def _add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def _cifar10_test_archive(path: Path) -> bytes:
    """A tar.gz shaped like cifar-10-binary.tar.gz holding a 3-image test batch."""
    records = np.zeros((3, 3073), dtype=np.uint8)
    records[:, 0] = [4, 5, 6]
    records[:, 1:] = 77
    with tarfile.open(path, "w:gz") as tf:
        _add_bytes(tf, "cifar-10-batches-bin/test_batch.bin", records.tobytes())
        _add_bytes(tf, "cifar-10-batches-bin/batches.meta.txt", b"\n".join(
            n.encode() for n in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")))
    return path.read_bytes()


@pytest.fixture
def fake_archive(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Point the cifar-10-binary entry at a local archive; returns a setter for the md5."""
    src = tmp_path / "server" / "cifar-10-binary.tar.gz"
    src.parent.mkdir()
    blob = _cifar10_test_archive(src)

    def use(md5: str | None = None) -> Path:
        monkeypatch.setitem(ARCHIVES, "cifar-10-binary", Archive(
            src.as_uri(), md5 or hashlib.md5(blob).hexdigest(), "cifar-10-batches-bin"))
        return src

    return use


def test_published_table() -> None:
    assert ARCHIVES["cifar-10-binary"].md5 == "c32a1d4ab5d03f1284b67883e8d87530"
    assert ARCHIVES["tiny-imagenet-200"].url == "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
    assert all(a.url.startswith(("https://", "http://")) for a in ARCHIVES.values())


def test_download_verify_extract(tmp_path: Path, fake_archive) -> None:
    fake_archive()
    root = tmp_path / "data"
    target = download_and_extract("cifar10", root)
    assert target == root / "cifar-10-batches-bin"
    assert (target / "test_batch.bin").stat().st_size == 3 * 3073
    # Archive and staging folders are gone: only the extracted folder remains.
    assert sorted(p.name for p in root.iterdir()) == ["cifar-10-batches-bin"]


def test_load_dataset_downloads_when_missing(tmp_path: Path, fake_archive) -> None:
    fake_archive()
    ds = load_dataset("cifar10", tmp_path / "data", "test", download=True)
    assert ds.labels.tolist() == [4, 5, 6]
    assert ds.class_names[0] == "a" and ds.images.unique().tolist() == [77]


def test_checksum_mismatch_deletes_download(tmp_path: Path, fake_archive) -> None:
    fake_archive(md5="0" * 32)
    root = tmp_path / "data"
    with pytest.raises(CorruptDatasetError) as err:
        download_and_extract("cifar-10-binary", root)
    msg = str(err.value)
    assert "0" * 32 in msg and "MD5" in msg
    assert list(root.iterdir()) == []  # nothing extracted, temp download deleted


def test_network_failure_says_where_to_put_files(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    missing = (tmp_path / "no-such-server" / "cifar-100-binary.tar.gz").as_uri()
    monkeypatch.setitem(ARCHIVES, "cifar-100-binary",
                        Archive(missing, "0" * 32, "cifar-100-binary"))
    root = tmp_path / "data"
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset("cifar100", root, "train", download=True)
    msg = str(err.value)
    assert "could not download" in msg and str(root / "cifar-100-binary") in msg
    assert list(root.iterdir()) == []


def test_unknown_archive() -> None:
    with pytest.raises(ValueError, match="cifar-10-binary"):
        download_and_extract("mnist", "/nonexistent")


@pytest.mark.parametrize("bad_name", ["../evil.txt", "/tmp/evil.txt", "ok/../../evil.txt"])
def test_tar_path_traversal_rejected(tmp_path: Path, bad_name: str) -> None:
    archive = tmp_path / "bad.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _add_bytes(tf, "folder/fine.txt", b"ok")
        _add_bytes(tf, bad_name, b"pwned")
    dest = tmp_path / "out"
    with pytest.raises(CorruptDatasetError, match="refusing"):
        safe_extract(archive, dest)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "folder" / "fine.txt").exists()  # checked before extracting anything


def test_tar_symlink_escape_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "link.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("folder/link")
        info.type = tarfile.SYMTYPE
        info.linkname = "../../etc/passwd"
        tf.addfile(info)
    with pytest.raises(CorruptDatasetError, match="link"):
        safe_extract(archive, tmp_path / "out")


def test_zip_path_traversal_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "bad.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0\n")
        zf.writestr("../evil.txt", "pwned")
    with pytest.raises(CorruptDatasetError, match=r"\.\."):
        safe_extract(archive, tmp_path / "out")
    assert not (tmp_path / "evil.txt").exists()


def test_download_of_traversal_archive_cleans_up(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    src = tmp_path / "server.tar.gz"
    with tarfile.open(src, "w:gz") as tf:
        _add_bytes(tf, "../escape.txt", b"x")
    monkeypatch.setitem(ARCHIVES, "cifar-10-binary", Archive(
        src.as_uri(), hashlib.md5(src.read_bytes()).hexdigest(), "cifar-10-batches-bin"))
    root = tmp_path / "data"
    with pytest.raises(CorruptDatasetError):
        download.download_and_extract("cifar10", root)
    assert list(root.iterdir()) == [] and not (tmp_path / "escape.txt").exists()
