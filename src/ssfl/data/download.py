"""Download, verify and safely extract the official data set archives.

Only *downloaded archives* are checksum-verified (MD5 published by the data set
authors); files already on disk are never rejected for their checksum, because
re-packed copies (e.g. re-ordered CIFAR batches) are legitimate.

Extraction refuses archive members with absolute paths, ``..`` components, links that
lead outside the target (each member resolved through the links extracted before it, so a
chain of links that each look harmless is caught too, whatever Python's own ``tarfile``
filters do), symbolic links in zip files or special files, and clears setuid, setgid and
sticky bits, so a hostile archive cannot write outside ``root``.  Everything is extracted
into a temporary folder inside ``root`` first and only moved into place once the whole
archive extracted cleanly.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import stat
import tarfile
import tempfile
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

# Only the dependency-free .files module: datasets.py imports this module, so importing
# datasets.py from here would make a cycle.
from .files import LAYOUTS, CorruptDatasetError, DatasetNotFoundError

__all__ = ["ARCHIVES", "DATASET_ARCHIVES", "Archive", "download_and_extract",
           "safe_extract", "md5sum"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    """An official archive: where it is, its published MD5, and the folder it holds."""

    url: str
    md5: str
    folder: str  # top-level folder the archive extracts to

    @property
    def filename(self) -> str:
        return self.url.rsplit("/", 1)[-1]


ARCHIVES: dict[str, Archive] = {
    "cifar-10-binary": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-binary.tar.gz",
        "c32a1d4ab5d03f1284b67883e8d87530", "cifar-10-batches-bin"),
    "cifar-10-python": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", "cifar-10-batches-py"),
    "cifar-100-binary": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-binary.tar.gz",
        "03b5dce01913d631647c71ecec9e9cb8", "cifar-100-binary"),
    "cifar-100-python": Archive(
        "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", "cifar-100-python"),
    "tiny-imagenet-200": Archive(
        "http://cs231n.stanford.edu/tiny-imagenet-200.zip",
        "90528d7ca1a48142e341f4ef8d21d0de", "tiny-imagenet-200"),
}

# Which archive a data set name downloads by default: the one of its preferred (first)
# layout, so the loader and the downloader cannot disagree (the binary versions: no pickles).
DATASET_ARCHIVES: dict[str, str] = {name: layouts[0].archive for name, layouts in LAYOUTS.items()}

_CHUNK = 1 << 20


def md5sum(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(_CHUNK), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_archive(name: str) -> tuple[str, Archive]:
    key = DATASET_ARCHIVES.get(name, name)
    if key not in ARCHIVES:
        raise ValueError(f"no downloadable archive for {name!r}; known: "
                         f"{', '.join(sorted(set(ARCHIVES) | set(DATASET_ARCHIVES)))}")
    return key, ARCHIVES[key]


def _fetch(url: str, dest_dir: Path, timeout: float) -> tuple[Path, str]:
    """Stream ``url`` to a temp file in ``dest_dir``; return (path, md5 of the bytes)."""
    fd, tmp_name = tempfile.mkstemp(prefix=".ssfl-download-", suffix=".part", dir=dest_dir)
    tmp = Path(tmp_name)
    h = hashlib.md5()
    try:
        with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as resp:
            for block in iter(lambda: resp.read(_CHUNK), b""):
                out.write(block)
                h.update(block)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return tmp, h.hexdigest()


def _check_member_name(name: str, archive: Path) -> PurePosixPath:
    """Reject names that could escape the extraction folder."""
    p = PurePosixPath(name.replace("\\", "/"))
    if p.is_absolute() or name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        raise CorruptDatasetError(f"{archive}: refusing member with absolute path {name!r}")
    if ".." in p.parts:
        raise CorruptDatasetError(f"{archive}: refusing member with '..' in its path {name!r}")
    return p


#: how many symbolic links one path may pass through (as Linux's ELOOP limit)
_MAX_HOPS = 40


def _resolve(parts: tuple[str, ...], links: dict[tuple[str, ...], str], archive: Path,
             name: str, *, follow_last: bool = True) -> tuple[str, ...]:
    """Where ``parts`` (a path inside the extraction folder) lands once the symbolic links in
    ``links`` (location -> target, as extracted so far) exist: what the OS would resolve, or
    a ``CorruptDatasetError`` where that leaves the folder. Names not in ``links`` count as
    folders (what ``tarfile`` creates on the way)."""
    todo, done, hops = list(parts), [], 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not done:
                raise CorruptDatasetError(
                    f"{archive}: refusing member {name!r}: through links it resolves to a "
                    f"path outside the extraction folder")
            done.pop()
            continue
        here = (*done, part)
        if here in links and (todo or follow_last):
            hops += 1
            if hops > _MAX_HOPS:
                raise CorruptDatasetError(f"{archive}: refusing member {name!r}: a loop of "
                                          f"symbolic links")
            todo = [*links[here].split("/"), *todo]  # relative to the link's folder: done
            continue
        done.append(part)
    return tuple(done)


def _check_tar(tf: tarfile.TarFile, archive: Path) -> list[tarfile.TarInfo]:
    """The members to extract, each checked where it would land after all members before it
    (links included) are extracted, with setuid/setgid/sticky bits and owners cleared.

    This does not rely on Python's ``data`` filter (missing before 3.11.4 and 3.12): a chain
    of links that each look harmless (``a/b -> ..``, then ``a/b/c -> ..``) is resolved as the
    OS would resolve it, and refused once it leaves the folder."""
    links: dict[tuple[str, ...], str] = {}  # where a symlink is (resolved) -> its target
    files: set[tuple[str, ...]] = set()  # the plain files so far (hard links' targets)
    members = tf.getmembers()
    for m in members:
        p = _check_member_name(m.name, archive)
        if not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            raise CorruptDatasetError(f"{archive}: refusing special member {m.name!r}")
        if not p.parts:
            if m.isdir():
                continue
            raise CorruptDatasetError(f"{archive}: refusing member {m.name!r} with no name")
        where = (*_resolve(p.parts[:-1], links, archive, m.name), p.parts[-1])
        if where in links:
            raise CorruptDatasetError(f"{archive}: refusing member {m.name!r}: it would "
                                      f"replace or write through the link extracted before it")
        if m.issym() or m.islnk():
            target = PurePosixPath(m.linkname.replace("\\", "/"))
            if not m.linkname or target.is_absolute() or m.linkname.startswith(("/", "\\")):
                raise CorruptDatasetError(f"{archive}: refusing link {m.name!r} -> "
                                          f"{m.linkname!r} outside the archive")
        if m.issym():
            # Relative to the link's own folder; refused if it leads outside the folder now.
            _resolve((*where[:-1], *target.parts), links, archive, m.name)
            links[where] = "/".join(target.parts)
        elif m.islnk():
            # A hard link names a member by its path from the root; tarfile follows links to
            # it (and copies a symlink member where linking fails): only a plain path to a
            # file extracted before it, through no link, is safe.
            named = _check_member_name(m.linkname, archive).parts
            if named not in files or _resolve(named, links, archive, m.name) != named:
                raise CorruptDatasetError(f"{archive}: refusing hard link {m.name!r} -> "
                                          f"{m.linkname!r}: not to a plain file before it")
        elif m.isfile() and where == p.parts:
            files.add(where)
        # No setuid, setgid or sticky bit; the extracting user owns what it extracts.
        m.mode &= 0o777
        if hasattr(os, "getuid"):
            m.uid, m.gid, m.uname, m.gname = os.getuid(), os.getgid(), "", ""
    # A link added later can move where an earlier one leads (``x -> d/..`` once ``d`` is a
    # link): every link must still lead inside the folder once all exist.
    for where, target in links.items():
        _resolve((*where[:-1], *target.split("/")), links, archive, "/".join(where))
    return members


def _is_zip_symlink(info: zipfile.ZipInfo) -> bool:
    return stat.S_ISLNK(info.external_attr >> 16)


def safe_extract(archive: Path, dest: Path) -> None:
    """Extract a .tar.gz/.tar/.zip into ``dest`` (a new, empty folder) after checking every
    member: its name, where it lands through the links before it, and its mode."""
    dest.mkdir(parents=True, exist_ok=True)
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                _check_member_name(info.filename, archive)
                if _is_zip_symlink(info):
                    raise CorruptDatasetError(
                        f"{archive}: refusing symbolic link member {info.filename!r}")
            zf.extractall(dest)
        return
    try:
        with tarfile.open(archive, "r:*") as tf:
            members = _check_tar(tf, archive)
            if hasattr(tarfile, "data_filter"):
                # second line of defence (Python >= 3.11.4)
                tf.extractall(dest, members=members, filter="data")
            else:  # pragma: no cover - depends on Python version
                tf.extractall(dest, members=members)
    except tarfile.TarError as exc:
        raise CorruptDatasetError(f"{archive}: not a readable tar/zip archive ({exc})") from exc


def _move_into(src: Path, dest: Path) -> None:
    """Move the tree ``src`` into ``dest``, merging with (and overwriting) what is there."""
    for dirpath, _dirnames, filenames in os.walk(src):
        rel = Path(dirpath).relative_to(src)
        (dest / rel).mkdir(parents=True, exist_ok=True)
        for f in filenames:
            os.replace(Path(dirpath) / f, dest / rel / f)


def download_and_extract(name: str, root: str | os.PathLike[str], *,
                         timeout: float = 60.0) -> Path:
    """Download the archive for ``name`` into ``root``, verify its MD5 and extract it.

    ``name`` is a data set name (``cifar10``, ``cifar100``, ``tinyimagenet``) or an
    :data:`ARCHIVES` key.  Returns ``root / archive.folder``.  The archive is deleted
    afterwards; a checksum mismatch deletes it and raises :class:`CorruptDatasetError`;
    a network failure raises :class:`DatasetNotFoundError` saying where to put the
    files by hand.
    """
    key, arc = _resolve_archive(name)
    root = Path(root).expanduser()
    target = root / arc.folder
    manual = (f"Download {arc.url} yourself and extract it into {root} so that the folder "
              f"{target} exists, or set data.root / SSFL_DATA_DIR to a folder that already "
              f"holds {arc.folder}.")
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatasetNotFoundError(f"cannot create the data folder {root} ({exc}). {manual}") \
            from exc

    log.info("downloading %s to %s", arc.url, root)
    try:
        tmp, actual = _fetch(arc.url, root, timeout)
    except (urllib.error.URLError, OSError) as exc:
        raise DatasetNotFoundError(
            f"could not download {arc.filename} from {arc.url} ({exc}). {manual}") from exc

    try:
        if actual != arc.md5:
            raise CorruptDatasetError(
                f"{arc.url}: MD5 mismatch, expected {arc.md5}, got {actual}; the download "
                f"was deleted. Retry, or fetch the file by hand. {manual}")
        staging = Path(tempfile.mkdtemp(prefix=".ssfl-extract-", dir=root))
        try:
            safe_extract(tmp, staging)
            _move_into(staging, root)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    finally:
        tmp.unlink(missing_ok=True)
    log.info("extracted %s into %s", key, target)
    return target
