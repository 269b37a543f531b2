"""What one rank's training step holds in memory, measured, by component (used by `unroll rehearse`).

    weights       this rank's parameters and buffers as allocated (local shards; counted from the objects)
    gradients     their gradients after the step's backward (from the objects)
    optimizer     the optimizer's state after its step (from the objects)
    gathered      the largest moment of FSDP's unsharded parameters, all-gather outputs, unsharded gradients
                  and reduce-scatter inputs (0 without FSDP)
    activations   the largest moment, inside any block's forward or backward, of the tensors the step
                  made besides the above: what autograd keeps for the backward, recomputed blocks, the
                  gradients of activations, the inputs; the loss's logits are not inside a block
    logits        the chunked loss on its own (models/lm.py, kernels/cross_entropy.py): its largest moment
                  over the hidden states it starts from

The dynamic ones come from torch's memory tracker (`torch.distributed._tools`, FSDPMemTracker when the
model is FSDP-sharded, MemTracker otherwise), which records every tensor storage the step allocates
and the moments around each module's forward and backward; `peak` is its largest total. Tensor storages
only: no allocator rounding, fragmentation, CUDA context or NCCL buffers (a GPU's own overheads).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass, fields

import torch
from torch import nn
from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker, _FSDPRefType, _FSDPState
from torch.distributed._tools.mem_tracker import MemTracker
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor
from torch.utils.weak import WeakIdKeyDictionary

GATHERED = {"Unsharded Param", "All Gather", "Unsharded Grad", "Reduce Scatter"}
TRANSIENT = {"Activation", "Temp", "Inputs", "Other"}


@dataclass
class Components:
    weights: float = 0.0
    gradients: float = 0.0
    optimizer: float = 0.0
    gathered: float = 0.0
    activations: float = 0.0
    logits: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @property
    def total(self) -> float:
        return sum(self.as_dict().values())


def _storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (local shards of DTensors)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or t.device.type == "meta":
            continue
        t = t.to_local() if isinstance(t, DTensor) else t
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


def weight_bytes(modules: list[nn.Module]) -> int:
    return _storage_bytes([t for m in modules for t in list(m.parameters()) + list(m.buffers())])


def gradient_bytes(modules: list[nn.Module]) -> int:
    return _storage_bytes([p.grad for m in modules for p in m.parameters()])


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return _storage_bytes([v for state in optimizer.state.values() for v in state.values()
                           if isinstance(v, torch.Tensor)])


class Tracker(MemTracker):
    """torch's MemTracker, also for tensor parallelism: inside a tp module's forward its parameters are
    local views (not leaves: train/tensor_parallel.py swaps them in), on which no gradient hook can be
    registered; the DTensor leaves behind them were registered when the model's own forward began."""

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        leaves = all(p.is_leaf for p in module.parameters())
        with warnings.catch_warnings():  # it reads .grad of those views too, which torch warns about
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            return super()._track_module_params_and_buffers(module, install_grad_hooks=install_grad_hooks and leaves)


class _Tracker(FSDPMemTracker):
    """FSDPMemTracker over several FSDP roots (a pipeline rank's stages), which torch's takes one of, and
    whose roots may run several forwards in a step (micro-batches: torch's refuses a root's second forward
    as a next iteration); a root's earlier statistics are kept in `archived`."""

    def __init__(self, roots: list[nn.Module], optimizer: torch.optim.Optimizer):
        MemTracker.__init__(self)
        self._root_mod = nn.ModuleList(roots)  # walked for the FSDP modules to instrument
        self._optm = optimizer
        self._fsdp_mod_to_saved_methods = WeakIdKeyDictionary()
        self._fsdp_state = _FSDPState.PRE_FW
        self._ref_class = _FSDPRefType
        self.archived: list = []

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, orig_fsdp_state_pre_fw)

        def again(*args, **kwargs):
            if fsdp_mod in self.memory_tracking and not self._mod_tracker.is_bw:
                parents = self._mod_tracker.parents - {self._mod_tracker.get_known_fqn(fsdp_mod)}
                if parents == {"Global"}:  # a root's next micro-batch
                    self.archived.append((fsdp_mod, self.memory_tracking.pop(fsdp_mod)))
            return inner(*args, **kwargs)

        return again

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_fsdp_param_group_post_backward):
        inner = super()._fsdp_param_group_post_backward(fsdp_mod, orig_fsdp_param_group_post_backward)

        def also_accumulated(*args, **kwargs):
            inner(*args, **kwargs)
            # without a reduction (torch's pipeline schedules until a stage's last micro-batch) FSDP adds
            # each micro-batch's gradient into an unsharded fp32 copy: a gathered gradient, not a temporary
            group = fsdp_mod._get_fsdp_state()._fsdp_param_group
            for fsdp_param in group.fsdp_params if group else ():
                if fsdp_param.unsharded_accumulated_grad is not None:
                    self._update_and_maybe_create_winfos(fsdp_param.unsharded_accumulated_grad,
                                                         _FSDPRefType.UNSHARDED_GRAD)

        return also_accumulated


def tracker_for(roots: list[nn.Module], optimizer: torch.optim.Optimizer) -> MemTracker:
    if any(isinstance(m, FSDPModule) for root in roots for m in root.modules()):
        return _Tracker(roots, optimizer)
    tracker = Tracker()
    tracker.track_external(*roots, optimizer)
    return tracker


def _category(key) -> str:
    return key if isinstance(key, str) else key.value


def snapshot_sums(snapshot: dict, names: set[str]) -> int:
    """Bytes of the named categories in a tracker snapshot ({device: {category: bytes}})."""
    return sum(v for cats in snapshot.values() for k, v in cats.items() if _category(k) in names)


def dynamic_peaks(tracker: MemTracker, blocks: list[nn.Module]) -> tuple[int, int, int]:
    """(gathered, activations, total): the largest gathered bytes at any recorded moment, the largest
    transient bytes at a moment of one of `blocks`, and the tracker's overall peak."""
    gathered = activations = 0
    block_ids = {id(b) for b in blocks}
    for module, stats in list(tracker.memory_tracking.items()) + getattr(tracker, "archived", []):
        for snapshots in stats.snapshots.values():
            for snap in snapshots:
                gathered = max(gathered, snapshot_sums(snap, GATHERED))
                if id(module) in block_ids:
                    activations = max(activations, snapshot_sums(snap, TRANSIENT))
    peak = tracker.get_tracker_snapshot("peak")
    gathered = max(gathered, snapshot_sums(peak, GATHERED))
    total = sum(cats.get("Total", 0) for cats in peak.values())
    return gathered, activations, total
