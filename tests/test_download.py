"""Download, checksum and safe extraction, all offline (file:// URLs built in tmp_path)."""

from __future__ import annotations

import hashlib
import io
import stat
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


# ---- links, modes and zip symlinks: the project's own checks, with or without Python's filter
@pytest.fixture(params=["with-filter", "without-filter"])
def python_filter(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test both with Python's tar ``data`` filter and as on Python 3.11.0-3.11.3,
    which lack it (then only the project's own checks stand between the archive and disk)."""
    if request.param == "without-filter":
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    return request.param


def _add_link(tf: tarfile.TarFile, name: str, target: str, kind: bytes = tarfile.SYMTYPE
              ) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = target
    tf.addfile(info)


def _add_dir(tf: tarfile.TarFile, name: str) -> None:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    info.mode = 0o755
    tf.addfile(info)


def _refused(archive: Path, dest: Path, match: str = "refusing") -> None:
    with pytest.raises(CorruptDatasetError, match=match):
        safe_extract(archive, dest)
    assert not dest.exists() or not any(dest.iterdir()), "checked before extracting anything"


def test_tar_two_level_symlink_chain_rejected(tmp_path: Path, python_filter: str) -> None:
    """``a/b -> ..`` resolves to the folder itself and ``a/b/c -> ..`` looks like ``a``, but on
    disk ``a/b/c`` is ``./c`` and points one level above the folder."""
    outside = tmp_path / "outside.txt"
    archive = tmp_path / "chain.tar"
    with tarfile.open(archive, "w") as tf:
        _add_dir(tf, "a")
        _add_link(tf, "a/b", "..")
        _add_link(tf, "a/b/c", "..")
        _add_bytes(tf, "a/b/c/outside.txt", b"pwned")
    dest = tmp_path / "deep" / "out"
    _refused(archive, dest, "outside the extraction folder")
    assert not outside.exists() and not (tmp_path / "deep" / "outside.txt").exists()


def test_tar_link_moved_outside_by_a_later_link_rejected(tmp_path: Path,
                                                         python_filter: str) -> None:
    """``x -> a/b/../..`` leads to the folder itself until ``a/b -> .`` makes it lead above."""
    archive = tmp_path / "late.tar"
    with tarfile.open(archive, "w") as tf:
        _add_dir(tf, "a")
        _add_link(tf, "x", "a/b/../..")
        _add_link(tf, "a/b", ".")
    _refused(archive, tmp_path / "out", "outside the extraction folder")


@pytest.mark.parametrize("target", ["/etc/passwd", "/tmp", "\\etc"])
def test_tar_absolute_symlink_rejected(tmp_path: Path, python_filter: str, target: str) -> None:
    archive = tmp_path / "abs.tar"
    with tarfile.open(archive, "w") as tf:
        _add_link(tf, "folder/link", target)
    _refused(archive, tmp_path / "out", "outside the archive")


def test_tar_hard_link_through_a_symlink_rejected(tmp_path: Path, python_filter: str) -> None:
    """A hard link to a symlink member (``tarfile`` copies the symlink where linking fails)
    or through one is refused; a hard link to a plain file before it is fine."""
    archive = tmp_path / "hard.tar"
    with tarfile.open(archive, "w") as tf:
        _add_link(tf, "up", ".")
        _add_link(tf, "h", "up", tarfile.LNKTYPE)
    _refused(archive, tmp_path / "out", "hard link")
    with tarfile.open(archive, "w") as tf:
        _add_link(tf, "h", "../../etc/passwd", tarfile.LNKTYPE)
    _refused(archive, tmp_path / "out2", r"\.\.")


def test_tar_member_written_through_a_link_rejected(tmp_path: Path, python_filter: str) -> None:
    archive = tmp_path / "through.tar"
    with tarfile.open(archive, "w") as tf:
        _add_link(tf, "data.bin", "other.bin")
        _add_bytes(tf, "data.bin", b"x")
    _refused(archive, tmp_path / "out", "write through the link")


def test_tar_special_member_rejected(tmp_path: Path, python_filter: str) -> None:
    archive = tmp_path / "fifo.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("folder/fifo")
        info.type = tarfile.FIFOTYPE
        tf.addfile(info)
    _refused(archive, tmp_path / "out", "special member")


def test_tar_setuid_setgid_sticky_bits_are_cleared(tmp_path: Path, python_filter: str) -> None:
    archive = tmp_path / "modes.tar"
    with tarfile.open(archive, "w") as tf:
        info = tarfile.TarInfo("folder/tool")
        info.size, info.mode = 2, 0o6755
        tf.addfile(info, io.BytesIO(b"#!"))
        info = tarfile.TarInfo("folder/shared")
        info.type, info.mode = tarfile.DIRTYPE, 0o1777
        tf.addfile(info)
    dest = tmp_path / "out"
    safe_extract(archive, dest)
    tool, shared = (dest / "folder" / "tool").stat(), (dest / "folder" / "shared").stat()
    assert not tool.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert not shared.st_mode & (stat.S_ISUID | stat.S_ISGID | stat.S_ISVTX)
    assert tool.st_mode & 0o700 == 0o700  # the permission bits themselves are kept
    assert (dest / "folder" / "tool").read_bytes() == b"#!"


def test_tar_with_harmless_links_still_extracts(tmp_path: Path, python_filter: str) -> None:
    """Links that stay inside (even through ``..`` and through another link) are fine."""
    archive = tmp_path / "good.tar.gz"
    with tarfile.open(archive, "w:gz") as tf:
        _add_dir(tf, "set")
        _add_bytes(tf, "set/train/a.bin", b"aaa")
        _add_link(tf, "set/latest", "train")
        _add_link(tf, "set/test/a.bin", "../latest/a.bin")
        _add_link(tf, "set/copy.bin", "set/train/a.bin", tarfile.LNKTYPE)
    dest = tmp_path / "out"
    safe_extract(archive, dest)
    assert (dest / "set" / "test" / "a.bin").read_bytes() == b"aaa"
    assert (dest / "set" / "copy.bin").read_bytes() == b"aaa"
    assert (dest / "set" / "latest").is_symlink()


def test_cifar_shaped_archive_still_extracts(tmp_path: Path, python_filter: str) -> None:
    archive = tmp_path / "cifar-10-binary.tar.gz"
    _cifar10_test_archive(archive)
    safe_extract(archive, tmp_path / "out")
    assert (tmp_path / "out" / "cifar-10-batches-bin" / "test_batch.bin").stat().st_size == 3 * 3073


def _zip_symlink(zf: zipfile.ZipFile, name: str, target: str) -> None:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (stat.S_IFLNK | 0o777) << 16
    zf.writestr(info, target)


def test_zip_symlink_member_rejected(tmp_path: Path) -> None:
    archive = tmp_path / "link.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0\n")
        _zip_symlink(zf, "tiny-imagenet-200/train", "/etc")
    _refused(archive, tmp_path / "out", "symbolic link member 'tiny-imagenet-200/train'")


def test_plain_zip_still_extracts(tmp_path: Path) -> None:
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("tiny-imagenet-200/wnids.txt", "n0\n")
        info = zipfile.ZipInfo("tiny-imagenet-200/run.sh")
        info.create_system, info.external_attr = 3, (stat.S_IFREG | 0o4755) << 16
        zf.writestr(info, "#!")
    dest = tmp_path / "out"
    safe_extract(archive, dest)
    assert (dest / "tiny-imagenet-200" / "wnids.txt").read_text() == "n0\n"
    assert not (dest / "tiny-imagenet-200" / "run.sh").stat().st_mode & stat.S_ISUID
