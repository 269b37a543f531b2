"""What argparse leaves over from `unroll COMMAND ...`: key=value overrides typed after the options
(argparse takes a command's positionals in one run, so later ones come back unparsed), and unknown options,
each named with what was probably meant: one of the command's own options (`--jsn` → --json) or, for a
command that takes overrides, a config key (`--steps 10` → train.steps=10)."""

from __future__ import annotations

import argparse
import difflib


def _is_option(arg: str) -> bool:
    if not arg.startswith("-") or arg == "-":
        return False
    try:
        float(arg)  # a negative number is a value, as argparse reads it
        return False
    except ValueError:
        return True


def _hint(option: str, value: str | None, options: list[str], takes_overrides: bool) -> str:
    """What `option` (with `value`, if it had one) was probably meant as: " (did you mean ...?)" or ""."""
    own = difflib.get_close_matches(option, options, n=1, cutoff=0.8)  # --jsn → --json, not --steps → --keys
    leaf = option.lstrip("-").replace("-", "_")
    near: list[str] = []
    if takes_overrides:
        from unroll.train.config import Config
        from unroll.train.config_keys import closest_keys, config_keys

        keys = {k.name: k for k in config_keys(Config())}
        near = closest_keys(leaf, list(keys))
        exact = [k for k in near if k.rsplit(".", 1)[-1] == leaf]
        near = exact or ([] if own else near)  # a key by name beats a close option; a close option, a close key
    if near:
        shown = [f"{k}={value if value is not None else 'true' if keys[k].type == 'bool' else 'VALUE'}" for k in near]
        return f" (did you mean {' or '.join(shown)}?)"
    return f" (did you mean {own[0]}?)" if own else ""


def take_leftovers(command: argparse.ArgumentParser, extra: list[str], takes_overrides: bool) -> tuple[list[str], str]:
    """(the overrides among `extra`, "" or a one-line error naming every other leftover)."""
    # argparse offers no public list of a parser's options
    options = [s for action in command._actions for s in action.option_strings if s.startswith("--")]
    overrides, problems = [], []
    i = 0
    while i < len(extra):
        arg = extra[i]
        if _is_option(arg):
            name, eq, value = arg.partition("=")
            if not eq and i + 1 < len(extra) and not _is_option(extra[i + 1]) and "=" not in extra[i + 1]:
                value, i = extra[i + 1], i + 1  # the unknown option's value, most likely
            hint = _hint(name, value if eq or value else None, options, takes_overrides)
            problems.append(f"unrecognized option {name}{hint}")
        elif "=" in arg and takes_overrides:
            overrides.append(arg)
        else:
            problems.append(f"unexpected argument {arg!r}" + (" (overrides are key=value)" if takes_overrides else ""))
        i += 1
    return overrides, "; ".join(problems)
