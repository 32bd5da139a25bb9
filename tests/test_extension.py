"""A method added from user code: a from-scratch dense FedAvg registered in this file runs in
the simulator and on Flower's in-process grid, and gives exactly the built-in FedAvg's run."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from ssfl.algorithms import Algorithm, register
from ssfl.algorithms.base import ClientOutput
from ssfl.algorithms.common import WeightedMean, flat_weights, load_weights_
from ssfl.client import local_train
from ssfl.comm import decode_values, encode_values
from ssfl.config import load_config
from ssfl.masks import full_mask, unflatten
from ssfl.sim import run_experiment

Weights = dict[str, torch.Tensor]


@register("toy_fedavg", "dense FedAvg written from scratch in a test file")
class ToyFedAvg(Algorithm[Weights]):
    def init(self) -> Weights:
        return {n: t.clone() for n, t in self.setup.initial.items()}

    def flat(self, weights: Any) -> torch.Tensor:
        return flat_weights(weights, list(self.setup.shapes)).detach().cpu()

    def configure(self, state: Weights, round: int, clients: Any, attempt: int) -> Any:
        payload = encode_values(self.flat(state), round=round)
        return {c: payload for c in clients}

    def check(self, state: Weights, round: int, client_id: int, payload: bytes) -> Any:
        return decode_values(payload, expected_count=sum(t.numel() for t in state.values()),
                             expected_round=round, require_finite=True)

    def aggregate(self, state: Weights, round: int, replies: Any, sampled: Any,
                  refused: Any = ()) -> Any:
        mean = WeightedMean()
        for r in replies:
            mean.add(r.update, float(r.num_samples))
        return unflatten(mean.result(), self.setup.shapes, list(self.setup.shapes)), {}

    def eval_weights(self, state: Weights, client: int | None = None) -> Weights:
        return state

    def global_mask(self, state: Weights) -> Any:
        return full_mask(self.setup.prunable_shapes)

    def final_values(self, state: Weights) -> torch.Tensor:
        return self.flat(state)

    def state_dict(self, state: Weights) -> Any:
        return {}, dict(state)

    def load_state(self, meta: Any, tensors: Any) -> Weights:
        return {n: tensors[n].clone() for n in self.setup.shapes}

    def client_step(self, ctx: Any, received: bytes, state: bytes | None) -> ClientOutput:
        values = decode_values(received, expected_round=ctx.round)
        load_weights_(ctx.model, unflatten(values, self.setup.shapes, list(self.setup.shapes)))
        result = local_train(ctx.model, ctx.data, ctx.settings, ctx.lr, ctx.generator)
        trained = int.from_bytes(state or b"\0", "little") + 1  # the client's own state
        reply = encode_values(self.flat(dict(ctx.model.named_parameters())), round=ctx.round)
        return ClientOutput(reply, trained.to_bytes(2, "little"), result)


QUICK = ["run.rounds=3", "run.threads=1", "run.progress=false", "federation.num_clients=3",
         "federation.clients_per_round=2", "train.local_epochs=1", "train.batch_size=64",
         "algorithm.density=1.0"]


def test_a_registered_method_runs_in_the_simulator_like_the_builtin_it_rewrites() -> None:
    toy = run_experiment(load_config(None, [*QUICK, "algorithm.name=toy_fedavg"]), write=False)
    builtin = run_experiment(load_config(None, [*QUICK, "algorithm.name=fedavg"]), write=False)
    assert torch.equal(toy.final_values, builtin.final_values)
    assert [m["accuracy"] for m in toy.metrics] == [m["accuracy"] for m in builtin.metrics]
    assert toy.summary["total_bytes"] == builtin.summary["total_bytes"]


def test_a_registered_method_runs_on_flowers_grid_with_client_state(monkeypatch: Any) -> None:
    pytest.importorskip("flwr")
    from flower_grid import InMemoryGrid
    from flwr.supercore.task_identity import TaskIdentity

    from ssfl.flower.protocol import FlowerSettings, client_state_key, run_config_from_config
    from ssfl.flower.server_app import run_on_grid

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    config = load_config(None, [*QUICK, "algorithm.name=toy_fedavg"])
    sim = run_experiment(config, write=False)
    grid = InMemoryGrid(run_config_from_config(config), [{}, {}])
    fl = run_on_grid(grid, config, FlowerSettings(node_wait_seconds=5), write=False)
    assert torch.equal(fl["values"], sim.final_values)
    # Each client's state lives in its node's context.state: rounds it trained in.
    trained = sum(int.from_bytes(bytes(ctx.state[client_state_key(c)]["payload"].numpy()),
                                 "little")
                  for ctx in grid.contexts.values() for c in range(3)
                  if client_state_key(c) in ctx.state)
    assert trained == config.run.rounds * config.federation.clients_per_round


def _doc_example() -> dict[str, Any]:
    """Run the worked example of docs/extending.md (the block after its marker)."""
    from pathlib import Path

    text = (Path(__file__).parents[1] / "docs" / "extending.md").read_text()
    block = text.split("<!-- example: method -->", 1)[1].split("```python\n", 1)[1]
    namespace: dict[str, Any] = {}
    exec(compile(block.split("```", 1)[0], "docs/extending.md", "exec"), namespace)
    return namespace


@pytest.mark.slow
def test_the_docs_worked_example_runs_in_the_simulator_and_on_flower(monkeypatch: Any) -> None:
    from ssfl.algorithms import register
    from ssfl.masks import global_top_k, mask_density, topk_count

    example = _doc_example()
    register("initial_magnitude", "again", replace=True)(example["InitialMagnitude"])
    overrides = [*QUICK, "algorithm.name=initial_magnitude", "algorithm.density=0.2"]
    result = run_experiment(load_config(None, overrides), write=False)
    # The mask is the global top-k of the seeded initial weights' magnitudes.
    from ssfl.sim import prepare

    exp = prepare(load_config(None, overrides))
    k = topk_count(0.2, sum(exp.initial[n].numel() for n in exp.prunable))
    assert sum(int(m.sum()) for m in result.mask.values()) == k
    assert mask_density(result.mask) == pytest.approx(0.2, abs=1e-4)
    expected = global_top_k({n: exp.initial[n].abs() for n in exp.prunable}, k)
    assert all(torch.equal(result.mask[n], expected[n]) for n in exp.prunable)
    assert result.summary["one_time_bytes"]["mask_broadcast"] > 0
    # Its own setting, checked by its Settings class, and refused when unknown.
    smallest = run_experiment(load_config(None, [
        *overrides, "algorithm.initial_magnitude.largest=false"]), write=False)
    assert not all(torch.equal(smallest.mask[n], expected[n]) for n in exp.prunable)
    from ssfl.config import ConfigError

    with pytest.raises(ConfigError, match="algorithm.initial_magnitude.nope"):
        load_config(None, [*overrides, "algorithm.initial_magnitude.nope=1"])
    # On Flower's message path: the same run.
    pytest.importorskip("flwr")
    from flower_grid import InMemoryGrid
    from flwr.supercore.task_identity import TaskIdentity

    from ssfl.flower.protocol import FlowerSettings, run_config_from_config
    from ssfl.flower.server_app import run_on_grid

    for attr in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, attr, 1)
    config = load_config(None, overrides)
    fl = run_on_grid(InMemoryGrid(run_config_from_config(config), [{}]), config,
                     FlowerSettings(node_wait_seconds=5), write=False)
    assert torch.equal(fl["values"], result.final_values)


def test_a_method_written_against_the_older_interface_is_refused_at_registration() -> None:
    class OldFedAvg(ToyFedAvg):
        def aggregate(self, state: Weights, round: int, replies: Any, sampled: Any) -> Any:
            return super().aggregate(state, round, replies, sampled)

    with pytest.raises(TypeError, match=r"aggregate\(self, state, round, replies, sampled, "
                                        r"refused=\(\)\)"):
        register("old_fedavg", "written before aggregate took refused")(OldFedAvg)
    with pytest.raises(KeyError):
        from ssfl.algorithms import get
        get("old_fedavg")
