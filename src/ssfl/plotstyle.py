"""One look for every ssfl figure: a fixed colour and marker per method, readable axes.

`ssfl report` and the benchmark figures (benchmarks/comparison.py) both draw with this module,
so a method has the same colour and marker in every figure, whichever methods a figure shows.

The 11 built-in methods get a fixed entry in `METHOD_STYLES`: colours from Paul Tol's
colour-blind-safe "muted" scheme and the Okabe-Ito palette (dense FedAvg black, SSFL vermillion,
the random-mask floor grey), every pair at least 20 CIELAB units apart, and a marker each, so
two methods never look alike even in grey print.  A method registered by a plugin gets a colour
and marker derived from a hash of its name: the same in every figure and every process (no
dependence on which other methods are plotted or on Python's per-process string hashing), drawn
from colours the table does not use.

Nothing here imports torch or pyplot: figures are built on `matplotlib.figure.Figure`.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from functools import lru_cache
from types import MappingProxyType
from typing import TYPE_CHECKING, Mapping

if TYPE_CHECKING:
    from matplotlib.axis import Axis

__all__ = [
    "MethodStyle",
    "METHOD_STYLES",
    "FALLBACK_COLORS",
    "method_style",
    "dataset_label",
    "model_label",
    "density_label",
    "plain_number",
    "integer_ticks",
    "log_ticks",
]


@dataclass(frozen=True)
class MethodStyle:
    """How a method is drawn: ``color`` (hex), ``marker``, ``linestyle`` and its legend name."""

    color: str
    marker: str
    linestyle: str
    label: str


#: The built-in methods. Dense FedAvg is the black dashed reference; the SNIP oracle (not a
#: federated method) is dotted; every other method a solid line.
METHOD_STYLES: Mapping[str, MethodStyle] = MappingProxyType({
    "fedavg": MethodStyle("#000000", "s", "--", "FedAvg"),
    "ssfl": MethodStyle("#D55E00", "o", "-", "SSFL"),
    "snip_oracle": MethodStyle("#882255", "*", ":", "SNIP oracle"),
    "snip_single": MethodStyle("#88CCEE", "v", "-", "SNIP single"),
    "random": MethodStyle("#888888", "X", "-", "random"),
    "random_erk": MethodStyle("#DDCC77", "P", "-", "random ERK"),
    "random_clientwise": MethodStyle("#999933", "d", "-", "random per client"),
    "feddst": MethodStyle("#117733", "^", "-", "FedDST"),
    "prunefl": MethodStyle("#44AA99", "<", "-", "PruneFL"),
    "dispfl": MethodStyle("#AA4499", ">", "-", "DisPFL"),
    "sparsyfed": MethodStyle("#0072B2", "D", "-", "SparsyFed"),
})

#: Colours for methods outside the table (plugins), none of them used by the table.
FALLBACK_COLORS = ("#332288", "#CC6677", "#E69F00", "#56B4E9", "#009E73", "#661100",
                   "#6699CC", "#AA4466")
_FALLBACK_MARKERS = ("o", "s", "^", "v", "D", "p", "h", "8")


@lru_cache(maxsize=None)
def method_style(method: str | None) -> MethodStyle:
    """The style of ``method``: its table entry, else one derived from its name alone.

    Cached, so every figure of a process gets the very same object for a method.
    """
    name = method or "unknown"
    if name in METHOD_STYLES:
        return METHOD_STYLES[name]
    digest = hashlib.blake2b(name.encode("utf-8"), digest_size=8).digest()
    color = FALLBACK_COLORS[digest[0] % len(FALLBACK_COLORS)]
    marker = _FALLBACK_MARKERS[digest[1] % len(_FALLBACK_MARKERS)]
    return MethodStyle(color, marker, "-", name)


_DATASETS = {"cifar10": "CIFAR-10", "cifar100": "CIFAR-100", "tinyimagenet": "Tiny ImageNet",
             "digits": "digits (8x8)"}
_MODELS = {"small_cnn": "small CNN", "resnet18": "ResNet-18"}


def dataset_label(name: str) -> str:
    """``cifar10`` -> ``CIFAR-10``; an unknown (plugin) data set keeps its registered name."""
    return _DATASETS.get(name, name)


def model_label(name: str) -> str:
    """``resnet18`` -> ``ResNet-18``; an unknown (plugin) model keeps its registered name."""
    return _MODELS.get(name, name)


def density_label(density: float | None) -> str:
    """``d=0.1``; ``dense`` at density 1; ``d=?`` when unknown."""
    if density is None:
        return "d=?"
    return "dense" if density >= 1.0 else f"d={density:.3g}"


def plain_number(value: float, _pos: object = None) -> str:
    """A tick label as a plain number: ``0.05``, ``20``, ``1,500``, never ``5x10^-2``."""
    if value == 0 or not math.isfinite(value):
        return "0" if value == 0 else ""
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def integer_ticks(axis: "Axis") -> None:
    """Whole-number ticks (rounds) in steps of 1, 2 or 5 times a power of ten, no decimals."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True, steps=[1, 2, 5, 10], min_n_ticks=1))
    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:.0f}"))


def log_ticks(axis: "Axis", lo: float, hi: float, ticks: "list[float] | None" = None) -> None:
    """Labels for an axis already set to log scale (``ax.set_xscale("log")`` first: setting the
    scale resets the locators): one set of plain-number labels that cannot overlap.

    Major ticks are ``ticks`` when given (e.g. the densities of a sweep), else 1-2-5 steps per
    decade (only the powers of ten over more than three decades, every digit below one decade),
    chosen from the data range ``lo`` .. ``hi``; minor ticks are marked but never labelled, which
    is what makes matplotlib's default print a second, overlapping set of labels.
    """
    from matplotlib.ticker import FixedLocator, FuncFormatter, LogLocator, NullFormatter

    if ticks is not None:
        axis.set_major_locator(FixedLocator(sorted(ticks)))
    else:
        decades = math.log10(hi / lo) if lo > 0 and hi > lo else 0.0
        subs: tuple[float, ...] = ((1.0,) if decades > 3 else (1.0, 2.0, 5.0) if decades > 0.8
                                   else tuple(float(s) for s in range(1, 10)))
        axis.set_major_locator(LogLocator(base=10, subs=subs, numticks=15))
    axis.set_major_formatter(FuncFormatter(plain_number))
    axis.set_minor_locator(LogLocator(base=10, subs=tuple(range(2, 10)), numticks=15))
    axis.set_minor_formatter(NullFormatter())
