"""Typed run configuration: TOML files plus ``section.key=value`` overrides, validated up front.

Every key is a typed dataclass field, so a typo or a wrong type stops the run before any data is
loaded, with a message naming the key and what is allowed.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import re
import tempfile
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, get_type_hints

LR_SCHEDULES = ("exponential", "cosine")
#: ``federation.adaptive_clip``'s default, "auto", which ``resolve_robust_defaults`` turns
#: into ``AUTO_ADAPTIVE_CLIP`` or 0; unresolved (a ``Config`` never validated) it clips nothing
AUTO = -1.0
#: the multiple of the round's median change norm that "auto" clips to: an honest round
#: rarely has a change twice the median (the CPU reference's never did, docs/reliability.md),
#: and no client moves the mean by more than twice what a typical client does
AUTO_ADAPTIVE_CLIP = 2.0
#: ``federation.aggregator``'s choices; "auto" (the default) is multi-Krum after adaptive
#: clipping, the plain mean where the server cannot or need not see each update
AGGREGATOR_CHOICES = ("auto", "mean", "median", "trimmed_mean", "krum", "multi_krum",
                      "fltrust")
#: the learning rate inside a round (``train.local_lr_schedule``)
LOCAL_LR_SCHEDULES = ("constant", "cosine_restarts")
AUGMENTATIONS = ("auto", "none", "crop_flip")
#: the names of ``ssfl.comm.VALUE_DTYPES`` (a test keeps them equal; this module stays torch-free)
VALUE_DTYPE_NAMES = ("float16", "float32")

#: the flat ``[algorithm]`` keys of earlier versions, and the method tables they now belong to
#: (``algorithm.update_interval`` -> ``algorithm.feddst.update_interval`` and
#: ``algorithm.prunefl.update_interval``); old configs and run folders still load.
LEGACY_ALGORITHM_KEYS: dict[str, list[tuple[str, str]]] = {
    "score_aggregation": [("ssfl", "score_aggregation"), ("snip_single", "score_aggregation")],
    "saliency_batches": [("ssfl", "saliency_batches"), ("snip_single", "saliency_batches"),
                         ("snip_oracle", "saliency_batches")],
    "saliency_batch_size": [("ssfl", "saliency_batch_size"),
                            ("snip_single", "saliency_batch_size"),
                            ("snip_oracle", "saliency_batch_size")],
    "update_interval": [("feddst", "update_interval"), ("prunefl", "update_interval")],
    "update_until": [("feddst", "update_until"), ("prunefl", "update_until")],
    "prune_fraction": [("feddst", "prune_fraction")],
    "prunefl_initial_rounds": [("prunefl", "initial_rounds")],
    "powerprop_beta": [("sparsyfed", "powerprop_beta")],
    "neighbors": [("dispfl", "neighbors")],
    "dispfl_anneal": [("dispfl", "anneal")],
}


#: ``run.seed`` feeds numpy's ``default_rng`` and ``torch.Generator.manual_seed``; both take
#: every seed in [0, 2**63) (torch refuses 2**64 and more, numpy any negative seed).
SEED_LIMIT = 2**63
#: ``run.name`` names the run folder (``<run.out_dir>/<run.name>-<time>``): no path separators,
#: no whitespace or control characters, not hidden.
RUN_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
#: Upper bounds of the counts: generous, they only stop a typo (a few extra zeros) from holding
#: the machine for days or exhausting its memory before the first round ends.
COUNT_LIMITS: dict[str, tuple[int, str]] = {
    "run.rounds": (1_000_000, ""),
    "federation.num_clients": (1_000_000, ""),
    "federation.clients_per_round": (10_000, "the replies of a round are held in memory "
                                             "together"),
    "federation.max_round_attempts": (100, "each attempt trains every sampled client again"),
    "train.local_epochs": (10_000, ""),
    "train.batch_size": (65_536, "a batch is held in memory at once"),
}
#: ``model.width`` scales every layer's channels; 16 already makes ResNet-18 ~250 times larger.
MAX_WIDTH = 16.0
#: ``train.lr``: larger steps diverge in the first rounds, whatever the model.
MAX_LR = 10.0
#: ``data.alpha``: a Dirichlet concentration above this is an IID split anyway.
MAX_ALPHA = 1e6


class ConfigError(ValueError):
    """A config that cannot run; the message names the key and the allowed values."""


@dataclass
class RunSection:
    name: str = "ssfl"  # names the run folder: letters, digits, - _ .
    seed: int = 0  # seeds the split, the initial model, the sampling and every client's RNG
    rounds: int = 50  # training rounds after the set-up phase
    eval_every: int = 1  # evaluate the global model every n rounds (and after the last); 0: never
    out_dir: str = "runs"  # where run folders are made
    # torch threads per run; 0: PyTorch's default (every core). One thread is the default
    # because it measured fastest or close to it wherever the machine is shared, and never
    # costs more CPU (docs/benchmarks.md, "Threads per run"); a quiet machine trains a
    # ResNet about 1.4x faster with every core.
    threads: int = 1
    # Where the model trains: "auto" (the machine's CUDA GPU if it has one, else the CPU),
    # "cpu", "cuda" or "cuda:N". Server state and payloads stay on the CPU either way.
    device: str = "auto"
    progress: bool = True  # a progress bar on a terminal; one log line per round otherwise
    # Save the server state every n rounds (and after the last) for `ssfl run --resume`; 0: never
    checkpoint_every: int = 10
    # Modules to import before the config is checked, comma-separated, so that methods, models
    # and data sets they register can be named (every process of a Flower run imports them)
    plugins: str = ""
    # Experiment loggers fed every round, comma-separated: "tensorboard", "wandb" (offline)
    # (ssfl/loggers.py; each needs its extra)
    loggers: str = ""


@dataclass
class DataSection:
    # digits (offline), cifar10, cifar100, tinyimagenet, or one registered by a plugin
    dataset: str = "digits"
    root: str = ""  # empty: $SSFL_DATA_DIR, else ~/.cache/ssfl/data
    download: bool = False  # fetch a missing data set (checksummed)
    # balanced_dirichlet (the paper), dirichlet, pathological, iid
    partition: str = "balanced_dirichlet"
    alpha: float = 0.3  # Dirichlet concentration (smaller: more skewed)
    classes_per_client: int = 2  # the pathological split's classes per client


@dataclass
class ModelSection:
    name: str = "small_cnn"  # small_cnn, resnet18 (GroupNorm, CIFAR stem), or a registered one
    width: float = 1.0  # channel width multiplier


@dataclass
class AlgorithmSection:
    name: str = "ssfl"  # the method (ssfl list shows them)
    density: float = 0.5  # kept fraction of the Conv/Linear weights, in (0, 1]
    # Each method's own settings, the tables [algorithm.<method>] (for example
    # [algorithm.feddst] update_interval = 10), validated by the method (its Settings class in
    # ssfl.algorithms); the resolved config holds the chosen method's table in full.
    options: dict[str, dict[str, Any]] = field(default_factory=dict)


@dataclass
class FederationSection:
    num_clients: int = 20  # clients in the federation (the data is split among them)
    clients_per_round: int = 5  # sampled per round, seeded by (seed, round)
    # Robust aggregation: clip each client's change to the global model to this L2 norm before
    # averaging (0: off). Invalid updates are always rejected, whatever this is.
    update_clip_norm: float = 0.0
    # ... or to this multiple of the round's median change norm (0: off; both: the smaller).
    # -1 (the default, "auto"): 2 with aggregator "auto", 0 with any other aggregator. A
    # resolved config (config.toml) holds the number that ran.
    adaptive_clip: float = AUTO
    # How the updates are combined (ssfl.algorithms.robust; DisPFL: over each client's
    # neighbours): "auto" (the default: each change clipped to adaptive_clip x the round's
    # median, then multi-Krum where the round has more than byzantine + 2 valid replies, else
    # the mean; the plain "mean" under [privacy], Flower's secure aggregation and methods that
    # do not declare robust aggregation), "mean" (FedAvg, the paper's), "median",
    # "trimmed_mean" (trim_fraction from each end), "krum", "multi_krum", "fltrust" (the
    # server trains on root_samples clean images of its own and trusts each change by its
    # cosine with the server's change; simulator only: the server holds data)
    aggregator: str = "auto"
    trim_fraction: float = 0.1  # trimmed mean: ceil(fraction x replies) dropped from each end
    byzantine: int = 1  # Krum, "auto": hostile replies per round tolerated (refused ones count)
    # fltrust: the size of the server's clean sample, drawn (seeded) from the whole training
    # set; 0 (the default): as many as the average client holds, so that the server's step,
    # whose length every client's change is scaled to, is as long as a typical client's
    root_samples: int = 0
    # A round needs at least this many valid client updates; with fewer it is retried (the
    # same clients, a new attempt) up to `max_round_attempts` times, then the run stops with
    # its last checkpoint intact. Never silently skipped.
    min_replies: int = 1
    max_round_attempts: int = 3  # attempts of a round before the run stops (resumable)
    # Fault injection for reliability studies (simulator only): each sampled client crashes
    # with this probability in each attempt of a round (seeded).
    failure_rate: float = 0.0


@dataclass
class TrainSection:
    lr: float = 0.05  # the local SGD learning rate of round 1
    lr_schedule: str = "exponential"  # exponential (lr * decay**(round-1)) or cosine over the run
    lr_decay: float = 0.998  # per round, for the exponential schedule (the paper's CIFAR-10)
    # The learning rate inside a round: "constant" (the round's lr for every step), or
    # "cosine_restarts" (the authors' CIFAR-100 recipe, torch's CosineAnnealingWarmRestarts
    # stepped once per local epoch and made afresh every round: from the round's lr down
    # towards local_lr_min over local_restart_epochs epochs, then again from the round's lr)
    local_lr_schedule: str = "constant"
    local_restart_epochs: int = 10  # epochs per cosine cycle (T_0)
    local_lr_min: float = 1e-5  # the cosine's floor (eta_min), below the round's lr
    momentum: float = 0.9  # local SGD momentum (reset every round)
    weight_decay: float = 5e-4  # local SGD weight decay
    local_epochs: int = 2  # passes over the client's data per round
    batch_size: int = 32  # local minibatch size
    clip_grad_norm: float = 10.0  # gradient-norm clipping in local SGD (0: off)
    # "auto": random crop (4-pixel padding) and horizontal flip for the photo data sets, none for
    # digits (a mirrored digit is another symbol, and 4 pixels are half an 8x8 image).
    augment: str = "auto"


@dataclass
class CommSection:
    value_dtype: str = "float32"  # values on the wire: float32 (the paper) or float16


#: the simulator's hostile-client behaviours (``ssfl.attacks``)
ATTACK_KINDS = ("none", "huge", "boost", "sign_flip", "zeros", "inflate_samples",
                "poison_scores", "replay")


@dataclass
class AttackSection:
    # Robustness studies (simulator only, ssfl/attacks.py): in every exchange the first
    # `hostile_per_round` clients asked tamper with their replies as `kind` says: "none",
    # "huge" (1e30), "boost" (change x boost), "sign_flip", "zeros", "inflate_samples",
    # "poison_scores" (the mask round), "replay" (a stale update re-sent).
    kind: str = "none"
    hostile_per_round: int = 1  # hostile clients in every exchange (fewer than clients_per_round)
    boost: float = 20.0  # the factor on a "boost" client's change


#: ``[privacy]``: where each client's change is clipped (``ssfl.privacy``, docs/privacy.md)
PRIVACY_MODES = ("none", "server", "client")
#: how epsilon is computed: RDP or PLD accounting of the Poisson-subsampled Gaussian mechanism
#: (sampling rate clients_per_round / num_clients, add/remove one client), or RDP of sampling a
#: fixed number of clients without replacement (replace one client: sensitivity 2 clip_norm)
PRIVACY_ACCOUNTANTS = ("rdp", "pld", "rdp_fixed_size")
#: where the noise comes from: seeded by (run.seed, round), reproducible, or the server's own
#: entropy, which nobody else can reproduce (every Flower client knows run.seed)
NOISE_SEEDS = ("run", "secret")


@dataclass
class PrivacySection:
    # Client-level differential privacy for the global-mask methods (docs/privacy.md): "none";
    # "server": the server clips each client's change to the global values to clip_norm (L2),
    # averages them unweighted (divided by federation.clients_per_round) and adds Gaussian
    # noise to every value; "client": each client clips its own change before sending, the
    # server verifies that and adds the noise.
    mode: str = "none"
    # z: the noise std on the mean is z * clip_norm / clients_per_round (0: clipping only)
    noise_multiplier: float = 1.0
    clip_norm: float = 1.0  # the L2 bound on each client's change to the global values
    # epsilon is reported at this delta (each round's metrics row, summary.json)
    delta: float = 1e-5
    # "rdp" or "pld": Poisson sampling at clients_per_round / num_clients; "rdp_fixed_size":
    # exactly clients_per_round sampled without replacement (replace-one adjacency)
    accountant: str = "rdp"
    # "run": the noise is drawn from (run.seed, round), so a run repeats bit for bit, but
    # whoever knows run.seed (every client of a Flower run) can subtract it: for experiments.
    # "secret": from the server's OS entropy, never written anywhere: for a deployment.
    noise_seed: str = "run"


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    federation: FederationSection = field(default_factory=FederationSection)
    train: TrainSection = field(default_factory=TrainSection)
    comm: CommSection = field(default_factory=CommSection)
    attack: AttackSection = field(default_factory=AttackSection)
    privacy: PrivacySection = field(default_factory=PrivacySection)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Sections of scalars; ``[algorithm]`` also holds the method tables by name."""
        out = dataclasses.asdict(self)
        options = out["algorithm"].pop("options")
        out["algorithm"].update({name: dict(table) for name, table in options.items()})
        return out


SECTIONS = {f.name: f.type for f in fields(Config)}


def _section_types() -> dict[str, type]:
    return get_type_hints(Config)


def coerce(key: str, value: Any, expected: type) -> Any:
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if expected is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    if not isinstance(value, expected):
        raise ConfigError(f"{key} must be of type {expected.__name__}, got {value!r}")
    return value


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Build a Config from nested dicts, rejecting unknown sections and keys by name."""
    section_types = _section_types()
    config = Config()
    for section_name, section_values in raw.items():
        if section_name not in section_types:
            raise ConfigError(
                f"unknown config section [{section_name}]"
                f"{did_you_mean(section_name, section_types)}; allowed: {sorted(section_types)}"
            )
        if not isinstance(section_values, Mapping):
            raise ConfigError(f"[{section_name}] must be a table of keys")
        section = getattr(config, section_name)
        hints = get_type_hints(type(section))
        if section_name == "algorithm":
            section_values = _algorithm_tables(config.algorithm, section_values)
        for key, value in section_values.items():
            dotted = f"{section_name}.{key}"
            if key not in hints or key == "options":
                known = [k for k in hints if k != "options"]
                raise ConfigError(f"unknown config key {dotted!r}{did_you_mean(key, known)}; "
                                  f"allowed in [{section_name}]: {sorted(known)}")
            setattr(section, key, coerce(dotted, value, hints[key]))
    return config


def _algorithm_tables(section: AlgorithmSection,
                      values: Mapping[str, Any]) -> dict[str, Any]:
    """Move ``[algorithm.<method>]`` tables (and the legacy flat keys) into
    ``section.options``; return the plain keys (name, density, unknown ones)."""
    plain: dict[str, Any] = {}
    legacy: list[tuple[str, str, Any]] = []
    for key, value in values.items():
        if isinstance(value, Mapping):
            if not key.isidentifier():
                raise ConfigError(f"[algorithm.{key}] is not a method name")
            section.options.setdefault(key, {}).update(value)
        elif key in LEGACY_ALGORITHM_KEYS:
            legacy.extend((method, new, value) for method, new in LEGACY_ALGORITHM_KEYS[key])
        else:
            plain[key] = value
    for method, key, value in legacy:  # an explicit table entry wins over the old spelling
        section.options.setdefault(method, {}).setdefault(key, value)
    return plain


def parse_override(text: str) -> tuple[str, str, Any]:
    """``section.key=value``; the value is read as a TOML value, else taken as a string."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    dotted, raw_value = text.split("=", 1)
    parts = dotted.strip().split(".")
    if not all(parts) or not (len(parts) == 2 or (len(parts) == 3 and parts[0] == "algorithm")):
        raise ConfigError(f"override key {dotted!r} must look like section.key (e.g. train.lr) "
                          f"or algorithm.<method>.key (e.g. algorithm.feddst.update_interval)")
    try:
        value = tomllib.loads(f"v = {raw_value.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw_value.strip()
    return parts[0], ".".join(parts[1:]), value


def load_config(path: str | Path | None = None, overrides: Sequence[str] = (), *,
                secure_aggregation: bool = False) -> Config:
    """The validated config of a TOML file (None: the defaults) with ``section.key=value``
    overrides. ``secure_aggregation``: the run sums its updates under Flower's SecAgg+, so the
    server sees no single update (``federation.adaptive_clip``'s "auto" resolves to 0)."""
    raw: dict[str, dict[str, Any]] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            raw = tomllib.loads(path.read_bytes().decode("utf-8"))  # TOML is UTF-8 by definition
        except UnicodeDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not UTF-8 text (TOML must be): "
                              f"{exc}") from exc
        except OSError as exc:
            raise ConfigError(f"config file {str(path)!r} cannot be read: {exc}") from exc
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {str(path)!r} is not valid TOML: {exc}") from exc
    return _with_overrides(raw, overrides, secure_aggregation)


def apply_overrides(config: Config, overrides: Sequence[str]) -> Config:
    """``config`` with ``section.key=value`` overrides, validated (a new Config)."""
    return _with_overrides(tomllib.loads(to_toml(config)), overrides)


def _with_overrides(raw: dict[str, Any], overrides: Sequence[str],
                    secure_aggregation: bool = False) -> Config:
    for text in overrides:
        section, key, value = parse_override(text)
        if "." in key:  # algorithm.<method>.<key>
            method, key = key.split(".", 1)
            table = raw.setdefault(section, {}).setdefault(method, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section}.{method} is a key, not a table")
            table[key] = value
        else:
            raw.setdefault(section, {})[key] = value
    config = from_dict(raw)
    validate(config, secure_aggregation=secure_aggregation)
    return config


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest known word, or nothing when none is close."""
    close = difflib.get_close_matches(str(word), [str(k) for k in known], n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _choice(key: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ConfigError(f"{key} = {value!r} is not allowed{did_you_mean(value, allowed)}; "
                          f"choose one of {list(allowed)}")


def _positive(key: str, value: float, *, allow_zero: bool = False) -> None:
    ok = value >= 0 if allow_zero else value > 0
    if not ok or not math.isfinite(value):
        raise ConfigError(f"{key} must be {'>= 0' if allow_zero else '> 0'} and finite, got "
                          f"{value}")


def _in_range(key: str, value: float, low: float, high: float, *, low_open: bool = False,
              high_open: bool = False, why: str = "") -> None:
    """``value`` finite and within ``[low, high]`` (``(`` / ``)`` where open); NaN fails."""
    above = value > low if low_open else value >= low
    below = value < high if high_open else value <= high
    if not (above and below and math.isfinite(value)):
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        raise ConfigError(f"{key} must be in {interval}{why}, got {value!r}")


def check_device(key: str, value: str) -> None:
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", value):
        raise ConfigError(f"{key} must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {value!r}")


def validate(config: Config, *, secure_aggregation: bool = False) -> None:
    """Every check that needs no data (the data-set checks run in ``check_against_data``):
    first the ones this module can make alone, then the names and the method's own settings,
    which need the registries (``check_registered``)."""
    _choice("train.lr_schedule", config.train.lr_schedule, LR_SCHEDULES)
    _choice("train.local_lr_schedule", config.train.local_lr_schedule, LOCAL_LR_SCHEDULES)
    _choice("train.augment", config.train.augment, AUGMENTATIONS)
    _choice("comm.value_dtype", config.comm.value_dtype, VALUE_DTYPE_NAMES)
    density = config.algorithm.density
    if not (0.0 < density <= 1.0) or not math.isfinite(density):
        raise ConfigError(f"algorithm.density must be in (0, 1], got {density}")
    _positive("data.alpha", config.data.alpha)
    _in_range("data.alpha", config.data.alpha, 0.0, MAX_ALPHA, low_open=True,
              why=" (larger is an IID split already)")
    _positive("model.width", config.model.width)
    _in_range("model.width", config.model.width, 0.0, MAX_WIDTH, low_open=True,
              why=" (it multiplies every layer's channels; 1.0 is the standard model)")
    _positive("train.lr", config.train.lr)
    _in_range("train.lr", config.train.lr, 0.0, MAX_LR, low_open=True,
              why=" (larger steps diverge in the first rounds)")
    _in_range("train.lr_decay", config.train.lr_decay, 0.0, 1.0, low_open=True,
              why=" (the learning rate's factor per round; 1: constant)")
    if config.train.local_lr_schedule == "cosine_restarts":
        _in_range("train.local_lr_min", config.train.local_lr_min, 0.0, config.train.lr,
                  high_open=True, why=" (the local cosine's floor, below train.lr)")
    _in_range("train.momentum", config.train.momentum, 0.0, 1.0, high_open=True,
              why=" (momentum >= 1 makes SGD diverge)")
    _in_range("train.weight_decay", config.train.weight_decay, 0.0, 1.0, high_open=True,
              why=" (decay >= 1 wipes the weights)")
    _positive("train.clip_grad_norm", config.train.clip_grad_norm, allow_zero=True)
    _positive("federation.update_clip_norm", config.federation.update_clip_norm,
              allow_zero=True)
    _check_run_name(config.run.name)
    if not 0 <= config.run.seed < SEED_LIMIT:
        raise ConfigError(f"run.seed must be in [0, 2**63) (the seeds numpy's and torch's "
                          f"random generators take), got {config.run.seed}")
    if config.run.eval_every < 0:
        raise ConfigError(f"run.eval_every must be >= 0 (0: no evaluation), got "
                          f"{config.run.eval_every}")
    for key, value in [
        ("run.rounds", config.run.rounds),
        ("federation.num_clients", config.federation.num_clients),
        ("federation.clients_per_round", config.federation.clients_per_round),
        ("train.local_epochs", config.train.local_epochs),
        ("train.local_restart_epochs", config.train.local_restart_epochs),
        ("train.batch_size", config.train.batch_size),
        ("data.classes_per_client", config.data.classes_per_client),
        ("federation.min_replies", config.federation.min_replies),
        ("federation.max_round_attempts", config.federation.max_round_attempts),
    ]:
        if value < 1:
            raise ConfigError(f"{key} must be at least 1, got {value}")
        limit, why = COUNT_LIMITS.get(key, (None, ""))
        if limit is not None and value > limit:
            raise ConfigError(f"{key} must be at most {limit:_}, got {value:_} (a generous "
                              f"limit that keeps a typo from running for days"
                              f"{'; ' + why if why else ''})")
    if not 0 <= config.federation.root_samples <= 1_000_000:
        raise ConfigError(f"federation.root_samples must be in [0, 1_000_000] (0: as many as "
                          f"the average client holds), got {config.federation.root_samples}")
    if config.run.checkpoint_every < 0:
        raise ConfigError("run.checkpoint_every must be >= 0 (0: no checkpoints)")
    if config.run.threads < 0:
        raise ConfigError("run.threads must be >= 0 (0: PyTorch's default)")
    cores = os.cpu_count() or 1
    if config.run.threads > cores:
        raise ConfigError(f"run.threads must be at most the {cores} CPU cores of this machine "
                          f"(os.cpu_count()), got {config.run.threads}; 0 leaves PyTorch's "
                          f"default")
    check_device("run.device", config.run.device)
    if not 0.0 <= config.federation.failure_rate < 1.0:
        raise ConfigError(f"federation.failure_rate must be in [0, 1), got "
                          f"{config.federation.failure_rate}")
    if config.federation.min_replies > config.federation.clients_per_round:
        raise ConfigError(
            f"federation.min_replies ({config.federation.min_replies}) exceeds "
            f"federation.clients_per_round ({config.federation.clients_per_round})")
    if config.federation.clients_per_round > config.federation.num_clients:
        raise ConfigError(
            f"federation.clients_per_round ({config.federation.clients_per_round}) exceeds "
            f"federation.num_clients ({config.federation.num_clients})"
        )
    check_attack(config)
    check_privacy_settings(config)
    if config.run.loggers.strip():
        from ssfl.loggers import check_loggers

        check_loggers(config.run.loggers)
    check_registered(config, secure_aggregation=secure_aggregation)


def check_attack(config: Config) -> None:
    attack = config.attack
    _choice("attack.kind", attack.kind, ATTACK_KINDS)
    if attack.kind == "none":
        return
    if not 1 <= attack.hostile_per_round < config.federation.clients_per_round:
        raise ConfigError(
            f"attack.hostile_per_round must be at least 1 and below "
            f"federation.clients_per_round ({config.federation.clients_per_round}), so that "
            f"some clients are honest; got {attack.hostile_per_round}")
    _in_range("attack.boost", attack.boost, 0.0, 1e6, low_open=True,
              why=" (the factor on a hostile client's change)")


def check_privacy_settings(config: Config) -> None:
    """``[privacy]``'s own values (which methods and rules it combines with:
    ``check_privacy_applies``)."""
    privacy = config.privacy
    _choice("privacy.mode", privacy.mode, PRIVACY_MODES)
    _choice("privacy.accountant", privacy.accountant, PRIVACY_ACCOUNTANTS)
    _choice("privacy.noise_seed", privacy.noise_seed, NOISE_SEEDS)
    _positive("privacy.noise_multiplier", privacy.noise_multiplier, allow_zero=True)
    _positive("privacy.clip_norm", privacy.clip_norm)
    _in_range("privacy.delta", privacy.delta, 0.0, 1.0, low_open=True, high_open=True,
              why=" (the delta of (epsilon, delta)-DP; choose it well below 1 / num_clients)")


def _check_run_name(name: str) -> None:
    if not RUN_NAME.fullmatch(name):
        raise ConfigError(
            f"run.name = {name!r} is not allowed: it names the run folder, so use 1 to 100 "
            f"letters, digits, '-', '_' and '.', not starting with '.'")


def check_writable(config: Config, run_dir: str | Path | None = None,
                   key: str = "run.out_dir") -> None:
    """That the run can write its folder, checked before any work: ``run_dir`` where given
    (``--out``, ``--resume``; ``key`` names it), else ``run.out_dir``, in which the run folder
    is made. Leaves nothing behind: an existing folder is probed with a temporary file, a
    missing one through its nearest existing parent, which must let it be created."""
    folder = Path(run_dir if run_dir is not None else config.run.out_dir)
    shown = f"{key} = {str(folder)!r}"
    if "\0" in str(folder):  # Path.exists() is False for it, and every later use fails
        raise ConfigError(f"{shown} cannot be written: a path cannot hold a NUL character")
    try:
        if folder.exists():
            if not folder.is_dir():
                raise ConfigError(f"{shown} is not a folder")
            with tempfile.TemporaryFile(dir=folder):
                pass
            return
        parent = folder.parent
        while not parent.exists():
            parent = parent.parent
        if not parent.is_dir():
            raise ConfigError(f"{shown} cannot be created: {str(parent)!r} is not a folder")
        if not os.access(parent, os.W_OK | os.X_OK):
            raise ConfigError(f"{shown} cannot be created: {str(parent)!r} is not writable; "
                              f"choose a folder you can write to")
    except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
        if isinstance(exc, ConfigError):
            raise
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else exc
        raise ConfigError(f"{shown} cannot be written: {reason}; choose a folder you can "
                          f"write to") from exc


def check_registered(config: Config, *, secure_aggregation: bool = False) -> None:
    """The names (data set, partition, model, method) against their registries, and the
    method's own table through its ``Settings``; fills the chosen method's table with its
    defaults so that the resolved config says every value it ran with. Imports the
    registries (and so torch) when called, never when this module is imported."""
    from ssfl import algorithms
    from ssfl.data.datasets import DATASETS
    from ssfl.data.partition import PARTITIONS
    from ssfl.models import MODELS

    algorithms.load_plugins(p for p in config.run.plugins.split(",") if p.strip())
    _choice("data.dataset", config.data.dataset, sorted(DATASETS))
    _choice("data.partition", config.data.partition, PARTITIONS)
    _choice("model.name", config.model.name, sorted(MODELS))
    _choice("algorithm.name", config.algorithm.name, algorithms.names())
    known = set(algorithms.names())
    for method, table in config.algorithm.options.items():
        if method not in known:
            raise ConfigError(f"[algorithm.{method}] names no method{did_you_mean(method, known)}"
                              f"; known: {sorted(known)}")
        algorithms.build_settings(algorithms.get(method).Settings, table,
                                  f"algorithm.{method}")
    cls = algorithms.get(config.algorithm.name)
    settings = algorithms.settings_of(config)
    resolve_robust_defaults(config, cls.robust_aggregation,
                            secure_aggregation=secure_aggregation)
    check_robust_aggregation(config, cls.robust_aggregation, cls.trusted_reference)
    if config.privacy.mode != "none":
        check_privacy_applies(config, cls)
    if config.attack.kind != "none":
        check_attack_applies(config, cls)
    cls.check_config(config, settings)
    config.algorithm.options = {config.algorithm.name: dataclasses.asdict(settings)}


def rounds_dependence(config: Config) -> list[str]:
    """What in ``config`` reads ``run.rounds`` in rounds already played, in words: a run of
    such a config cannot be continued to more rounds, since a longer run would have played
    its first rounds differently. Empty: continuing it is the same as having asked for more
    rounds from the start."""
    from ssfl import algorithms

    reasons = []
    if config.train.lr_schedule == "cosine":
        reasons.append("train.lr_schedule = 'cosine' spreads the learning rate over run.rounds")
    cls = algorithms.get(config.algorithm.name)
    why = cls.rounds_dependence(config, algorithms.settings_of(config))
    if why:
        reasons.append(f"{config.algorithm.name}: {why}")
    return reasons


def with_more_rounds(config: Config, rounds: int) -> Config:
    """``config`` asking for ``rounds`` rounds in all: how a finished (or interrupted) run goes
    on past its planned end (``ssfl run --resume RUN_DIR --rounds N``). Refused, with the
    reason, where that would not be the run a ``rounds``-round config plays."""
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ConfigError(f"--rounds must be a whole number of rounds, got {rounds!r}")
    if rounds < config.run.rounds:
        raise ConfigError(f"--rounds {rounds} is fewer than the run's run.rounds = "
                          f"{config.run.rounds}: a run is continued, never shortened (its "
                          f"metrics.jsonl has every round's figures)")
    reasons = rounds_dependence(config)
    if reasons and rounds != config.run.rounds:
        raise ConfigError(f"this run cannot be continued to {rounds} rounds: "
                          + "; ".join(reasons) + f"; the rounds it played would differ from "
                          f"those of a {rounds}-round run, so start a new run with "
                          f"run.rounds={rounds}")
    return dataclasses.replace(config, run=dataclasses.replace(config.run, rounds=rounds))


def check_attack_applies(config: Config, cls: Any) -> None:
    """The simulated attacks tamper with value vectors over the mask a client received, and
    ``poison_scores`` with the mask round's saliency scores: methods without them are refused."""
    from ssfl.algorithms.ssfl import FixedMaskFedAvg, SaliencyMask

    needed = SaliencyMask if config.attack.kind == "poison_scores" else FixedMaskFedAvg
    if not issubclass(cls, needed):
        what = ("a saliency mask round (ssfl, snip_single)" if needed is SaliencyMask
                else "one global mask (ssfl, fedavg, the SNIP and random-mask baselines)")
        raise ConfigError(f"attack.kind = {config.attack.kind!r} needs a method with {what}, "
                          f"not {config.algorithm.name!r}")


def check_privacy_applies(config: Config, cls: Any) -> None:
    """Differential privacy needs one fixed sensitivity per round: every client's reply a
    vector over the same coordinates (the global-mask methods), clipped to one norm and
    averaged by the plain mean. Anything else is refused, saying why."""
    from ssfl.algorithms.ssfl import FixedMaskFedAvg

    mode = f"privacy.mode = {config.privacy.mode!r}"
    if not issubclass(cls, FixedMaskFedAvg):
        raise ConfigError(
            f"{mode} needs a method with one global mask fixed before training (ssfl, fedavg, "
            f"random, random_erk, snip_single, snip_oracle), not {config.algorithm.name!r}: "
            f"where each client sends coordinates of its own choosing (its own mask, its own "
            f"top-k) or the mask moves during training, which coordinates a client sends "
            f"depends on its data and is not noised, and the change one client can make to "
            f"the aggregate has no fixed bound to calibrate the noise to")
    fed = config.federation
    if fed.aggregator != "mean":
        raise ConfigError(
            f"{mode} needs federation.aggregator = 'mean', not {fed.aggregator!r}: the noise "
            f"is calibrated to the most one clipped client can move the plain mean (clip_norm "
            f"/ clients_per_round); a median, trimmed mean or Krum selection depends on all "
            f"replies at once and has no such bound")
    if fed.update_clip_norm > 0 or fed.adaptive_clip > 0:
        raise ConfigError(
            f"{mode} clips every client's change to privacy.clip_norm itself: set "
            f"federation.update_clip_norm = 0 and federation.adaptive_clip = 0 (an adaptive "
            f"bound from the round's median norm would depend on every client's data)")


def resolve_robust_defaults(config: Config, supported: bool, *,
                            secure_aggregation: bool = False) -> None:
    """The robust defaults made concrete. ``federation.aggregator = "auto"`` stays "auto"
    (``ssfl.algorithms.robust``: multi-Krum where a round has enough replies, else the mean)
    where the server combines each update in the clear, and becomes the plain ``mean`` where it
    cannot or need not: Flower's secure aggregation shows it only the sum; ``[privacy]`` clips
    to its own fixed norm and needs the mean's fixed sensitivity; a method that does not
    declare robust aggregation averages its own way. ``federation.adaptive_clip = -1``
    ("auto") then becomes ``AUTO_ADAPTIVE_CLIP`` under "auto" and 0 under any other rule, so
    ``aggregator = "mean"`` alone is the paper's FedAvg."""
    fed = config.federation
    off = secure_aggregation or config.privacy.mode != "none" or not supported
    if fed.aggregator == "auto" and off:
        fed.aggregator = "mean"
    if fed.adaptive_clip == AUTO:
        fed.adaptive_clip = AUTO_ADAPTIVE_CLIP if fed.aggregator == "auto" else 0.0


def check_robust_aggregation(config: Config, supported: bool, trusted: bool = False) -> None:
    """``federation.aggregator`` and its parameters (``ssfl.algorithms.robust``); ``trusted``:
    the method can take the server's own update (``fltrust``)."""
    fed = config.federation
    _choice("federation.aggregator", fed.aggregator, AGGREGATOR_CHOICES)
    if fed.aggregator == "fltrust" and not trusted:
        raise ConfigError(
            f"federation.aggregator = 'fltrust' needs a method whose clients all train one "
            f"shared vector (dense FedAvg, SSFL and the other fixed-mask methods); "
            f"{config.algorithm.name!r} is not one: choose another rule")
    if fed.adaptive_clip != AUTO:
        _positive("federation.adaptive_clip", fed.adaptive_clip, allow_zero=True)
    if not 0.0 <= fed.trim_fraction < 0.5:
        raise ConfigError(f"federation.trim_fraction must be in [0, 0.5) (trimmed from each "
                          f"end), got {fed.trim_fraction}")
    if fed.byzantine < 0:
        raise ConfigError(f"federation.byzantine must be >= 0, got {fed.byzantine}")
    if fed.aggregator in ("krum", "multi_krum") and fed.min_replies <= fed.byzantine + 2:
        raise ConfigError(
            f"federation.aggregator = {fed.aggregator!r} with federation.byzantine = "
            f"{fed.byzantine} needs more than {fed.byzantine + 2} valid replies per round: set "
            f"federation.min_replies to at least {fed.byzantine + 3}")
    if (fed.aggregator != "mean" or fed.adaptive_clip > 0 or fed.update_clip_norm > 0) \
            and not supported:
        raise ConfigError(
            f"{config.algorithm.name!r} does not declare robust aggregation (its "
            f"robust_aggregation flag): keep federation.aggregator = 'mean' and "
            f"federation.update_clip_norm = federation.adaptive_clip = 0")


def check_against_data(config: Config, num_train: int, num_classes: int) -> None:
    """Checks that need the data set's size; run after loading, before any training."""
    if config.federation.num_clients > num_train:
        raise ConfigError(
            f"federation.num_clients ({config.federation.num_clients}) exceeds the "
            f"{num_train} training samples of {config.data.dataset!r}"
        )
    if config.data.partition == "pathological" and config.data.classes_per_client > num_classes:
        raise ConfigError(
            f"data.classes_per_client ({config.data.classes_per_client}) exceeds the "
            f"{num_classes} classes of {config.data.dataset!r}"
        )


def augmentation_enabled(config: Config) -> bool:
    if config.train.augment == "auto":
        return config.data.dataset != "digits"
    return config.train.augment == "crop_flip"


def to_toml(config: Config) -> str:
    """Write the resolved config back as TOML (flat tables of scalars only)."""
    tables: dict[str, dict[str, Any]] = {}
    for section, values in config.to_dict().items():
        tables[section] = {k: v for k, v in values.items() if not isinstance(v, dict)}
        tables.update({f"{section}.{k}": v for k, v in values.items() if isinstance(v, dict)})
    return toml_tables(tables)


def toml_tables(tables: Mapping[str, Mapping[str, Any]]) -> str:
    """TOML text of tables of scalars (``{"train": {"lr": 0.1}}`` -> ``[train] lr = 0.1``)."""
    lines: list[str] = []
    for name, values in tables.items():
        lines.append(f"[{name}]")
        lines.extend(f"{key} = {toml_value(value)}" for key, value in values.items())
        lines.append("")
    return "\n".join(lines)


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)  # a float's repr always reads back as a float (1.0, 1e-05, inf)
    # JSON string escapes are valid TOML basic-string escapes (a newline stays on one line).
    return json.dumps(str(value))
