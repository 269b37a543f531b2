"""Saving checkpoints while training goes on (checkpoint.async_save=true), or in line (the default).

With async saving, `save` checks the model and optimizer state for NaN and inf (as a synchronous save
does), copies it to CPU memory and returns; a background thread (torch.distributed.checkpoint.async_save)
writes the shards while the next steps run. The copy goes into buffers kept from the previous save (one
ChecksummingWriter for the run, staging with cache_staged_state_dict), so after the first save it is a
memcpy without allocation or page faults. The background write takes the GIL only to pickle each item's
small header (hashing, writes and fsyncs release it), costs less CPU than DCP's own (no CRC-32 pass:
storage.py), and runs at the lowest CPU priority (nice 19, its threads only, on Linux), so that on
a CPU-bound run it takes the time training leaves rather than slowing its steps. `unroll bench checkpoint`
measures how long `save` holds the loop against a synchronous save, and training steps during the write
against steps alone.

The checkpoint is finished (RNG states and train state as they were at the save, the manifest, the rename
to step_N) as soon as the write is done on every rank: `poll`, which the trainer calls once per step, sees it
(one tiny all-reduce while a write is pending) and finishes it, or raises the write's failure (a full disk,
on any rank) on every rank at that step, not only at the next save; the next save and `wait`, which the
trainer calls before it returns, finish it too. A run killed before then leaves a `.tmp` directory that resume
ignores: the previous checkpoint is used, nothing already saved is lost.

Process groups: in one process async_save needs none (DCP saves as a single process, as the synchronous
path does). Under torchrun it gets a gloo group of its own, so that its collectives in the background
thread never interleave with the training's collectives on the default group (and so that it has the CPU
backend async_save requires when training runs on NCCL).
"""

from __future__ import annotations

import traceback
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import storage
from unroll.train.parallel import distributed as D


def _result(future: Future):
    """The background write's outcome; any failure as DCP's CheckpointException, which _agreed reports."""
    try:
        return future.result()
    except CheckpointException:
        raise
    except Exception as e:  # not a DCP-wrapped failure: keep it, with the rank that saw it
        rank = dist.get_rank() if dist.is_initialized() else 0
        raise CheckpointException(
            f"async checkpoint write failed: {e}", {rank: (e, traceback.extract_tb(e.__traceback__))}
        ) from e


class CheckpointWriter:
    def __init__(
        self, run_dir: str | Path, *, keep: int, rank: int, async_save: bool, io_threads: int = storage.IO_THREADS
    ):
        self.run_dir, self.keep, self.rank, self.async_save = run_dir, keep, rank, async_save
        self.io_threads = io_threads
        self._group = None
        self._storage: storage.ChecksummingWriter | None = (
            None  # the async saves' writer, which keeps their staging buffers between saves
        )
        self._pending: tuple[Future, dict[str, Any]] | None = None  # (future, finish_save arguments)

    def _process_group(self):
        if not dist.is_initialized():
            return None
        if self._group is None:  # collective: every rank reaches its first save together
            self._group = dist.new_group(backend="gloo")
        return self._group

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer, train_state: dict) -> None:
        """Collective. Waits for the previous async save, then saves (in line or in the background)."""
        self.wait()
        if not self.async_save:
            checkpoint.save(
                self.run_dir,
                step,
                model,
                optimizer,
                train_state,
                keep=self.keep,
                rank=self.rank,
                io_threads=self.io_threads,
            )
            return
        group = self._process_group()
        if group is None:  # DCP warns from its writer thread, outside _quiet_single_process; one process is meant
            warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        view = checkpoint.save_view(model, optimizer)
        checkpoint.refuse_non_finite(self.run_dir, step, view)  # before staging: nothing is copied or written
        tmp, final = checkpoint.begin_save(self.run_dir, step, self.rank)
        if self._storage is None:
            self._storage = storage.ChecksummingWriter(tmp, thread_count=self.io_threads, background=True)
        with checkpoint._quiet_single_process():
            future = dcp.async_save(
                view, checkpoint_id=str(tmp), storage_writer=self._storage, process_group=group, no_dist=group is None
            )
        assert isinstance(future, Future), "without an async stager DCP returns a plain Future"
        # Everything the checkpoint records besides the shards is taken now, at the step it belongs to.
        self._pending = (
            future,
            dict(
                tmp=tmp,
                final=final,
                step=step,
                train_state=dict(train_state),
                keep=self.keep,
                rank=self.rank,
                rng=checkpoint._rng_state(),
                model_cfg=getattr(model, "cfg", None),
            ),
        )

    def poll(self, device: torch.device) -> Path | None:
        """Collective, once per step, returns at once while a background write goes on anywhere: once it
        is done on every rank, finishes the checkpoint (returns its path) or raises its failure on every
        rank as a CheckpointError."""
        if self._pending is None or D.any_rank(not self._pending[0].done(), device):
            return None
        return self.wait()

    def wait(self) -> Path | None:
        """Collective. Finishes the pending async save, if any; returns its final path. A failed write
        (on any rank) raises a CheckpointError on every rank, naming the path and the error, once its
        `.tmp` directory is removed."""
        if self._pending is None:
            return None
        future, args = self._pending
        self._pending = None
        with checkpoint._quiet_single_process():
            checkpoint._agreed(args["tmp"], args["final"], self.rank, _result, future)
        return checkpoint.finish_save(self.run_dir, **args)

    def close(self, finish: bool) -> None:
        """At the end of a run. After an error (finish=False) the background write is only joined, not
        finished: peers may be gone, and the unfinished `.tmp` is ignored on resume."""
        if finish:
            self.wait()
        elif self._pending is not None:
            future, _ = self._pending
            self._pending = None
            try:
                future.result()
            except (Exception, CheckpointException):  # the error that ended the run is the one to report
                pass
