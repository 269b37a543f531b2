"""Which checkpoint to use: a run directory's checkpoints and the one rule that picks among them, shared by
resume and `train.init_from` (train), generation, export and growth.

A run directory keeps its checkpoints as RUN_DIR/checkpoints/step_N (N in 8 digits); `step_N.tmp` (a save
under way, or one a crash interrupted) and `step_N.refused` (set aside by a save) are not checkpoints. A
checkpoint is usable (`refusal` is None) when
  - it is complete: manifest.json, .metadata and train_state.json are there (the manifest is written last)
  - it passes integrity.check: every file the manifest lists is there with the size it records, the small
    files match their checksums, it is not marked REFUSED, and, where the caller gives the model's config,
    it was saved from that architecture
These checks read only the small files. The shards' items are verified as a load reads them, so resume
(dcp.load_latest) tries the checkpoints newest first and also falls back past one its load refuses.

A run directory resolves to its newest usable checkpoint: a newer one that is refused is passed over for
the one before it. A checkpoint named by its path resolves to itself or is refused with the reason (whoever
names one means that one). When nothing resolves, the error names the run directory, its checkpoints folder
and every candidate with why it was refused.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from unroll.train.checkpoint import integrity
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.checkpoint.rundir import CONFIG_FILE

STEP_DIR = re.compile(r"^step_(\d{8})$")
STATE_FILE = "train_state.json"
METADATA = ".metadata"  # DCP's index of the shards


@dataclass(frozen=True)
class Found:
    step: int
    path: Path


def checkpoint_root(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


def is_complete(path: Path) -> bool:
    """Finished saving (the manifest is written last); `refusal` checks the rest."""
    return all((path / name).is_file() for name in (METADATA, STATE_FILE, integrity.MANIFEST))


def checkpoint_dirs(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every step_N directory, finished or not, oldest first (`.tmp` writes excluded)."""
    root = checkpoint_root(run_dir)
    found = []
    for path in root.iterdir() if root.is_dir() else ():
        m = STEP_DIR.match(path.name)
        if m and path.is_dir():
            found.append((int(m.group(1)), path))
    return sorted(found)


def complete_checkpoints(run_dir: str | Path) -> list[tuple[int, Path]]:
    """(step, path) of every complete checkpoint, oldest first; partial writes are skipped."""
    return [(step, path) for step, path in checkpoint_dirs(run_dir) if is_complete(path)]


def good_checkpoints(run_dir: str | Path, model_cfg=None) -> list[tuple[int, Path]]:
    """(step, path) of every usable checkpoint (`refusal`), oldest first. Reads no shard."""
    return [(step, path) for step, path in checkpoint_dirs(run_dir) if refusal(path, model_cfg) is None]


def refusal(path: Path, model_cfg=None) -> str | None:
    """Why the checkpoint at `path` must not be used (for a model of `model_cfg`, if given), or None."""
    reason = integrity.problem(path, model_cfg)
    if reason is None and not is_complete(path):  # a manifest that does not list DCP's own files
        missing = [name for name in (METADATA, STATE_FILE) if not (path / name).is_file()]
        reason = f"incomplete: no {' and no '.join(missing)}"
    return reason


def _named(path: Path, setting: str | None) -> str:
    return f"{setting}={path}" if setting else str(path)


def unusable(
    run_dir: str | Path, refused: list[str], *, setting: str | None = None, advice: str = ""
) -> CheckpointError:
    """The error for a run directory with no checkpoint to use: `refused` holds one line per candidate,
    newest first ("checkpoint PATH refused: REASON"); `advice` follows the summary."""
    root = checkpoint_root(run_dir)
    if not refused:
        return CheckpointError(f"{_named(Path(run_dir), setting)}: no checkpoint in {root}{advice}")
    lines = "".join(f"\n  {line}" for line in refused)
    return CheckpointError(f"{_named(Path(run_dir), setting)}: no usable checkpoint in {root}{advice}:{lines}")


def newest_good(run_dir: str | Path, model_cfg=None, *, setting: str | None = None) -> Found:
    """The newest usable checkpoint of the run directory; CheckpointError (`unusable`) when there is none.
    `setting`: the config key or option that gave the path, for the message."""
    refused = []
    for step, path in reversed(checkpoint_dirs(run_dir)):
        reason = refusal(path, model_cfg)
        if reason is None:
            return Found(step, path)
        refused.append(f"checkpoint {path} refused: {reason}")
    raise unusable(run_dir, refused, setting=setting)


def is_checkpoint(path: Path) -> bool:
    """A checkpoint directory rather than a run directory: it holds DCP's index or a manifest, or it is a
    RUN_DIR/checkpoints/step_N."""
    saved = any((path / name).is_file() for name in (METADATA, integrity.MANIFEST))
    return saved or (STEP_DIR.match(path.name) is not None and path.parent.name == "checkpoints")


def _step(path: Path) -> int:
    m = STEP_DIR.match(path.name)
    return int(m.group(1)) if m else int(integrity.read_manifest(path)["step"])


def checkpoint_of(path: str | Path, model_cfg=None, *, setting: str | None = None) -> Found:
    """PATH a run directory: its newest usable checkpoint; PATH a checkpoint directory: that one, if usable."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{_named(path, setting)}: no such run or checkpoint directory")
    if not is_checkpoint(path):
        return newest_good(path, model_cfg, setting=setting)
    reason = refusal(path, model_cfg)
    if reason:
        label = f"{setting}: " if setting else ""
        raise CheckpointError(f"{label}checkpoint {path} refused: {reason}")
    return Found(_step(path), path)


def run_directory(path: str | Path) -> Path:
    """The run directory (the one with config.yaml) of PATH: a run directory, or one of its checkpoints
    RUN_DIR/checkpoints/step_N."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: no such run or checkpoint directory")
    if (path / CONFIG_FILE).is_file():
        return path
    if is_checkpoint(path):
        run_dir = path.parent.parent
        if path.parent.name != "checkpoints" or not (run_dir / CONFIG_FILE).is_file():
            raise CheckpointError(
                f"checkpoint {path}: not inside a run directory (RUN_DIR/checkpoints/step_N with "
                f"RUN_DIR/{CONFIG_FILE}), which holds its config"
            )
        return run_dir
    raise CheckpointError(
        f"{path}: neither a run directory (no {CONFIG_FILE}) nor a checkpoint RUN_DIR/checkpoints/step_N"
    )
