"""Checkpoints with torch.distributed.checkpoint (DCP), in one process or many.

Layout of RUN_DIR/checkpoints/step_00000100/:
  .metadata, *.distcp   model and optimizer (DCP: each rank writes checkpoint.io_threads shard files at once;
                        reshards on load)
  checksums.json        a checksum of every item (tensor chunk) of every shard, taken as it was written and
                        checked as it is read (storage.py)
  rng_rank{r}.json      every RNG state of rank r (python, numpy, torch CPU, CUDA): train/checkpoint/rng_state.py
                        (checkpoints written before it hold rng_rank{r}.pt, still read, without running code)
  train_state.json      step, global samples consumed, and the rest of the loop's scalar state
  manifest.json         written last: every file's size, every other file's checksum, the model (integrity.py)
  REFUSED               only in a checkpoint a resume found damaged: the reason (integrity.py)
A checkpoint is written under `step_N.tmp` and renamed to `step_N` only once every file is complete, so a
crash mid-write leaves at worst a `.tmp` directory that is ignored (and removed by the next save). On
resume a checkpoint that fails its checks (before the load, or an item's checksum during it, on any rank)
is refused with the reason on every rank, and the previous one loaded whole; a damaged one is marked REFUSED.
Good checkpoints are the complete ones that pass their checks (resolve.py, which every reader goes through):
resume, rotation, export, generation, growth and `train.init_from` all take the newest of them. Rotation
(`keep`) counts only those, so it never deletes the newest good checkpoint for one that is not, and it reads
no shard to decide; a refused checkpoint stays for the user (set aside as `step_N.refused` when its step is
saved again).

What a save refuses, on every rank at once (the ranks agree before going on, so none is left waiting):
  non-finite state   before anything is written, each rank checks the tensors it would save (finite.py); a
                     NaN or inf stops the save naming the tensor and the step, nothing is written
  a failed write     a full or read-only disk, a denied permission, on any rank and in any file (DCP's
                     shards, an RNG file, the manifest): the save stops naming the path and the OS error,
                     its `.tmp` directory is removed, the checkpoints before it are untouched
Loading runs no code from the checkpoint: DCP's pickled metadata and values through allowlists
(safe_load.py), the RNG states and train state as JSON.

A checkpoint resumes under another layout and world size: DCP reshards, tensor-parallel fused weights and
expert-parallel experts are saved in the single-device layout (views.py), pipeline stages
under the LM's names (pipeline.Pipeline.owned_view), and the data position is global samples. Tested, with the losses
continuing as in one uninterrupted run (tests/test_train_relayout.py and the tests it names): PP 2 → FSDP 2 →
1 process → FSDP 2, TP 2 → DDP 2 → TP 2 → 1 process, CP 2 → 1 process → EP 2 → 1 process, PP 2 → 1 process
with tied embeddings, dp_shard 4 × EP 2 → 1 process. RNG states are per rank (a rank beyond the saved ones
takes rank 0's); a training step draws no random numbers, so they do not affect the losses.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)

from unroll.train.checkpoint import integrity, rng_state, storage
from unroll.train.checkpoint.finite import agreed_non_finite
from unroll.train.checkpoint.integrity import CheckpointError
from unroll.train.checkpoint.resolve import STATE_FILE, checkpoint_dirs, checkpoint_root, good_checkpoints, unusable
from unroll.train.checkpoint.safe_load import SafePlanner
from unroll.train.checkpoint.views import dcp_view
from unroll.train.parallel import distributed as D


def _rng_state() -> dict:
    return rng_state.capture()


@contextlib.contextmanager
def _quiet_single_process():
    """DCP warns when it runs without a process group; one process is a supported layout here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    train_state: dict,
    *,
    keep: int,
    rank: int = 0,
    io_threads: int = storage.IO_THREADS,
) -> Path:
    """Collective: every rank calls it. Returns the final checkpoint path."""
    view = save_view(model, optimizer)
    refuse_non_finite(run_dir, step, view)
    tmp, final = begin_save(run_dir, step, rank)
    with _quiet_single_process():
        writer = storage.ChecksummingWriter(tmp, thread_count=io_threads)
        _agreed(tmp, final, rank, lambda: dcp.save(view, checkpoint_id=str(tmp), storage_writer=writer))
    return finish_save(
        run_dir,
        tmp,
        final,
        step,
        train_state,
        keep=keep,
        rank=rank,
        rng=_rng_state(),
        model_cfg=getattr(model, "cfg", None),
    )


def refuse_non_finite(run_dir: str | Path, step: int, view: dict) -> None:
    """Collective, before anything is written: a NaN or inf in any rank's part of `view` (save_view's
    result) refuses the save on every rank, naming the first such tensor."""
    bad = agreed_non_finite(view)
    if bad:
        raise CheckpointError(
            f"checkpoint of step {step} refused: {bad} holds NaN or inf values; nothing was "
            f"written, the checkpoints in {checkpoint_root(run_dir)} are as they were"
        )


def begin_save(run_dir: str | Path, step: int, rank: int) -> tuple[Path, Path]:
    """Collective: (the temporary directory the shards go to, the final name)."""
    root = checkpoint_root(run_dir)
    final = root / f"step_{step:08d}"
    tmp = root / f"{final.name}.tmp"

    def make_tmp():
        if rank == 0:
            root.mkdir(parents=True, exist_ok=True)
            for stale in root.glob("*.tmp"):  # left by an interrupted save
                shutil.rmtree(stale)
            tmp.mkdir()

    _agreed(tmp, final, rank, make_tmp)
    return tmp, final


def save_view(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """What DCP writes: model and optimizer state in the single-device layout (views.dcp_view)."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    return dcp_view(model, {"model": model_sd, "optim": optim_sd})


def finish_save(
    run_dir: str | Path,
    tmp: Path,
    final: Path,
    step: int,
    train_state: dict,
    *,
    keep: int,
    rank: int,
    rng: dict,
    model_cfg=None,
) -> Path:
    """Collective, once DCP has written the shards: RNG states, train state, the manifest (last), the
    rename to the final name, and the pruning of old checkpoints."""
    _agreed(tmp, final, rank, rng_state.write, tmp / rng_state.file_name(rank), rng)

    def complete():
        if rank == 0:
            with open(tmp / STATE_FILE, "w") as f:
                json.dump({**train_state, "step": step}, f, indent=1)
                f.flush()
                os.fsync(f.fileno())
            integrity.write_manifest(tmp, step, model_cfg)
            _fsync_dir(tmp)
            _make_room(final)
            os.rename(tmp, final)
            _fsync_dir(final.parent)

    _agreed(tmp, final, rank, complete)
    if rank == 0:
        _prune(run_dir, step, keep)
    return final


def _prune(run_dir: str | Path, step: int, keep: int) -> None:
    """Keeps the newest `keep` good checkpoints up to `step`, the one just saved only if it passes its checks
    too. Ones that fail them are left for the user (resume skips them), and newer ones left by a resume that
    fell back do not count. One that cannot be removed is reported and left: the checkpoint just saved is
    complete."""
    good = [path for s, path in good_checkpoints(run_dir) if s <= step]
    for old in good[:-keep]:
        try:
            shutil.rmtree(old)
        except OSError as e:
            print(f"unroll: old checkpoint {old} not removed: {e}", file=sys.stderr, flush=True)


def _agreed(tmp: Path, final: Path, rank: int, write, *args):
    """Collective: this rank's part of writing checkpoint `final` into `tmp` (write(*args)). A failed write
    on any rank (a full or read-only disk, a denied permission: an OSError, also inside DCP, which reports
    every rank's failure to all of them) stops every rank with a CheckpointError naming the path and the
    error, once rank 0 has removed the partial `tmp`; the checkpoints saved before are not touched."""
    error, result = None, None
    try:
        result = write(*args)
    except OSError as e:
        error = _describe(e, rank, tmp)
    except CheckpointException as e:  # DCP's own exception derives from BaseException
        failed, (cause, _) = min(e.failures.items(), key=lambda item: item[0])
        error = _describe(cause, failed, tmp)
    error = D.first_reported(error)
    if error is None:
        return result
    cleanup = f"the partial {tmp.name} is removed"
    if rank == 0 and tmp.exists():
        try:
            shutil.rmtree(tmp)
        except OSError as e:
            cleanup = f"the partial {tmp.name} could not be removed ({e}); the next save removes it"
    D.barrier()  # no rank ends (and has torchrun stop the others) before rank 0 has removed it
    raise CheckpointError(
        f"checkpoint {final} not saved: {error}; {cleanup}, and the checkpoints saved before "
        f"are kept (resume uses the newest)"
    )


def _describe(e: BaseException, rank: int, tmp: Path) -> str:
    """ "[Errno 28] No space left on device: 'PATH'" (on rank R), PATH the file or else the directory."""
    if isinstance(e, OSError):
        text = str(e if e.filename else OSError(e.errno, e.strerror or str(e), str(tmp)))
    else:
        text = f"writing {tmp}: {type(e).__name__}: {e}"
    return f"{text} on rank {rank}" if torch.distributed.is_initialized() else text


def _make_room(final: Path) -> None:
    """Before `final` is saved again (e.g. a signal right after a periodic save, or the step of a checkpoint a
    resume refused): a refused one is set aside as step_N.refused, for the user; anything else is replaced."""
    if not final.exists():
        return
    if not (final / integrity.REFUSED).is_file():
        shutil.rmtree(final)
        return
    aside = final.with_name(f"{final.name}.refused")
    n = 1
    while aside.exists():
        n += 1
        aside = final.with_name(f"{final.name}.refused{n}")
    os.rename(final, aside)
    print(
        f"unroll: the refused checkpoint {final} is kept as {aside} (delete it when done with it)",
        file=sys.stderr,
        flush=True,
    )


def _last_line(e: BaseException) -> str:
    """DCP wraps the cause (a size mismatch, a missing key) in a per-rank traceback; its last line says it."""
    lines = [line for line in str(e).strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else type(e).__name__


def _dcp_load(state: dict, path: Path, model_cfg=None, io_threads: int = storage.IO_THREADS) -> None:
    """Fills `state` (a views.dcp_view, sharing storage with the state to fill) in place from the checkpoint,
    every item read verified against its checksum; any failure names the checkpoint, the same on every rank."""
    refusal = integrity.agreed_check(path, model_cfg)
    if refusal:
        raise CheckpointError(f"checkpoint {path} refused: {refusal.reason}", damaged=refusal.damaged)
    checksums = integrity.item_checksums(path)
    if checksums is None:
        warnings.warn(
            f"checkpoint {path} was saved before per-item checksums: its shards are read unverified", stacklevel=2
        )
    reader = storage.VerifyingReader(path, checksums, thread_count=io_threads)
    try:
        with _quiet_single_process():
            dcp.load(
                state,
                checkpoint_id=str(path),  # fills `state`'s tensors in place
                storage_reader=reader,
                planner=SafePlanner(),
            )  # runs no code from it
    except (Exception, CheckpointException) as e:  # DCP's own exception derives from BaseException
        corrupt = storage.corruption(e) if isinstance(e, CheckpointException) else None
        if corrupt:  # raised by one rank's reader; DCP hands every rank the same failures
            raise CheckpointError(f"checkpoint {path} refused: {corrupt}", damaged=True) from e
        raise CheckpointError(f"checkpoint {path} could not be loaded into this model: {_last_line(e)}") from e


def load(
    path: Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int = 0,
    io_threads: int = storage.IO_THREADS,
) -> dict:
    """Restores model, optimizer and this rank's RNG state in place; returns the train state."""
    model_sd, optim_sd = get_state_dict(model, optimizer)
    state: dict[str, Any] = {"model": model_sd, "optim": optim_sd}
    _dcp_load(dcp_view(model, state), path, getattr(model, "cfg", None), io_threads)
    rng, train_state = _read_small_files(path, rank)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng_state.restore(rng)
    return train_state


def _read_small_files(path: Path, rank: int) -> tuple[dict, dict]:
    """Collective: (this rank's RNG states, the train state), read as JSON (a legacy RNG .pt file without
    running code); refused on every rank when any rank cannot use its files."""
    reason: str | None = None
    found: tuple[dict, dict] = ({}, {})
    try:
        train_state = json.loads((path / STATE_FILE).read_text())
        if not isinstance(train_state, dict) or not isinstance(train_state.get("step"), int):
            raise ValueError("no integer step")
        found = (rng_state.read(path, rank), train_state)
    except rng_state.RNGStateError as e:
        reason = str(e)
    except (OSError, ValueError) as e:
        reason = f"{path / STATE_FILE}: unreadable ({e})"
    reason = D.first_reported(reason)
    if reason:
        raise CheckpointError(f"checkpoint {path} refused: {reason}")
    return found


def load_latest(
    run_dir: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    rank: int = 0,
    io_threads: int = storage.IO_THREADS,
) -> dict | None:
    """Resumes from the newest good checkpoint in the run directory; None when there is none. A newer one
    that is partial, damaged (a checksum differs, here or in any rank's share) or from another model is
    refused with the reason (on stderr), a damaged one marked REFUSED, and the one before it tried; when there
    are checkpoints but none is good, it stops (starting afresh would prune them)."""
    refused = []
    for _, path in reversed(checkpoint_dirs(run_dir)):
        try:
            # every tensor of model and optimizer is loaded: what a failed try left is overwritten
            return load(path, model, optimizer, rank=rank, io_threads=io_threads)
        except CheckpointError as e:
            refused.append(str(e))
            if rank == 0:
                if e.damaged:
                    _mark_refused(path, str(e))
                print(f"unroll: {e}; trying the previous checkpoint", file=sys.stderr, flush=True)
    if refused:
        raise unusable(run_dir, refused, advice=" (move them away to start afresh)")
    return None


def _mark_refused(path: Path, reason: str) -> None:
    try:
        integrity.mark_refused(path, reason)
    except OSError as e:  # a read-only copy: the refusal stands, later resumes check it again
        print(f"unroll: could not mark {path} {integrity.REFUSED} ({e})", file=sys.stderr, flush=True)


def load_model_weights(path: Path, model: torch.nn.Module) -> None:
    """Only the model (generation, `train.init_from`): DCP reads the requested keys, skips the optimizer,
    and reshards into whatever this rank holds (FSDP, tp or ep shards, a pipeline's stages)."""
    model_sd = get_model_state_dict(model)
    state = {"model": model_sd, "optim": {"state": {}}}
    _dcp_load({"model": dcp_view(model, state)["model"]}, path, getattr(model, "cfg", None))
    set_model_state_dict(model, model_sd)
