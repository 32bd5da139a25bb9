"""Client-level differential privacy for the global-mask methods (``[privacy]``,
``ssfl.privacy``, docs/privacy.md): clipping, the unweighted mean, the noise, the accountant,
the config's refusals, and whole runs in both modes (simulator and Flower)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from ssfl import privacy
from ssfl.algorithms.base import Reply
from ssfl.algorithms.static import DenseFedAvg
from ssfl.comm import PayloadError, decode_values, encode_values
from ssfl.config import ConfigError, load_config
from ssfl.sim import run_experiment

sys.path.insert(0, str(Path(__file__).resolve().parent))
from algo_helpers import make_setup  # noqa: E402

dp_accounting = pytest.importorskip("dp_accounting")

TINY = ["run.rounds=3", "federation.num_clients=8", "federation.clients_per_round=4",
        "run.threads=1", "run.progress=false", "train.local_epochs=1", "train.batch_size=64"]


# ---- the mechanism ----------------------------------------------------------------------------
def test_clipping_keeps_the_direction_and_bounds_the_norm() -> None:
    reference = torch.tensor([1.0, 1.0, 1.0, 1.0])
    change = torch.tensor([6.0, 8.0, 0.0, 0.0])  # norm 10
    delta, norm = privacy.clip_change(reference + change, reference, 1.0)
    assert norm == pytest.approx(10.0)
    assert float(delta.norm()) == pytest.approx(1.0)
    assert torch.allclose(delta, torch.tensor([0.6, 0.8, 0.0, 0.0], dtype=torch.float64))
    # a change inside the bound is left alone
    small, norm = privacy.clip_change(reference + change / 20, reference, 1.0)
    assert norm == pytest.approx(0.5)
    assert torch.allclose(small, (change / 20).double())


def test_without_noise_the_private_mean_is_the_unweighted_mean_of_clipped_changes() -> None:
    reference = torch.tensor([1.0, 2.0, 3.0])
    updates = [reference + torch.tensor([3.0, 4.0, 0.0]),  # norm 5 -> (0.6, 0.8, 0)
               reference + torch.tensor([0.0, 0.5, 0.0])]  # norm 0.5, kept
    new, info = privacy.private_mean(updates, reference, clip_norm=1.0, noise_multiplier=0.0,
                                     clients_per_round=2, seed=0, round=1)
    assert torch.allclose(new, reference + torch.tensor([0.3, 0.65, 0.0]))
    assert info == {"clipped": 1, "noise_std": 0.0}
    # A sampled client that gave no reply counts as no change: the denominator is the sample.
    fewer, _ = privacy.private_mean(updates, reference, clip_norm=1.0, noise_multiplier=0.0,
                                    clients_per_round=4, seed=0, round=1)
    assert torch.allclose(fewer, reference + torch.tensor([0.15, 0.325, 0.0]))


def test_noise_std_is_noise_multiplier_times_clip_over_the_sample() -> None:
    size, sigma, clip, m = 400_000, 1.5, 2.0, 4
    reference = torch.zeros(size)
    new, info = privacy.private_mean([reference.clone() for _ in range(m)], reference,
                                     clip_norm=clip, noise_multiplier=sigma,
                                     clients_per_round=m, seed=3, round=7)
    assert info["noise_std"] == pytest.approx(sigma * clip / m)  # 0.75
    assert float(new.double().std()) == pytest.approx(0.75, rel=0.01)
    assert abs(float(new.double().mean())) < 0.01


def test_noise_is_seeded_by_seed_and_round() -> None:
    a = privacy.gaussian_noise(1000, 1.0, seed=5, round=2)
    assert torch.equal(a, privacy.gaussian_noise(1000, 1.0, seed=5, round=2))
    assert not torch.equal(a, privacy.gaussian_noise(1000, 1.0, seed=5, round=3))
    assert not torch.equal(a, privacy.gaussian_noise(1000, 1.0, seed=6, round=2))
    # privacy.noise_seed = "secret": the operating system's entropy, never the same twice
    assert not torch.equal(privacy.gaussian_noise(1000, 1.0, seed=None, round=2),
                           privacy.gaussian_noise(1000, 1.0, seed=None, round=2))


def _dense_fedavg(*overrides: str) -> DenseFedAvg:
    initial = {"w": torch.zeros(4, 3), "b": torch.zeros(4)}  # weight and (dense) bias
    setup = make_setup(initial, ["w"], 1.0, num_clients=4, name="fedavg",
                       overrides=["federation.clients_per_round=2", *overrides])
    return DenseFedAvg(setup, None)


def test_aggregate_noises_every_value_biases_included_and_ignores_sample_counts() -> None:
    alg = _dense_fedavg("privacy.mode=server", "privacy.noise_multiplier=0",
                        "privacy.clip_norm=1.0")
    state = alg.init()
    assert state.values.numel() == 16  # 12 weights and 4 biases: one value vector
    big, small = torch.zeros(16), torch.zeros(16)
    big[0], small[15] = 10.0, 0.5  # a weight changed by 10, a bias by 0.5
    # a client claiming 1000 samples has no more say than one with 1
    new, info = alg.aggregate(state, 1, [Reply(0, 1000, big), Reply(1, 1, small)], [0, 1])
    expected = torch.zeros(16)
    expected[0], expected[15] = 0.5, 0.25
    assert torch.allclose(new.values, expected)
    assert info == {"privacy": {"clipped": 1, "noise_std": 0.0}}
    noisy = _dense_fedavg("privacy.mode=server", "privacy.noise_multiplier=1.0")
    out, info = noisy.aggregate(state, 1, [Reply(0, 1, small), Reply(1, 1, small)], [0, 1])
    assert info["privacy"]["noise_std"] == 0.5
    assert bool((out.values - small).ne(0).all())  # noise on every value, biases too
    again, _ = noisy.aggregate(state, 1, [Reply(0, 1, small), Reply(1, 1, small)], [0, 1])
    assert torch.equal(out.values, again.values)


def test_default_aggregate_is_untouched() -> None:
    alg = _dense_fedavg()
    state = alg.init()
    a, b = torch.full((16,), 1.0), torch.full((16,), 4.0)
    new, info = alg.aggregate(state, 1, [Reply(0, 1, a), Reply(1, 3, b)], [0, 1])
    assert info == {} and torch.allclose(new.values, torch.full((16,), 3.25))


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_client_clipping_and_the_servers_check(dtype: str) -> None:
    torch.manual_seed(0)
    values = torch.randn(5000) * 3
    digest = b"12345678"
    received = encode_values(values, round=4, digest=digest, dtype=dtype)
    sent = decode_values(received)
    trained = sent + torch.randn(5000)  # a change of norm ~70
    reply = encode_values(trained, round=4, digest=digest, dtype=dtype)
    clipped = privacy.clip_reply(reply, received, 0.5, round=4, digest=digest, dtype=dtype)
    out = decode_values(clipped, expected_round=4, expected_digest=digest,
                        expected_dtype=dtype)
    change = out.double() - sent.double()
    assert float(change.norm()) <= privacy.clip_allowance(0.5, out, dtype)
    assert float(change.norm()) == pytest.approx(0.5, rel=0.02 if dtype == "float16" else 1e-5)
    # direction kept: the clipped change is a multiple of the trained one (up to float16's
    # rounding of values ~3 with steps of 2**-9, against changes of ~0.007 per value)
    cos = torch.nn.functional.cosine_similarity(change, (trained - sent).double(), dim=0)
    assert float(cos) > (0.99 if dtype == "float16" else 0.99999)
    privacy.check_clipped(out, sent, 0.5, dtype)  # accepted
    with pytest.raises(PayloadError, match="clip_norm"):  # an unclipped reply is refused
        privacy.check_clipped(decode_values(reply), sent, 0.5, dtype)


# ---- the accountant ---------------------------------------------------------------------------
def test_epsilon_is_dp_accountings_own() -> None:
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent, pld, rdp

    event = PoissonSampledDpEvent(10 / 100, GaussianDpEvent(1.1))
    direct = rdp.RdpAccountant()
    direct.compose(event, 60)
    ours = privacy.epsilon(60, noise_multiplier=1.1, num_clients=100, clients_per_round=10,
                           delta=1e-5)
    assert ours == pytest.approx(direct.get_epsilon(1e-5), rel=1e-12)
    direct_pld = pld.PLDAccountant()
    direct_pld.compose(event, 60)
    assert privacy.epsilon(60, noise_multiplier=1.1, num_clients=100, clients_per_round=10,
                           delta=1e-5, accountant="pld") == pytest.approx(
        direct_pld.get_epsilon(1e-5), rel=1e-9)
    # PLD is the tighter account; sampling a fixed number without replacement (replace-one,
    # sensitivity 2C) the looser one
    fixed = privacy.epsilon(60, noise_multiplier=1.1, num_clients=100, clients_per_round=10,
                            delta=1e-5, accountant="rdp_fixed_size")
    assert direct_pld.get_epsilon(1e-5) < ours < fixed


def test_epsilon_grows_with_rounds_and_falls_with_noise() -> None:
    def eps(rounds: int, sigma: float) -> float:
        return privacy.epsilon(rounds, noise_multiplier=sigma, num_clients=100,
                               clients_per_round=10, delta=1e-5)

    by_round = [eps(r, 1.0) for r in (1, 2, 10, 60)]
    assert by_round == sorted(by_round) and len(set(by_round)) == 4
    by_noise = [eps(60, s) for s in (0.5, 1.0, 2.0, 4.0)]
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 4
    assert eps(60, 0.0) == math.inf and privacy.report(math.inf) is None
    assert eps(0, 1.0) == 0.0
    sigma = privacy.noise_multiplier_for(8.0, 60, num_clients=100, clients_per_round=10,
                                         delta=1e-5)
    assert eps(60, sigma) <= 8.0 < eps(60, sigma - 0.01)


def test_a_missing_accountant_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "dp_accounting", None)  # import fails
    privacy.epsilon.cache_clear()
    with pytest.raises(ConfigError, match=r"ssfl\[privacy\]|\.\[privacy\]"):
        privacy.epsilon(3, noise_multiplier=1.0, num_clients=8, clients_per_round=4,
                        delta=1e-5)
    config = load_config(None, [*TINY, "privacy.mode=server"])
    with pytest.raises(ConfigError, match="dp-accounting"):
        run_experiment(config, write=False)


# ---- the config -------------------------------------------------------------------------------
@pytest.mark.parametrize(("override", "match"), [
    (["privacy.mode=local"], "privacy.mode"),
    (["privacy.noise_multiplier=-1"], "privacy.noise_multiplier"),
    (["privacy.clip_norm=0"], "privacy.clip_norm"),
    (["privacy.delta=0"], "privacy.delta"),
    (["privacy.delta=1.0"], "privacy.delta"),
    (["privacy.accountant=moments"], "privacy.accountant"),
    (["privacy.noise_seed=42"], "privacy.noise_seed"),
    (["privacy.mode=server", "algorithm.name=feddst"], "one global mask fixed"),
    (["privacy.mode=client", "algorithm.name=sparsyfed"], "one global mask fixed"),
    (["privacy.mode=server", "algorithm.name=random_clientwise"], "one global mask fixed"),
    (["privacy.mode=server", "federation.aggregator=median"], "aggregator = 'mean'"),
    (["privacy.mode=server", "federation.aggregator=krum", "federation.min_replies=4"],
     "aggregator = 'mean'"),
    (["privacy.mode=server", "federation.update_clip_norm=2"], "update_clip_norm = 0"),
    (["privacy.mode=client", "federation.adaptive_clip=2"], "adaptive_clip = 0"),
])
def test_config_refusals(override: list[str], match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load_config(None, [*TINY, *override])


@pytest.mark.parametrize("method", ["ssfl", "fedavg", "random", "random_erk", "snip_single",
                                    "snip_oracle"])
def test_every_global_mask_method_takes_privacy(method: str) -> None:
    density = "1.0" if method == "fedavg" else "0.3"
    config = load_config(None, [*TINY, f"algorithm.name={method}",
                                f"algorithm.density={density}", "privacy.mode=server"])
    assert config.privacy.mode == "server"
    # the section travels in the Flower run config like any other
    flower = pytest.importorskip("ssfl.flower.protocol")
    flat = flower.run_config_from_config(config)
    assert flat["privacy.mode"] == "server" and flat["privacy.clip-norm"] == 1.0
    assert flower.config_from_run_config(flat)[0] == config


# ---- whole runs -------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["server", "client"])
def test_tiny_run_reports_epsilon_every_round_and_in_the_summary(mode: str) -> None:
    config = load_config(None, [*TINY, f"privacy.mode={mode}", "privacy.noise_multiplier=0.8",
                                "privacy.clip_norm=0.5"])
    result = run_experiment(config, write=False)
    eps = [row["epsilon"] for row in result.metrics]
    assert eps == sorted(eps) and len(set(eps)) == 3
    assert eps[-1] == pytest.approx(privacy.epsilon(
        3, noise_multiplier=0.8, num_clients=8, clients_per_round=4, delta=1e-5))
    assert result.summary["epsilon"] == eps[-1]
    info = result.summary["privacy"]
    assert info["mode"] == mode and info["sampling_rate"] == 0.5 and info["rounds"] == 3
    assert info["noise_std"] == pytest.approx(0.8 * 0.5 / 4)
    assert info["mask_from_client_data"] is True  # SSFL's mask round: not accounted
    for row in result.metrics:
        assert row["diagnostics"]["privacy"]["noise_std"] == pytest.approx(0.1)
        assert "rejected" not in row
    assert math.isfinite(float(result.final_values.sum()))


def test_both_modes_agree_without_noise_and_runs_repeat_bit_for_bit() -> None:
    base = [*TINY, "run.rounds=2", "privacy.noise_multiplier=0", "privacy.clip_norm=0.3",
            "algorithm.name=random", "algorithm.density=0.3"]
    server = run_experiment(load_config(None, [*base, "privacy.mode=server"]), write=False)
    client = run_experiment(load_config(None, [*base, "privacy.mode=client"]), write=False)
    # the server clipped what the clients would have: the same model, to float32 rounding
    assert torch.allclose(server.final_values, client.final_values, atol=1e-5)
    assert server.metrics[-1]["epsilon"] is None  # no noise, no guarantee
    assert server.summary["privacy"]["mask_from_client_data"] is False  # a random mask
    noisy = [*base, "privacy.mode=server", "privacy.noise_multiplier=1"]
    a = run_experiment(load_config(None, noisy), write=False)
    b = run_experiment(load_config(None, noisy), write=False)
    assert torch.equal(a.final_values, b.final_values)
    assert not torch.allclose(a.final_values, server.final_values)
    secret = [*noisy, "privacy.noise_seed=secret"]
    c = run_experiment(load_config(None, secret), write=False)
    d = run_experiment(load_config(None, secret), write=False)
    assert not torch.equal(c.final_values, d.final_values)
    assert c.summary["epsilon"] == a.summary["epsilon"]
    assert c.summary["privacy"]["noise_seed"] == "secret"


def test_client_mode_refuses_a_client_that_does_not_clip() -> None:
    config = load_config(None, [*TINY, "run.rounds=1", "privacy.mode=client",
                                "attack.kind=boost", "attack.hostile_per_round=1"])
    result = run_experiment(config, write=False)
    rejected = result.metrics[0]["rejected"]
    assert len(rejected) == 1 and "clip_norm" in rejected[0]["reason"]


def test_default_run_has_no_privacy_keys() -> None:
    result = run_experiment(load_config(None, [*TINY, "run.rounds=1"]), write=False)
    assert "epsilon" not in result.metrics[0]
    assert "privacy" not in result.metrics[0].get("diagnostics", {})
    assert "epsilon" not in result.summary and "privacy" not in result.summary


@pytest.mark.slow
def test_client_mode_on_flower_matches_the_simulator(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """The clients' clipping runs in the ClientApp (the shared client code reads ``[privacy]``
    from the run config); the in-process Grid runs Flower's message path."""
    pytest.importorskip("flwr")
    from flower_grid import InMemoryGrid
    from flwr.supercore.task_identity import TaskIdentity

    from ssfl.flower.protocol import FlowerSettings, run_config_from_config
    from ssfl.flower.server_app import run_on_grid

    for key in ("_run_id", "_node_id", "_task_id"):
        monkeypatch.setattr(TaskIdentity, key, 1)
    monkeypatch.setenv("SSFL_CACHE_DIR", str(tmp_path / "cache"))
    config = load_config(None, [*TINY, "run.rounds=2", "federation.num_clients=3",
                                "federation.clients_per_round=2", "privacy.mode=client",
                                "privacy.clip_norm=0.3", "privacy.noise_multiplier=0.5"])
    sim = run_experiment(config, write=False)
    grid = InMemoryGrid(run_config_from_config(config), [{}, {}])
    fl = run_on_grid(grid, config, FlowerSettings(node_wait_seconds=5), tmp_path / "run")
    assert torch.equal(fl["values"], sim.final_values)
    assert [r["epsilon"] for r in fl["metrics"]] == [r["epsilon"] for r in sim.metrics]
    assert fl["summary"]["epsilon"] == sim.summary["epsilon"]
    # noise drawn from run.seed, which every Flower client knows: the server says so
    assert any("noise_seed = 'secret'" in r.getMessage() for r in caplog.records)
