"""Federated methods by name: the registry ``algorithm.name`` is looked up in.

Every method is an :class:`~ssfl.algorithms.base.Algorithm` (server and client apart, see
``base.py``). The built-in ones register themselves below; user code adds one the same way::

    from ssfl.algorithms import register
    from ssfl.algorithms.ssfl import FixedMaskFedAvg

    @register("my_method", "FedAvg in a mask of my own")
    class MyMethod(FixedMaskFedAvg):
        ...

and then runs it with ``algorithm.name = "my_method"`` (settings in ``[algorithm.my_method]``,
read into ``MyMethod.Settings``), in the simulator and on Flower alike: the Flower apps import
the module that registers it when it is named in ``algorithm.plugins`` (or set the environment
variable ``SSFL_PLUGINS``), so every process knows the method.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from ssfl.algorithms.base import Algorithm, Setup, build_settings

A = TypeVar("A", bound=type[Algorithm[Any]])

_REGISTRY: dict[str, type[Algorithm[Any]]] = {}


def register(name: str, description: str, *, replace: bool = False) -> Callable[[A], A]:
    """Class decorator: make ``cls`` the method called ``name`` (a second registration of a
    name is an error unless ``replace``)."""

    def add(cls: A) -> A:
        if not name.isidentifier():
            raise ValueError(f"method name {name!r} must be a Python identifier")
        if name in _REGISTRY and not replace and _REGISTRY[name] is not cls:
            raise ValueError(f"a method named {name!r} is already registered "
                             f"({_REGISTRY[name].__qualname__}); pass replace=True to replace it")
        check_interface(cls)
        cls.name, cls.description = name, description
        _REGISTRY[name] = cls
        return cls

    return add


def check_interface(cls: type[Algorithm[Any]]) -> None:
    """A method written against an older ``Algorithm`` is refused at registration, with the
    change to make, instead of failing with a bare ``TypeError`` in its first round."""
    parameters = inspect.signature(cls.aggregate).parameters
    if "refused" not in parameters and not any(
            p.kind is inspect.Parameter.VAR_POSITIONAL for p in parameters.values()):
        raise TypeError(
            f"{cls.__qualname__}.aggregate must take the round's refused clients: define it as "
            f"aggregate(self, state, round, replies, sampled, refused=()) (refused: the "
            f"sampled clients none of whose replies passed screening; ignore it if your rule "
            f"has no use for it)")


def names() -> list[str]:
    return sorted(_REGISTRY)


def get(name: str) -> type[Algorithm[Any]]:
    """The method called ``name``; ``KeyError`` naming the known ones."""
    if name not in _REGISTRY:
        raise KeyError(f"no method named {name!r}; known: {names()}")
    return _REGISTRY[name]


def descriptions() -> dict[str, str]:
    return {n: _REGISTRY[n].description for n in names()}


def load_plugins(modules: Iterable[str]) -> None:
    """Import user modules that register methods (``algorithm.plugins``, ``$SSFL_PLUGINS``)."""
    from ssfl.config import ConfigError

    for module in [*modules, *filter(None, os.environ.get("SSFL_PLUGINS", "").split(","))]:
        try:
            importlib.import_module(module.strip())
        except ImportError as exc:
            raise ConfigError(f"run.plugins (or $SSFL_PLUGINS) names module {module.strip()!r}, "
                              f"which cannot be imported: {exc}") from None


def settings_of(config: Any) -> Any:
    """The chosen method's settings from its table ``[algorithm.<name>]`` (defaults filled)."""
    name = config.algorithm.name
    return build_settings(get(name).Settings, config.algorithm.options.get(name, {}),
                          f"algorithm.{name}")


def build(config: Any, setup: Setup) -> Algorithm[Any]:
    """The configured method, ready to run."""
    cls = get(config.algorithm.name)
    return cls(setup, settings_of(config))


def _register_builtins() -> None:
    from ssfl.algorithms import (  # noqa: F401 - imported to register
        clientwise,
        dispfl,
        feddst,
        prunefl,
        sparsyfed,
        ssfl,
        static,
    )

    register("ssfl", "SSFL: mask from federated SNIP saliency scores of all clients, "
             "global top-k")(ssfl.SSFL)
    register("fedavg", "dense FedAvg (density 1, no mask round)")(static.DenseFedAvg)
    register("random", "FedAvg inside a random global mask of the same density (static)")(
        static.RandomMask)
    register("random_erk", "FedAvg inside a random mask with ERK layer densities (static)")(
        static.RandomERKMask)
    register("snip_oracle", "SNIP on the pooled data of all clients (not federated: a "
             "mask-quality upper bound), global top-k")(static.SNIPOracle)
    register("snip_single", "SNIP on a single client's data (client 0), global top-k")(
        static.SNIPSingle)
    register("random_clientwise", "FedAvg where each client trains in its own random mask "
             "(static); each weight is averaged over the clients holding it")(
        clientwise.ClientwiseRandomMasks)
    register("feddst", "FedDST: ERK magnitude mask, clients drop/regrow every R rounds "
             "(dynamic)")(feddst.FedDST)
    register("prunefl", "PruneFL: pruned on client 0, top-k by squared gradients every R "
             "rounds (dynamic)")(prunefl.PruneFL)
    register("sparsyfed", "SparsyFed: Powerprop local training, clients upload their top-k "
             "weights, FedAvg (dynamic)")(sparsyfed.SparsyFed)
    register("dispfl", "DisPFL: personalised ERK masks, decentralised neighbour averaging, "
             "per-client drop/regrow (personal models)")(dispfl.DisPFL)


_register_builtins()

__all__ = ["Algorithm", "Setup", "build", "descriptions", "get", "load_plugins", "names",
           "register", "settings_of"]
