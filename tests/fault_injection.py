"""Faults injected deterministically into checkpoint saves, by the step they belong to: in the test's own
process (`patch` = monkeypatch.setattr) or in one torchrun rank (`install`, from the sitecustomize hook
`write_hook` writes; `patch` = setattr).

  full_disk@N      DCP's shard files of the save at step N: the disk fills up after a few bytes (ENOSPC)
  denied@N:NAME    opening the file NAME of the save at step N (rng_rank1.json, manifest.json.tmp, ...) is
                   refused with EACCES
  nan@N:NAME       just before the save at step N, a NaN in this rank's part of parameter NAME, or of its
                   optimizer state NAME:KEY (e.g. blocks.0.mixer.out_proj.weight:exp_avg_sq)
Every fault spec also makes each training step wait until the async saves started so far have finished in
the background, so that a background failure is there to be seen by the step right after the save (in a
real run it is seen by the first step after the write fails).
"""

import builtins
import concurrent.futures
import errno
import os
from pathlib import Path

import torch

HOOK = """
import os
if os.environ.get("FAULT") and os.environ.get("RANK") is not None:  # the ranks, not torchrun's agent
    import sys
    sys.path.insert(0, {tests!r})
    import fault_injection
    faulty = os.environ["RANK"] == os.environ.get("FAULT_RANK", "1")
    fault_injection.install(os.environ["FAULT"], setattr, faulty=faulty)
"""


def write_hook(directory: Path) -> Path:
    """A sitecustomize.py in `directory` that installs the faults of $FAULT in the rank $FAULT_RANK (1) of
    a torchrun job (and the wait for async writes in every rank); returns the directory, to put first on
    PYTHONPATH."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "sitecustomize.py").write_text(HOOK.format(tests=str(Path(__file__).parent)))
    return directory


def _in_save(path, step: int) -> bool:
    return Path(path).parent.name == f"step_{step:08d}.tmp"


class _FillingStream:
    """A stream on a disk that fills up after `room` bytes: what fits is written, then ENOSPC."""

    def __init__(self, stream, room: int = 64):
        self._stream, self._room = stream, room

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        if len(view) <= self._room:
            self._room -= len(view)
            return self._stream.write(view)
        self._stream.write(view[: self._room])
        self._room = 0
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self._stream, name)


def full_disk(patch, step: int) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystem

    real = FileSystem.create_stream

    def create_stream(self, path, mode):
        context = real(self, path, mode)
        if "w" not in mode or not _in_save(path, step) or not str(path).endswith(".distcp"):
            return context
        return _Wrapped(context)

    patch(FileSystem, "create_stream", create_stream)


class _Wrapped:
    def __init__(self, context):
        self._context = context

    def __enter__(self):
        return _FillingStream(self._context.__enter__())

    def __exit__(self, *exc):
        return self._context.__exit__(*exc)


def denied(patch, step: int, name: str) -> None:
    real = builtins.open

    def open_(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and Path(file).name == name and _in_save(file, step):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return real(file, mode, *args, **kwargs)

    patch(builtins, "open", open_)


def nan(patch, step: int, target: str) -> None:
    from unroll.train.checkpoint.writer import CheckpointWriter

    real = CheckpointWriter.save
    param, _, key = target.partition(":")

    def save(self, at, model, optimizer, train_state):
        if at == step:
            p = dict(model.named_parameters())[param]
            t = optimizer.state[p][key] if key else p
            with torch.no_grad():  # the last element: on the last rank's shard under FSDP
                (t.to_local() if hasattr(t, "to_local") else t)[(-1,) * t.dim()] = float("nan")
        return real(self, at, model, optimizer, train_state)

    patch(CheckpointWriter, "save", save)


def finish_async_writes_before_each_step(patch) -> None:
    import torch.distributed.checkpoint as dcp

    from unroll.train import trainer

    futures = []
    real_async_save, real_step = dcp.async_save, trainer.train_step

    def async_save(*args, **kwargs):
        futures.append(real_async_save(*args, **kwargs))
        return futures[-1]

    def train_step(*args, **kwargs):
        concurrent.futures.wait(futures)
        return real_step(*args, **kwargs)

    patch(dcp, "async_save", async_save)
    patch(trainer, "train_step", train_step)


def install(spec: str, patch, faulty: bool = True) -> None:
    """Installs the faults of `spec`: comma-separated KIND@STEP[:ARG] (see the module docstring); with
    faulty=False only the wait for async writes."""
    finish_async_writes_before_each_step(patch)
    for fault in spec.split(",") if faulty else ():
        kind, _, rest = fault.partition("@")
        step, _, arg = rest.partition(":")
        {
            "full_disk": lambda: full_disk(patch, int(step)),
            "denied": lambda: denied(patch, int(step), arg),
            "nan": lambda: nan(patch, int(step), arg),
        }[kind]()
