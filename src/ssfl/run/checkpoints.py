"""A run's checkpoint: the server state of its method, the clients' states where the transport
keeps them, the metrics so far, the byte ledger; ``ssfl run --resume`` continues from it and
ends exactly as an uninterrupted run (all randomness is drawn from (seed, round, client))."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import torch

from ssfl.algorithms.common import bytes_tensor, tensor_bytes
from ssfl.checkpoint import FILENAME, CheckpointError, prefixed, save_checkpoint, unprefixed
from ssfl.config import to_toml
from ssfl.run.experiment import device_name
from ssfl.run.ledger import Ledger

if TYPE_CHECKING:
    from ssfl.run.loop import Run

#: the layout of a run checkpoint's metadata (2: the algorithm interface and the ledger)
LAYOUT = 2


def save(r: Run, rnd: int) -> None:
    assert r.folder.path is not None
    meta, tensors = r.algorithm.state_dict(r.state)
    clients = {str(c): bytes_tensor(s) for c, s in r.transport.client_states().items()}
    save_checkpoint(r.folder.path / FILENAME, {
        "layout": LAYOUT, "round": rnd, "config": to_toml(r.config), "metrics": r.metrics,
        "ledger": r.ledger.to_json(), "mask_info": r.mask_info,
        "wall_seconds": time.perf_counter() - r.started, "algorithm": meta,
        "clients": sorted(clients), "device": device_name(r.exp.model),
    }, {**prefixed("algorithm", tensors), **prefixed("clients", clients)})


def restore(r: Run, checkpoint: tuple[dict[str, Any], dict[str, torch.Tensor]]) -> None:
    """Continue ``r`` from a checkpoint (server state, client states, metrics, ledger)."""
    meta, tensors = checkpoint
    if meta.get("layout") != LAYOUT:
        raise CheckpointError("the checkpoint was written by an earlier version of ssfl, "
                              "whose server state this version cannot read; start the run "
                              "again (or resume it with the ssfl version that started it)")
    try:
        r.state = r.algorithm.load_state(meta["algorithm"], unprefixed("algorithm", tensors))
    except (KeyError, ValueError) as exc:
        raise CheckpointError(f"the checkpoint's server state does not fit this run: "
                              f"{exc}") from None
    clients = unprefixed("clients", tensors)
    r.transport.load_client_states({int(c): tensor_bytes(clients[c]) for c in meta["clients"]})
    r.metrics = list(meta["metrics"])
    r.ledger = Ledger.from_json(meta["ledger"])
    r.mask_info = dict(meta["mask_info"])
    r.first_round = int(meta["round"]) + 1
    r.started = time.perf_counter() - float(meta["wall_seconds"])
