"""Client-level differential privacy for the global-mask methods (``[privacy]``,
docs/privacy.md): DP-FedAvg (McMahan et al., ICLR 2018) over the value vector of one fixed mask.

Every client of a global-mask method (``ssfl.algorithms.ssfl.FixedMaskFedAvg``: SSFL, dense
FedAvg, the random and SNIP masks) replies with a vector over the same coordinates, the mask's
values in ``ParameterLayout`` order (the pruned weights' active entries, and every bias and
normalisation parameter). So the Gaussian mechanism applies to that vector exactly as to a
dense model, at the density's cost:

1. **clip**: each client's change ``reply - sent`` (``sent``: the global values as the clients
   received them, after the wire's rounding) is scaled to L2 norm at most ``clip_norm``
   (``clip_change``; FlatClip, as Flower's ``compute_clip_model_update``). Mode ``server``: the
   server clips; mode ``client``: each client clips its own change before encoding its reply
   (``clip_reply``), and the server refuses a reply whose change is longer than the bound
   allows beyond the wire's rounding (``check_clipped``), then clips again, which for an
   honest client changes at most the last bits;
2. **average, unweighted**: the clipped changes are summed and divided by the fixed sample size
   ``federation.clients_per_round`` (``m``), not weighted by sample count: one client then
   moves the mean by at most ``clip_norm / m``, whoever the others are and whatever sample
   count it claims (the sensitivity the accountant assumes). When every sampled client
   replies this is the plain unweighted mean; a client that dropped out counts as no change;
3. **noise**: Gaussian noise of std ``noise_multiplier * clip_norm / m`` is added to every
   coordinate of the mean (``gaussian_noise``, seeded by ``(run.seed, round)`` so that a run,
   and a resumed run, is reproducible).

``epsilon`` is the (epsilon, delta) guarantee after ``rounds`` such releases, from Google's
dp-accounting (the optional extra ``ssfl[privacy]``): the Poisson-subsampled Gaussian mechanism
with sampling rate ``q = clients_per_round / num_clients`` under RDP (default) or PLD
accounting, or (``rdp_fixed_size``) RDP of sampling exactly ``m`` of ``num_clients`` without
replacement, which is what ``sample_clients`` does, with replace-one adjacency (sensitivity
``2 clip_norm``).

This module imports torch only inside the functions that need it, and dp-accounting only in
``epsilon``.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ssfl.config import ConfigError

if TYPE_CHECKING:
    import torch

#: the optional dependency that computes epsilon, and the extra that installs it
ACCOUNTING_PACKAGE = "dp-accounting"
EXTRA = "ssfl[privacy]"
#: the noise's random stream: numpy's generator seeded by (run.seed, round, this)
NOISE_STREAM = 0x50524956  # "PRIV"
#: unit roundoff of each wire dtype (``comm.value_dtype``) and half the spacing of its smallest
#: (subnormal) values: what encoding a value can change it by
ROUNDING = {"float32": (2.0**-24, 2.0**-150), "float16": (2.0**-11, 2.0**-25)}


class AccountingUnavailable(ConfigError):
    """dp-accounting is not installed (``pip install 'ssfl[privacy]'``)."""


def require_accountant() -> None:
    """Raise ``AccountingUnavailable`` naming the extra unless dp-accounting imports."""
    try:
        import dp_accounting  # noqa: F401
    except ImportError as exc:
        raise AccountingUnavailable(
            f"privacy.mode needs the privacy accountant ({ACCOUNTING_PACKAGE}) to report "
            f"epsilon: install the optional extra, pip install -e '.[privacy]' (or pip install "
            f"'{EXTRA}'), or set privacy.mode = 'none'") from exc


# ---- the mechanism -----------------------------------------------------------------------------
def clip_change(values: torch.Tensor, reference: torch.Tensor, clip_norm: float
                ) -> tuple[torch.Tensor, float]:
    """``values - reference`` scaled to L2 norm at most ``clip_norm`` (float64; direction
    kept), and the change's norm before clipping."""
    import torch

    delta = values.to(torch.float64) - reference.to(torch.float64)
    norm = float(delta.norm())
    if norm > clip_norm:
        delta = delta * (clip_norm / norm)
    return delta, norm


def gaussian_noise(count: int, std: float, seed: int | None, round: int) -> torch.Tensor:
    """``count`` independent N(0, std^2) draws (float64), the same for the same (seed, round);
    ``seed`` None: from the operating system's entropy (``privacy.noise_seed = "secret"``)."""
    import torch

    rng = np.random.default_rng(None if seed is None else [seed, round, NOISE_STREAM])
    return torch.from_numpy(rng.standard_normal(count)) * std


def noise_std(noise_multiplier: float, clip_norm: float, clients_per_round: int) -> float:
    """The std of the noise on the mean: ``noise_multiplier * clip_norm / clients_per_round``
    (Flower's ``compute_stdv``)."""
    return noise_multiplier * clip_norm / clients_per_round


def private_mean(updates: Sequence[torch.Tensor], reference: torch.Tensor, *, clip_norm: float,
                 noise_multiplier: float, clients_per_round: int, seed: int | None,
                 round: int) -> tuple[torch.Tensor, dict[str, Any]]:
    """The new global vector (float32): ``reference`` plus the sum of the clipped changes of
    ``updates`` divided by ``clients_per_round``, plus seeded Gaussian noise of std
    ``noise_multiplier * clip_norm / clients_per_round``; and what it did (how many changes
    were longer than ``clip_norm``, the noise std)."""
    import torch

    total = torch.zeros(reference.numel(), dtype=torch.float64)
    clipped = 0
    for values in updates:  # in reply order, as every other sum of the server
        delta, norm = clip_change(values, reference, clip_norm)
        clipped += norm > clip_norm
        total += delta
    mean = total / clients_per_round
    std = noise_std(noise_multiplier, clip_norm, clients_per_round)
    if std > 0:
        mean += gaussian_noise(mean.numel(), std, seed, round)
    new = (reference.to(torch.float64) + mean).to(torch.float32)
    return new, {"clipped": clipped, "noise_std": std}


def wire_values(values: torch.Tensor, dtype: str) -> torch.Tensor:
    """``values`` as a client decodes them from a payload of ``dtype`` (float32)."""
    from ssfl.comm import decode_values, encode_values

    return decode_values(encode_values(values, dtype=dtype))


def clip_reply(reply: bytes, received: bytes, clip_norm: float, *, round: int, digest: bytes,
               dtype: str) -> bytes:
    """A client's reply payload with its change from the payload it received clipped to
    ``clip_norm`` (mode ``client``): the same header, the clipped values."""
    from ssfl.comm import decode_values, encode_values

    sent = decode_values(received, expected_round=round, expected_digest=digest)
    trained = decode_values(reply, expected_count=sent.numel(), expected_round=round,
                            expected_digest=digest)
    delta, _ = clip_change(trained, sent, clip_norm)
    return encode_values((sent.to(delta.dtype) + delta), round=round, digest=digest, dtype=dtype)


def clip_allowance(clip_norm: float, reply: torch.Tensor, dtype: str) -> float:
    """The longest change a clipped reply may show the server: ``clip_norm`` plus what the
    client's float32 arithmetic and the wire's rounding can add (a relative ``2 u`` of the
    reply's norm, ``u`` the dtype's unit roundoff, plus the subnormal spacing per value)."""
    unit, tiny = ROUNDING[dtype]
    size = reply.numel()
    return (clip_norm * (1 + 1e-6) + 2 * (unit + 2.0**-24) * float(reply.double().norm())
            + math.sqrt(size) * tiny)


def check_clipped(reply: torch.Tensor, reference: torch.Tensor, clip_norm: float,
                  dtype: str) -> None:
    """``PayloadError`` unless ``reply``'s change from ``reference`` is within the clipping
    bound (mode ``client``: the server verifies what the clients promise)."""
    from ssfl.comm import PayloadError

    norm = float((reply.double() - reference.double()).norm())
    allowed = clip_allowance(clip_norm, reply, dtype)
    if not norm <= allowed:
        raise PayloadError(f"the update's change has L2 norm {norm:.6g}, over "
                           f"privacy.clip_norm = {clip_norm:g} (privacy.mode = 'client': "
                           f"every client clips its own change)")


# ---- the accountant ----------------------------------------------------------------------------
class _NoConvergenceFilter(logging.Filter):
    """dp-accounting's RDP accountant logs a warning for each fractional order whose series does
    not converge and leaves that order out of the minimum (the bound stays valid): not news."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_NoConvergenceFilter())


@functools.lru_cache(maxsize=4096)
def epsilon(rounds: int, *, noise_multiplier: float, num_clients: int, clients_per_round: int,
            delta: float, accountant: str = "rdp") -> float:
    """The epsilon of ``rounds`` releases of the mean at ``delta`` (``math.inf`` without
    noise), computed by dp-accounting:

    - ``rdp`` / ``pld``: ``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))``
      composed ``rounds`` times, ``q = clients_per_round / num_clients``, add/remove one
      client (``RdpAccountant`` with its default orders; ``PLDAccountant``);
    - ``rdp_fixed_size``: ``SampledWithoutReplacementDpEvent(num_clients, clients_per_round,
      GaussianDpEvent(noise_multiplier / 2))`` with ``RdpAccountant`` under replace-one
      adjacency (replacing a client moves the clipped sum by up to ``2 clip_norm``)."""
    if rounds <= 0:
        return 0.0
    if noise_multiplier <= 0:
        return math.inf
    require_accountant()
    import dp_accounting
    from dp_accounting import pld, rdp

    if accountant == "rdp_fixed_size":
        event = dp_accounting.SampledWithoutReplacementDpEvent(
            num_clients, clients_per_round, dp_accounting.GaussianDpEvent(noise_multiplier / 2))
        acc = rdp.RdpAccountant(
            neighboring_relation=dp_accounting.NeighboringRelation.REPLACE_ONE)
    else:
        q = clients_per_round / num_clients
        event = dp_accounting.PoissonSampledDpEvent(
            q, dp_accounting.GaussianDpEvent(noise_multiplier))
        if accountant == "rdp":
            acc = rdp.RdpAccountant()
        elif accountant == "pld":
            acc = pld.PLDAccountant()
        else:
            raise ValueError(f"unknown accountant {accountant!r}")
    acc.compose(event, rounds)
    return float(acc.get_epsilon(delta))


def config_epsilon(config: Any, rounds: int) -> float:
    """``epsilon`` for the ``[privacy]`` and ``[federation]`` of ``config``."""
    p, fed = config.privacy, config.federation
    return epsilon(rounds, noise_multiplier=p.noise_multiplier, num_clients=fed.num_clients,
                   clients_per_round=fed.clients_per_round, delta=p.delta,
                   accountant=p.accountant)


def report(value: float) -> float | None:
    """An epsilon for JSON: ``None`` for infinity (no noise: no guarantee)."""
    return None if math.isinf(value) else value


def noise_multiplier_for(target_epsilon: float, rounds: int, *, num_clients: int,
                         clients_per_round: int, delta: float, accountant: str = "rdp",
                         low: float = 0.05, high: float = 100.0, tolerance: float = 1e-3
                         ) -> float:
    """The smallest noise multiplier (to ``tolerance``, bisection) whose epsilon after
    ``rounds`` is at most ``target_epsilon``; ``math.inf`` if not even ``high`` reaches it."""
    def eps(sigma: float) -> float:
        return epsilon(rounds, noise_multiplier=sigma, num_clients=num_clients,
                       clients_per_round=clients_per_round, delta=delta, accountant=accountant)

    if eps(high) > target_epsilon:
        return math.inf
    if eps(low) <= target_epsilon:
        return low
    while high - low > tolerance:
        mid = (low + high) / 2
        low, high = (low, mid) if eps(mid) <= target_epsilon else (mid, high)
    return high


def mask_from_client_data(algorithm: Any) -> bool:
    """Whether the run's mask was chosen from the clients' data (the saliency masks below
    density 1): that choice is released once, outside the rounds the accountant counts."""
    from ssfl.algorithms.ssfl import SaliencyMask

    return isinstance(algorithm, SaliencyMask) and algorithm.setup.density < 1.0


def summary(config: Any, algorithm: Any, rounds: int) -> dict[str, Any]:
    """What ``summary.json`` says of the privacy of a run of ``rounds`` rounds."""
    p, fed = config.privacy, config.federation
    return {
        "mode": p.mode, "noise_multiplier": p.noise_multiplier, "clip_norm": p.clip_norm,
        "delta": p.delta, "accountant": p.accountant, "noise_seed": p.noise_seed,
        "rounds": rounds,
        "sampling_rate": fed.clients_per_round / fed.num_clients,
        "noise_std": noise_std(p.noise_multiplier, p.clip_norm, fed.clients_per_round),
        "epsilon": report(config_epsilon(config, rounds)),
        # the mask round is not one of the accounted releases (docs/privacy.md)
        "mask_from_client_data": mask_from_client_data(algorithm),
    }
