"""Plausible collectives in a fake world: one rank of an N-rank job run in one process.

torch's fake process group (`dist.init_process_group("fake", store=FakeStore(), rank=r, world_size=n)`)
returns from every collective at once, its outputs copies or leftovers, never what the peers would have
sent. `SymmetricWorld`, a TorchDispatchMode active around the program, lets each collective run and then
writes into its outputs what it would hold if **every rank of the group held exactly what this rank
holds** (a symmetric world):

    all_reduce        SUM → input × n; AVG, MAX, MIN, BAND, BOR → unchanged; PRODUCT → input ** n;
                      BXOR → unchanged for odd n, zeros for even n (PREMUL_SUM → × n: its factor is
                      not visible to the op, counted in `unknown`)
    reduce            the same on the root; other ranks unchanged
    all_gather        this rank's input in every slot
    reduce_scatter    this rank's chunk of the input, reduced as all_reduce reduces it (SUM → × n)
    all_to_all        every source sends what this rank sends to itself: output chunk j := input chunk
                      `rank` when the split sizes agree (they do in a symmetric world); a chunk whose
                      size differs is zeros, counted in `unknown` (an expert-parallel MoE's combine
                      step: rank j returns the rows this rank sent to j, whose count is this rank's
                      routing to j, not to itself)
    broadcast         unchanged (the source holds what this rank holds)
    gather            the root gets its input in every slot; scatter: the root keeps its own chunk,
                      other ranks get zeros (`unknown`)
    recv              zeros (`unknown`), or `recv_fill`'s answer, or with mirror_p2p=True the last
                      tensor of that shape and dtype this rank sent the other way (rank r receives from
                      r - k what it itself sends to r + k: the translated world)
    barrier           nothing

Only groups whose backend is "fake" are written to; on a real group the mode only counts bytes. The
functional collectives (`_c10d_functional.*`, which DTensor and FSDP2 use) are filled when they return:
the fake group completes them at once, so a later `wait_tensor` finds the values in place.

Object collectives (train/planning/fake_objects.py): all_gather_object and gather_object come out right from the
tensor rules; a rank receiving an object it cannot know (broadcast_object_list or scatter_object_list off
the source, recv_object_list) keeps the objects its list already holds and raises FakeWorldError where it
holds None. So DCP's planning cannot run plausibly: save with `no_dist=True` (each rank writes its own
shards and a metadata file describing only them). Pipeline stages: train/parallel/pipeline.py gives every stage
its metadata, and torch's stages then vote (point to point) that all of them have it: `static_pipeline_vote`
is the recv_fill that answers that vote as every stage casts it.

Every collective is also counted, with the bytes this rank sends under the ring model of
train/planning/comm_bytes.py, in `world.traffic` (a TrafficLog keyed by kind, group size and group).

    with SymmetricWorld() as world:
        loss = step(...)
    print(world.traffic.table()); world.traffic.reset()
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
from torch._C._distributed_c10d import _resolve_process_group
from torch.distributed.distributed_c10d import GroupName
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

from unroll.train.planning import comm_bytes as cb
from unroll.train.planning.fake_objects import patch_object_collectives

_C = torch.ops.c10d
_F = torch.ops._c10d_functional
_FA = torch.ops._c10d_functional_autograd

# recv_fill(buffer, src_global_rank, group) -> True when it has written the buffer
RecvFill = Callable[[torch.Tensor, int, dist.ProcessGroup], bool]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _group(g) -> dist.ProcessGroup:
    if isinstance(g, str):
        return _resolve_process_group(GroupName(g))
    if isinstance(g, torch.ScriptObject):
        return dist.ProcessGroup.unbox(g)
    return g


def _op_name(op) -> str:
    """'sum', 'avg', ... from a functional op's string or a c10d op's boxed ReduceOp."""
    if isinstance(op, str):
        return op.lower()
    return dist.ReduceOp.RedOpType(op._get_method("op")()).name.lower()


def _reduced(t: torch.Tensor, op: str, n: int) -> torch.Tensor:
    """The reduction of n copies of t."""
    if t.dtype == torch.bool or op in ("avg", "max", "min", "band", "bor"):
        return t
    if op in ("sum", "premul_sum"):
        return t * n
    if op == "product":
        return t**n
    if op == "bxor":
        return t if n % 2 else torch.zeros_like(t)
    raise ValueError(f"unknown reduce op {op!r}")


@torch.no_grad()
def _write(dst: torch.Tensor, src: torch.Tensor) -> None:
    dst.detach().copy_(src)


def _tile(out: torch.Tensor, inp: torch.Tensor, n: int) -> None:
    """out (n slots along dim 0) := inp in every slot."""
    if out.numel() == 0:
        return
    src = inp.detach().reshape(1, -1)
    if src.untyped_storage().data_ptr() == out.untyped_storage().data_ptr():
        src = src.clone()  # FSDP2 gathers from a view of the output itself
    _write(out.view(n, -1), src.expand(n, -1))


class SymmetricWorld(TorchDispatchMode):
    """Fills collective outputs by the symmetric-world rule and counts their traffic (module docstring).

    traffic   TrafficLog of calls and bytes sent per (kind, group size, group)
    unknown   Counter of outputs the rule could not know (zeros or left unchanged), by kind
    """

    def __init__(self, *, mirror_p2p: bool = False, recv_fill: RecvFill | None = None):
        super().__init__()
        self.traffic = cb.TrafficLog()
        self.unknown: Counter[str] = Counter()
        self.mirror_p2p, self.recv_fill = mirror_p2p, recv_fill
        self._sent: dict[tuple, torch.Tensor] = {}  # (group, offset, shape, dtype) -> last tensor sent
        self._fake: dict[str, bool] = {}
        self._handlers = self._handler_table()

    def reset(self) -> None:
        """Start a new count (traffic and unknowns); mirrored p2p tensors are kept."""
        self.traffic.reset()
        self.unknown.clear()

    # ---- dispatch -------------------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(issubclass(t, DTensor) for t in types):
            # DTensor first desugars into local-tensor ops, which come back here: the redistributions
            # its sharding propagation inserts inside an op would otherwise run unseen
            return NotImplemented
        kwargs = kwargs or {}
        out = func(*self._acceptable(func, args), **kwargs)
        handler = self._handlers.get(func)
        if handler is not None:
            handler(args, kwargs, out)
        return out

    def _acceptable(self, func, args: tuple) -> tuple:
        """The arguments the fake group is called with. Its all_to_all refuses an empty input beside a
        non-empty output, which the symmetric world produces where this rank sends nothing to its own
        experts but, by its split sizes, receives from the others (an expert-parallel MoE's combine step):
        it gets a stand-in input of the output's shape; the handler still fills the output by the rule."""
        if func is _C.alltoall_base_.default and args[1].numel() == 0 and args[0].numel() > 0:
            output, _, pg, out_splits = args[:4]
            return (output, torch.zeros_like(output), pg, out_splits, out_splits) + tuple(args[5:])
        return args

    def _is_fake(self, pg: dist.ProcessGroup) -> bool:
        name = pg.group_name
        if name not in self._fake:
            self._fake[name] = dist.get_backend(pg) == "fake"
        return self._fake[name]

    def _count(self, kind: str, pg: dist.ProcessGroup, sent: int) -> None:
        self.traffic.add(kind, pg.size(), pg.group_desc, sent)

    # ---- the rules, one per collective family ---------------------------------------------------
    def _all_reduce(self, tensors, pg, op) -> None:
        pg, op, n = _group(pg), _op_name(op), _group(pg).size()
        for t in tensors:
            self._count("all_reduce", pg, cb.all_reduce_bytes(n, _nbytes(t)))
            if self._is_fake(pg):
                _write(t, _reduced(t, op, n))
        if op == "premul_sum" and self._is_fake(pg):
            self.unknown["all_reduce premul_sum factor"] += 1

    def _reduce(self, tensors, pg, op, root) -> None:
        pg, op = _group(pg), _op_name(op)
        for t in tensors:
            self._count("reduce", pg, cb.chain_bytes(pg.size(), _nbytes(t)))
            if self._is_fake(pg) and pg.rank() == root:
                _write(t, _reduced(t, op, pg.size()))

    def _broadcast(self, tensors, pg) -> None:
        pg = _group(pg)
        for t in tensors:
            self._count("broadcast", pg, cb.chain_bytes(pg.size(), _nbytes(t)))

    def _all_gather(self, outs, inps, pg) -> None:
        """outs[i]: one tensor with n slots along dim 0, inps[i] this rank's part."""
        pg = _group(pg)
        for out, inp in zip(outs, inps):
            self._count("all_gather", pg, cb.all_gather_bytes(pg.size(), _nbytes(out)))
            if self._is_fake(pg):
                _tile(out, inp, pg.size())

    def _all_gather_lists(self, out_lists, inps, pg) -> None:
        """out_lists[i][j]: slot j of input i."""
        pg = _group(pg)
        for slots, inp in zip(out_lists, inps):
            self._count("all_gather", pg, cb.all_gather_bytes(pg.size(), sum(map(_nbytes, slots))))
            if self._is_fake(pg):
                for s in slots:
                    _write(s, inp)

    def _reduce_scatter(self, outs, inps, pg, op) -> None:
        """inps[i]: one tensor with n chunks along dim 0."""
        pg, op = _group(pg), _op_name(op)
        n = pg.size()
        for out, inp in zip(outs, inps):
            self._count("reduce_scatter", pg, cb.reduce_scatter_bytes(n, _nbytes(inp)))
            if self._is_fake(pg) and out.numel():
                _write(out, _reduced(inp.reshape(n, -1)[pg.rank()].reshape(out.shape), op, n))
        if op == "premul_sum" and self._is_fake(pg):
            self.unknown["reduce_scatter premul_sum factor"] += 1

    def _reduce_scatter_lists(self, outs, in_lists, pg, op) -> None:
        pg, op = _group(pg), _op_name(op)
        for out, chunks in zip(outs, in_lists):
            self._count("reduce_scatter", pg, cb.reduce_scatter_bytes(pg.size(), sum(map(_nbytes, chunks))))
            if self._is_fake(pg):
                _write(out, _reduced(chunks[pg.rank()], op, pg.size()))

    def _all_to_all(self, out, inp, out_splits, in_splits, pg) -> None:
        pg = _group(pg)
        n, rank = pg.size(), pg.rank()
        in_splits = list(in_splits) or [inp.shape[0] // n] * n
        out_splits = list(out_splits) or [out.shape[0] // n] * n
        own = inp.narrow(0, sum(in_splits[:rank]), in_splits[rank])
        self._count("all_to_all", pg, cb.all_to_all_bytes(_nbytes(inp), _nbytes(own)))
        if not self._is_fake(pg):
            return
        own = own.detach().clone()  # the output may alias the input
        for chunk in out.split(out_splits):
            if chunk.shape == own.shape:
                _write(chunk, own)
            else:
                _write(chunk, torch.zeros_like(chunk))
                self.unknown["all_to_all split size"] += 1

    def _all_to_all_lists(self, outs, inps, pg) -> None:
        pg = _group(pg)
        own = inps[pg.rank()]
        self._count("all_to_all", pg, cb.all_to_all_bytes(sum(map(_nbytes, inps)), _nbytes(own)))
        if self._is_fake(pg):
            own = own.detach().clone()
            for o in outs:
                if o.shape == own.shape:
                    _write(o, own)
                else:
                    _write(o, torch.zeros_like(o))
                    self.unknown["all_to_all split size"] += 1

    def _shard_dim_all_to_all(self, out, inp, gather_dim, shard_dim, pg) -> None:
        """DTensor's Shard(gather_dim) -> Shard(shard_dim): n copies of inp concatenated, this rank's chunk."""
        pg = _group(pg)
        n = pg.size()
        self._count("all_to_all", pg, cb.all_to_all_bytes(_nbytes(inp), _nbytes(inp) // n))
        if self._is_fake(pg):
            full = torch.cat([inp.detach()] * n, dim=gather_dim)
            _write(out, full.tensor_split(n, dim=shard_dim)[pg.rank()])

    def _gather(self, out_lists, inps, pg, root) -> None:
        pg = _group(pg)
        on_root = pg.rank() == root
        for i, inp in enumerate(inps):
            self._count("gather", pg, 0 if on_root else _nbytes(inp))
            if on_root and self._is_fake(pg):
                for s in out_lists[i]:
                    _write(s, inp)

    def _scatter(self, outs, in_lists, pg, root) -> None:
        pg = _group(pg)
        on_root = pg.rank() == root
        for i, out in enumerate(outs):
            self._count("scatter", pg, (pg.size() - 1) * _nbytes(out) if on_root else 0)
            if not self._is_fake(pg):
                continue
            if on_root:
                _write(out, in_lists[i][pg.rank()])
            else:
                _write(out, torch.zeros_like(out))
                self.unknown["scatter (not the root)"] += 1

    def _send(self, tensors, pg, dst) -> None:
        pg = _group(pg)
        for t in tensors:
            self._count("send", pg, _nbytes(t))
            if self.mirror_p2p and self._is_fake(pg):
                key = (pg.group_name, (dst - pg.rank()) % pg.size(), tuple(t.shape), t.dtype)
                self._sent[key] = t.detach().clone()

    def _recv(self, tensors, pg, src) -> None:
        """src: the sender's rank in pg, None for recv-from-any-source."""
        pg = _group(pg)
        for t in tensors:
            self._count("recv", pg, 0)
            if not self._is_fake(pg):
                continue
            g_src = dist.get_global_rank(pg, src) if src is not None else -1
            if self.recv_fill is not None and self.recv_fill(t, g_src, pg):
                continue
            key = (pg.group_name, (pg.rank() - src) % pg.size() if src is not None else None, tuple(t.shape), t.dtype)
            if key in self._sent:
                _write(t, self._sent[key])
            else:
                _write(t, torch.zeros_like(t))
                self.unknown["recv"] += 1

    def _barrier(self, pg) -> None:
        self._count("barrier", _group(pg), 0)

    def _batch_p2p(self, ops, peers, tensors, pg, outs) -> None:
        for op, peer, t, o in zip(ops, peers, tensors, outs):
            if op == "isend":
                self._send([t], pg, peer)
            else:
                self._recv([o], pg, peer)

    def _handler_table(self) -> dict:
        """op -> handler(args, kwargs, out); argument positions from the ops' schemas."""
        h: dict = {
            # c10d: the ops torch.distributed's functions dispatch (in-place on their arguments)
            _C.allreduce_.default: lambda a, k, o: self._all_reduce(a[0], a[1], a[2]),
            _C.allreduce_coalesced_.default: lambda a, k, o: self._all_reduce(a[0], a[1], a[2]),
            _C.reduce_.default: lambda a, k, o: self._reduce(a[0], a[1], a[2], a[3]),
            _C.broadcast_.default: lambda a, k, o: self._broadcast(a[0], a[1]),
            _C._allgather_base_.default: lambda a, k, o: self._all_gather([a[0]], [a[1]], a[2]),
            _C.allgather_into_tensor_coalesced_.default: lambda a, k, o: self._all_gather(a[0], a[1], a[2]),
            _C.allgather_.default: lambda a, k, o: self._all_gather_lists(a[0], a[1], a[2]),
            _C.allgather_coalesced_.default: lambda a, k, o: self._all_gather_lists(
                [list(s) for s in zip(*a[0])], a[1], a[2]
            ),
            _C._reduce_scatter_base_.default: lambda a, k, o: self._reduce_scatter([a[0]], [a[1]], a[2], a[3]),
            _C.reduce_scatter_tensor_coalesced_.default: lambda a, k, o: self._reduce_scatter(a[0], a[1], a[2], a[3]),
            _C.reduce_scatter_.default: lambda a, k, o: self._reduce_scatter_lists(a[0], a[1], a[2], a[3]),
            _C.alltoall_base_.default: lambda a, k, o: self._all_to_all(a[0], a[1], a[3], a[4], a[2]),
            _C.alltoall_.default: lambda a, k, o: self._all_to_all_lists(a[0], a[1], a[2]),
            _C.gather_.default: lambda a, k, o: self._gather(a[0], a[1], a[2], a[3]),
            _C.scatter_.default: lambda a, k, o: self._scatter(a[0], a[1], a[2], a[3]),
            _C.send.default: lambda a, k, o: self._send(a[0], a[1], a[2]),
            _C.recv_.default: lambda a, k, o: self._recv(a[0], a[1], a[2]),
            _C.recv_any_source_.default: lambda a, k, o: self._recv(a[0], a[1], None),
            _C.barrier.default: lambda a, k, o: self._barrier(a[1]),
            _C.monitored_barrier_.default: lambda a, k, o: self._barrier(a[1]),
            # functional: a new output tensor (or the input, for the `_` variants); DTensor and FSDP2
            _F.all_reduce.default: lambda a, k, o: self._all_reduce([o], a[2], a[1]),
            _F.all_reduce_.default: lambda a, k, o: self._all_reduce([a[0]], a[2], a[1]),
            _F.all_reduce_coalesced.default: lambda a, k, o: self._all_reduce(o, a[2], a[1]),
            _F.all_reduce_coalesced_.default: lambda a, k, o: self._all_reduce(a[0], a[2], a[1]),
            _F.all_gather_into_tensor.default: lambda a, k, o: self._all_gather([o], [a[0]], a[2]),
            _F.all_gather_into_tensor_out.default: lambda a, k, o: self._all_gather([k["out"]], [a[0]], a[2]),
            _F.all_gather_into_tensor_coalesced.default: lambda a, k, o: self._all_gather(o, a[0], a[2]),
            _F.reduce_scatter_tensor.default: lambda a, k, o: self._reduce_scatter([o], [a[0]], a[3], a[1]),
            _F.reduce_scatter_tensor_out.default: lambda a, k, o: self._reduce_scatter([k["out"]], [a[0]], a[3], a[1]),
            _F.reduce_scatter_tensor_coalesced.default: lambda a, k, o: self._reduce_scatter(o, a[0], a[3], a[1]),
            _F.all_to_all_single.default: lambda a, k, o: self._all_to_all(o, a[0], a[1], a[2], a[3]),
            _F.broadcast.default: lambda a, k, o: self._broadcast([o], a[2]),
            _F.broadcast_.default: lambda a, k, o: self._broadcast([a[0]], a[2]),
            _F.isend.default: lambda a, k, o: self._send([a[0]], a[3], a[1]),
            _F.irecv.default: lambda a, k, o: self._recv([o], a[3], a[1]),
            _F.batch_p2p_ops.default: lambda a, k, o: self._batch_p2p(a[0], a[1], a[3], a[4], o),
            torch.ops._dtensor.shard_dim_alltoall.default: lambda a, k, o: self._shard_dim_all_to_all(
                o, a[0], a[1], a[2], a[3]
            ),
        }
        # the autograd variants decompose into the plain functional ops below autograd; should one be
        # seen whole, it is filled alike
        h[_FA.all_gather_into_tensor.default] = h[_F.all_gather_into_tensor.default]
        h[_FA.reduce_scatter_tensor.default] = h[_F.reduce_scatter_tensor.default]
        h[_FA.all_to_all_single.default] = h[_F.all_to_all_single.default]
        return h

    # ---- object collectives: patched for the duration of the mode (train/planning/fake_objects.py) --------
    def __enter__(self):
        self._patched = patch_object_collectives(self)
        return super().__enter__()

    def __exit__(self, *exc):
        self._patched.close()
        return super().__exit__(*exc)


def static_pipeline_vote(buffer: torch.Tensor, src: int, group) -> bool:
    """A recv_fill for torch's pipeline stages' warm-up vote (an int32 [1] passed stage to stage: 1 where
    every stage was given static metadata, as train/parallel/pipeline.py gives them): what every stage casts."""
    if buffer.dtype == torch.int32 and buffer.numel() == 1:
        buffer.fill_(1)
        return True
    return False


@contextmanager
def fake_process_group(rank: int, world_size: int) -> Iterator[dist.ProcessGroup]:
    """torch's fake process group as the default group for the duration (rank `rank` of `world_size`)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore  # registers the "fake" backend

    dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world_size)
    assert dist.group.WORLD is not None, "init_process_group set the default group"
    try:
        yield dist.group.WORLD
    finally:
        dist.destroy_process_group()
