"""Object collectives in a fake world, the part of SymmetricWorld (train/planning/fake_comm.py) above the tensor ops.

An object collective pickles, exchanges the pickled sizes, then the bytes. With the tensor rules:

    all_gather_object            every slot gets this rank's object: right in a symmetric world
    gather_object                the root gets its object in every slot: right; other ranks send
    broadcast_object_list,       right on the source rank (broadcast leaves its buffers unchanged)
    scatter_object_list
    send_object_list             counted as sends

but a rank that *receives* an object (broadcast_object_list / scatter_object_list off the source,
recv_object_list anywhere) would read sizes it never had. While the mode is active these three are
replaced, on fake groups only:

    the caller's list holds objects   left as it is: the source holds what this rank holds (the
                                      symmetric rule, one level up); counted in `world.unknown`
    the caller's list holds None      FakeWorldError: the object exists only on another rank

The error is deliberate: DCP's planning sends each rank its part of the coordinator's plan this way, and
a None plan lets `dcp.save` finish having written nothing. Save with `no_dist=True` in a fake world;
pipeline stages are given their metadata (train/parallel/pipeline.py), so none is received.
"""

from __future__ import annotations

import functools
from contextlib import ExitStack

import torch.distributed as dist


class FakeWorldError(RuntimeError):
    """A value only another rank has, asked for in a fake world."""


_HINT = (
    "in a fake world save checkpoints with torch.distributed.checkpoint's no_dist=True, and answer "
    "pipeline stages with static metadata (train/parallel/pipeline.py)"
)


def _src_group_rank(group, src, group_src) -> tuple[dist.ProcessGroup, int]:
    pg = group if group is not None else dist.group.WORLD
    assert pg is not None, "a fake process group is initialised"
    if group_src is None:
        group_src = dist.get_group_rank(pg, src if src is not None else 0)
    return pg, group_src


def _keep_or_refuse(world, name: str, kind: str, pg, objects: list, group_src: int) -> None:
    if any(o is None for o in objects):
        raise FakeWorldError(
            f"{name} on rank {dist.get_rank()}: the object comes from group rank {group_src}, "
            f"which this process does not run; {_HINT}"
        )
    world._count(kind, pg, 0)
    world.unknown[f"{name} (kept the caller's objects)"] += 1


def patch_object_collectives(world) -> ExitStack:
    """Replace broadcast_object_list, scatter_object_list and recv_object_list in torch.distributed until
    the returned stack is closed; `world` is the SymmetricWorld that counts them."""
    c10d = dist.distributed_c10d

    def broadcast_object_list(original, object_list, src=None, group=None, device=None, group_src=None):
        pg, root = _src_group_rank(group, src, group_src)
        if pg.rank() == root or not world._is_fake(pg):
            return original(object_list, src=src, group=group, device=device, group_src=group_src)
        _keep_or_refuse(world, "broadcast_object_list", "broadcast", pg, object_list, root)

    def scatter_object_list(
        original, scatter_object_output_list, scatter_object_input_list=None, src=None, group=None, group_src=None
    ):
        pg, root = _src_group_rank(group, src, group_src)
        if pg.rank() == root or not world._is_fake(pg):
            return original(
                scatter_object_output_list, scatter_object_input_list, src=src, group=group, group_src=group_src
            )
        _keep_or_refuse(world, "scatter_object_list", "scatter", pg, scatter_object_output_list[:1], root)

    def recv_object_list(original, object_list, src=None, group=None, device=None, group_src=None, use_batch=False):
        pg, peer = _src_group_rank(group, src, group_src)
        if not world._is_fake(pg):
            return original(object_list, src=src, group=group, device=device, group_src=group_src, use_batch=use_batch)
        _keep_or_refuse(world, "recv_object_list", "recv", pg, object_list, peer)
        return dist.get_global_rank(pg, peer)

    stack = ExitStack()
    for replacement in (broadcast_object_list, scatter_object_list, recv_object_list):
        name = replacement.__name__
        original = getattr(c10d, name)
        wrapper = functools.wraps(original)(functools.partial(replacement, original))
        for module in (c10d, dist):
            stack.callback(setattr, module, name, getattr(module, name))
            setattr(module, name, wrapper)
    return stack
