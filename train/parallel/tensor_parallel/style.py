"""`Sharded`, the one ParallelStyle tensor parallelism adds: a module's parameters become DTensors laid out
by its plan's table, and its own forward, unchanged, runs on this rank's local shards (plain tensors, swapped
into the module for the call: train/parallel/dtensor_internals.py says why that reaches into
nn.Module._parameters), with the sizes it reads (heads, width, ...) set to the local ones meanwhile."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Partial, Placement, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import ParallelStyle

from unroll.train.parallel.tensor_parallel.collectives import AllReduceGrad
from unroll.train.parallel.tensor_parallel.layout import Fused, Layout


def _owner(module: nn.Module, name: str) -> tuple[nn.Module, str]:
    *path, leaf = name.split(".")
    for part in path:
        module = getattr(module, part)
    return module, leaf


_MISSING = object()


@contextlib.contextmanager
def _swapped(module: nn.Module, params: dict[str, torch.Tensor], attrs: dict[str, Any]):
    """Within: the named parameters are the given (local) tensors and the named attributes the given
    values; restored afterwards, whatever happens (FSDP2 may have swapped the parameters themselves in
    before us: we restore exactly what we found)."""
    saved = []
    try:
        for name, value in params.items():
            owner, leaf = _owner(module, name)
            saved.append((owner._parameters, leaf, owner._parameters[leaf]))
            owner._parameters[leaf] = value  # type: ignore[assignment]  # a local tensor for the call (dtensor_internals.py)
        for name, value in attrs.items():
            owner, leaf = _owner(module, name)
            saved.append((owner.__dict__, leaf, owner.__dict__.get(leaf, _MISSING)))
            owner.__dict__[leaf] = value
        yield
    finally:
        for store, key, old in reversed(saved):
            if old is _MISSING:
                del store[key]
            else:
                store[key] = old


def param_of(module: nn.Module, name: str) -> torch.Tensor | None:
    owner, leaf = _owner(module, name)
    return owner._parameters.get(leaf)


def _distribute(module: nn.Module, name: str, layout: Layout, mesh: DeviceMesh) -> None:
    owner, leaf = _owner(module, name)
    param = owner._parameters[leaf]
    assert param is not None, f"{type(module).__name__}.{name}: a layout for a parameter that is None"
    tp = mesh.size()
    if isinstance(layout, Fused):
        layout.check(param.shape, tp, f"{type(module).__name__}.{name}")
        placement = layout.placement(tp)
    else:
        placement = layout
    owner._parameters[leaf] = nn.Parameter(
        distribute_tensor(param.data, mesh, [placement]), requires_grad=param.requires_grad
    )


class Sharded(ParallelStyle):
    """Distributes the module's parameters by `params` (name → layout) and runs its own forward on the
    local shards, with `local` (name → value: sizes, or a replacement forward of a submodule) in place.

    row_parallel=True (a column → row parallel region): the input (a DTensor, or a plain tensor replicated on
    every rank) is redistributed to `compute` and passed on as a local tensor, the module's output (or the
    first of its outputs) holds partial sums and is reduced to `output`, replicated parameters have their
    gradient all-reduced. row_parallel=False: replicated compute, only the parameters' local views swapped in."""

    def __init__(
        self,
        params: Mapping[str, Layout],
        *,
        local: Mapping[str, Any] | None = None,
        row_parallel: bool = True,
        compute: Placement = Replicate(),  # noqa: B008 -- placements are immutable values
        output: Placement = Replicate(),  # noqa: B008
    ):
        super().__init__()
        self.params, self.local, self.row_parallel = params, local or {}, row_parallel
        self.compute, self.output = compute, output

    def _local_param(self, p: DTensor, layout: Layout, mesh: DeviceMesh) -> torch.Tensor:
        stored_whole = p.placements[0].is_replicate()
        t = p.to_local()
        if stored_whole and self.row_parallel:  # every rank's gradient is a part of the whole gradient
            t = AllReduceGrad.apply(t, mesh.get_group())
        if isinstance(layout, Fused) and stored_whole:
            t = layout.select(t, mesh.size(), mesh.get_local_rank())
        return t

    def _enter(self, x: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        if not isinstance(x, DTensor):
            x = DTensor.from_local(x, mesh, [Replicate()], run_check=False)
        compute = self.compute
        if isinstance(compute, Shard) and compute.dim < 0:
            compute = Shard(compute.dim + x.ndim)
        x = x.redistribute(mesh, [compute])
        # With the whole input, each rank's gradient of it is partial: summed (or reduce-scattered) back.
        # With a shard (Shard(-1): block-diagonal heads) only this rank reads it: its gradient is whole.
        return x.to_local(grad_placements=[Partial()] if compute.is_replicate() else None)

    def _leave(self, y: torch.Tensor, mesh: DeviceMesh) -> torch.Tensor:
        y = DTensor.from_local(y, mesh, [Partial()], run_check=False)
        return y.redistribute(mesh, [self.output]).to_local()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        mesh = device_mesh
        for name, layout in self.params.items():
            _distribute(module, name, layout, mesh)
        inner = module.forward

        def forward(x, *args, **kwargs):
            if self.row_parallel:
                x = self._enter(x, mesh)
            local = {
                name: self._local_param(param_of(module, name), layout, mesh) for name, layout in self.params.items()
            }
            with _swapped(module, local, self.local):
                out = inner(x, *args, **kwargs)
            if self.row_parallel:
                out = (self._leave(out[0], mesh), *out[1:]) if isinstance(out, tuple) else self._leave(out, mesh)
            return out

        module.forward = forward
        return module
