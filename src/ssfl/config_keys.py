"""Every config key with its default and its help, read from the config's own dataclasses.

The help of a key is the comment written beside or above its field in ``ssfl.config`` (or in a
method's ``Settings`` class), so ``ssfl config --keys`` can never drift from the code.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
from typing import Any

from ssfl.config import Config

_FIELD = re.compile(r"^\s*(\w+)\s*:\s*[^=#]+(?:=\s*[^#]*)?(?:#\s?(.*))?$")


def field_help(cls: type) -> dict[str, str]:
    """Per field of the dataclass ``cls``: its trailing comment, after the comment lines right
    above it (comments end at a blank line or another field)."""
    try:
        lines = inspect.getsource(cls).splitlines()
    except (OSError, TypeError):  # defined where no source is at hand
        return {}
    names = {f.name for f in dataclasses.fields(cls)}
    helps: dict[str, str] = {}
    above: list[str] = []
    for line in lines[1:]:
        stripped = line.strip()
        if stripped.startswith("#"):
            text = stripped.lstrip("#").strip()
            if not text.startswith(":"):  # sphinx-style "#:" comments read the same
                above.append(text)
            else:
                above.append(text[1:].strip())
            continue
        match = _FIELD.match(line)
        if match and match.group(1) in names:
            parts = [*above, (match.group(2) or "").strip()]
            helps[match.group(1)] = " ".join(p for p in parts if p)
        above = []
    return helps


def all_keys(config: Config | None = None) -> list[tuple[str, Any, str]]:
    """``(dotted key, default, help)`` for every key of every section, and for every registered
    method's own table (``algorithm.<method>.<key>``); values from ``config`` where given."""
    from ssfl import algorithms

    config = config or Config()
    rows: list[tuple[str, Any, str]] = []
    for section in dataclasses.fields(Config):
        value = getattr(config, section.name)
        helps = field_help(type(value))
        for f in dataclasses.fields(value):
            if f.name != "options":
                rows.append((f"{section.name}.{f.name}", getattr(value, f.name),
                             helps.get(f.name, "")))
    for method in algorithms.names():
        settings = algorithms.get(method).Settings
        helps = field_help(settings)
        for f in dataclasses.fields(settings):
            rows.append((f"algorithm.{method}.{f.name}", f.default, helps.get(f.name, "")))
    return rows
