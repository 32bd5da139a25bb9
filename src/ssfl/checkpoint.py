"""Atomic, pickle-free checkpoints of a run's server state.

A checkpoint is one ``torch.save`` file holding only tensors and a JSON string, read back with
``torch.load(..., weights_only=True)`` so that loading never runs code from the file. It is
written to a temporary file in the same folder, flushed to disk, then renamed over the old one:
a crash while saving leaves the previous checkpoint intact (and its temporary file, which the
next save removes).

A checkpoint whose metadata holds a ``checksum`` (see :func:`seal`; a run's checkpoints always
do) is checked against it on loading: a tensor or the metadata changed since it was written
is refused as corrupt. :func:`save_checkpoint` writes what it is given and computes nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path
from typing import Any

import torch

FORMAT = 1
FILENAME = "checkpoint.pt"
#: the metadata key of the checksum over the metadata and the tensors
CHECKSUM = "checksum"


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, corrupt or from another format."""


def checksum(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> str:
    """blake2b over the metadata (as JSON, its ``checksum`` left out) and every tensor's name,
    dtype, shape and bytes."""
    h = hashlib.blake2b(digest_size=32, person=b"ssfl-checkpoint")

    def chunk(data: bytes | memoryview) -> None:
        h.update(struct.pack("<Q", len(data)))
        h.update(data)

    # The JSON that loading gives back (tuples as lists, keys as strings), in one key order.
    plain = json.loads(json.dumps({k: v for k, v in meta.items() if k != CHECKSUM}))
    chunk(json.dumps(plain, sort_keys=True, separators=(",", ":")).encode())
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        chunk(name.encode())
        chunk(str(t.dtype).encode())
        chunk(json.dumps(list(t.shape)).encode())
        chunk(memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b"")
    return h.hexdigest()


def seal(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """``meta`` with the checksum of it and ``tensors`` (what :func:`load_checkpoint` checks)."""
    return {**meta, CHECKSUM: checksum(meta, tensors)}


def remove_stale_temporaries(path: str | os.PathLike[str]) -> list[Path]:
    """Delete the temporary files of saves of ``path`` that never finished (a process killed
    while saving leaves one); returns what was removed. Only the process that owns the run
    folder may call this: another one's save in progress would lose its file."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp"):
        try:
            if tmp.is_symlink() or tmp.is_file():
                tmp.unlink()
                removed.append(tmp)
        except OSError:
            pass  # gone already, or not ours to delete: the save itself still works
    return removed


def save_checkpoint(path: str | os.PathLike[str], meta: dict[str, Any],
                    tensors: dict[str, torch.Tensor]) -> None:
    """Write ``meta`` and ``tensors`` atomically to ``path`` (as given: nothing is computed,
    a ``checksum`` in ``meta`` included), removing what killed saves left behind."""
    path = Path(path)
    remove_stale_temporaries(path)
    payload = {"format": torch.tensor(FORMAT), "meta": json.dumps(meta),
               "tensors": {k: t.detach().contiguous() for k, t in tensors.items()}}
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no checkpoint at {path}: the run saved none (set "
                              f"run.checkpoint_every > 0) or the folder is not a run folder")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        meta = json.loads(payload["meta"])
        tensors = payload["tensors"]
        version = int(payload["format"])
    except Exception as exc:  # any failure to read means the file is unusable
        raise CheckpointError(
            f"checkpoint {path} is truncated or corrupt ({type(exc).__name__}: {exc}); "
            f"delete it to restart the run from scratch"
        ) from None
    if version != FORMAT:
        raise CheckpointError(f"checkpoint {path} has format {version}, expected {FORMAT}")
    if not isinstance(tensors, dict) or not all(isinstance(k, str) and isinstance(t, torch.Tensor)
                                                for k, t in tensors.items()):
        raise CheckpointError(f"checkpoint {path} does not hold a table of tensors")
    if not isinstance(meta, dict):
        raise CheckpointError(f"checkpoint {path}: its metadata is a {type(meta).__name__}, "
                              f"not a table")
    if CHECKSUM in meta:
        try:
            ok = meta[CHECKSUM] == checksum(meta, tensors)
        except Exception:  # a tensor that cannot be read as bytes
            ok = False
        if not ok:
            raise CheckpointError(f"checkpoint {path} is corrupt: a tensor or the metadata "
                                  f"changed since it was written; delete it to restart the "
                                  f"run from scratch")
    return meta, tensors


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    start = len(prefix) + 1
    return {k[start:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}
