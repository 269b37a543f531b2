"""Every key of a config, read from its dataclasses: for `unroll train --keys` and for the hint an unknown
key gets (`steps` → did you mean train.steps?). Generic over dataclasses, so the schema itself
(train/config.py) stays the one place keys are declared."""

from __future__ import annotations

import dataclasses
import difflib
import typing
from typing import NamedTuple


class Key(NamedTuple):
    name: str  # dotted, e.g. "model.moe.top_k"
    type: str  # e.g. "int", "list[str]"
    value: object  # the default (of a schema instance) or a loaded config's value


def _type_name(hint) -> str:
    """e.g. "int", "list[str]", "float|None" (no spaces: `--keys` prints one column per field)."""
    if isinstance(hint, type) and not typing.get_args(hint):
        return hint.__name__
    return str(hint).replace("typing.", "").replace(" | ", "|")


def config_keys(cfg, prefix: str = "") -> list[Key]:
    """The leaf keys of a dataclass instance (nested dataclasses are sections), in declaration order."""
    hints = typing.get_type_hints(type(cfg))
    keys = []
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            keys += config_keys(value, f"{prefix}{f.name}.")
        else:
            keys.append(Key(prefix + f.name, _type_name(hints[f.name]), value))
    return keys


def _show(value) -> str:
    """As one would write it in a key=value override."""
    if isinstance(value, str) and not value:
        return '""'
    return str(value).lower() if isinstance(value, bool) else str(value)


def format_keys(keys: list[Key], value_header: str = "default") -> str:
    """One row per key: name, type, value."""
    rows = [("key", "type", value_header)] + [(k.name, k.type, _show(k.value)) for k in keys]
    widths = [max(len(r[i]) for r in rows) for i in range(2)]
    return "\n".join(f"{r[0]:<{widths[0]}}  {r[1]:<{widths[1]}}  {r[2]}".rstrip() for r in rows)


def sections(keys: list[Key]) -> list[str]:
    """The dotted sections the keys sit in, e.g. "model" and "model.moe"."""
    return list(dict.fromkeys(k.name.rsplit(".", i)[0] for k in keys for i in range(1, k.name.count(".") + 1)))


def closest_keys(name: str, names: list[str]) -> list[str]:
    """Known keys (or sections) `name` may have meant: those with the same last part (`steps` → train.steps:
    the section left out or mistaken), else the one closest to the whole name or else to its last part."""
    leaf = name.rsplit(".", 1)[-1]
    by_leaf: dict[str, list[str]] = {}
    for known in names:
        by_leaf.setdefault(known.rsplit(".", 1)[-1], []).append(known)
    if leaf in by_leaf:
        return by_leaf[leaf]
    near_leaf = difflib.get_close_matches(leaf, list(by_leaf), n=1)
    return difflib.get_close_matches(name, names, n=1) or (by_leaf[near_leaf[0]] if near_leaf else [])
