"""The config a SLURM job trains from, frozen at submission into RUN_DIR/slurm/config.yaml: the job reads it
when it starts, and again at every requeue, so nothing may change it while a job of the run is queued.

The rule (unroll.launch.slurm applies it): a submission whose resolved config is the frozen one goes
ahead; one that differs is refused with the keys that differ, unless the operator replaces the frozen
config (the old one is kept beside it as config.<time>.yaml). A dry run writes elsewhere.
"""

from __future__ import annotations

import time
from pathlib import Path

from omegaconf import OmegaConf

SHOWN = 6  # differing keys named in a refusal; the rest are counted


def differences(frozen: Path, text: str) -> list[str]:
    """'key: frozen → new' for every key whose value in the frozen file differs from `text` (a resolved
    config's YAML). The frozen file is read as a config, so a key this version added, at its default, is
    no difference."""
    from unroll.train.config import ConfigError, load_config, to_yaml

    try:
        try:
            frozen_text = to_yaml(load_config(str(frozen)))
        except ConfigError:  # a key this version no longer has: compared as written
            frozen_text = frozen.read_text()
        old = _flat(OmegaConf.to_container(OmegaConf.create(frozen_text)))
    except Exception as e:  # unreadable or not YAML: it cannot be shown to match
        return [f"(the file cannot be read: {str(e).splitlines()[0] if str(e) else type(e).__name__})"]
    new = _flat(OmegaConf.to_container(OmegaConf.create(text)))
    absent = "(absent)"
    return [
        f"{key}: {old.get(key, absent)} → {new.get(key, absent)}"
        for key in sorted(old.keys() | new.keys())
        if old.get(key, absent) != new.get(key, absent)
    ]


def refusal(frozen: Path, changed: list[str]) -> str:
    shown = ", ".join(changed[:SHOWN]) + (f" and {len(changed) - SHOWN} more" if len(changed) > SHOWN else "")
    return (
        f"{frozen} is the config an earlier submission of this run froze (its queued or requeued job "
        f"trains from it), and this one differs: {shown}; use another run.dir, or --replace-config once no "
        f"job of this run is queued or running"
    )


def keep_aside(path: Path) -> Path:
    """Renames `path` to NAME.<time>.SUFFIX beside it (a free name) and returns the new path."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    for n in range(1000):
        aside = path.with_name(f"{path.stem}.{stamp}{f'-{n}' if n else ''}{path.suffix}")
        if not aside.exists():
            path.rename(aside)
            return aside
    raise FileExistsError(f"no free name beside {path} to keep it under")


def write_atomically(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _flat(tree, prefix: str = "") -> dict:
    if not isinstance(tree, dict):
        return {prefix: tree}
    out: dict = {}
    for key, value in tree.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out
