"""Process-group setup for plain data parallelism under torchrun (gloo on CPU, NCCL on GPU), and which
of torchrun's restarts this is."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistInfo:
    rank: int
    world: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "cuda" or (pref == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise RuntimeError("run.device=cuda but torch sees no CUDA device (is the CPU build installed?)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


def init(device_pref: str, timeout_s: int = 600) -> DistInfo:
    """Reads torchrun's environment; a single process needs no process group at all."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local_rank)
    if world > 1 and not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        # A timeout turns a dead or stuck peer into an error instead of a hang.
        dist.init_process_group(
            backend, timeout=timedelta(seconds=timeout_s), device_id=device if device.type == "cuda" else None
        )
    return DistInfo(rank, world, local_rank, device)


def restart_note() -> str:
    """The trainer's `; restart R of N` when torchrun may restart the ranks (`--max-restarts N`): its agent
    starts each attempt's ranks with the attempt in TORCHELASTIC_RESTART_COUNT (0 first); "" otherwise."""
    allowed = int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0"))
    return f"; restart {os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')} of {allowed}" if allowed else ""


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        dist.all_reduce(t)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank when `flag` is true on any rank (signals may reach only some ranks)."""
    if not dist.is_initialized():
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def first_reported(message: str | None) -> str | None:
    """Collective: the first message any rank reported (in rank order), on every rank; None when none did.
    A failure one rank sees (a file it could not write) thus stops every rank at the same point."""
    if not dist.is_initialized():
        return message
    seen = [None] * dist.get_world_size()
    dist.all_gather_object(seen, message)
    return next((m for m in seen if m), None)


def shutdown(clean: bool = True) -> None:
    """Ends the process group; after an error, without the barrier that peers may never reach."""
    if dist.is_initialized():
        if clean:
            dist.barrier()
        dist.destroy_process_group()
