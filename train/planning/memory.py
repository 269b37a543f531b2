"""What one rank's training step holds in memory, measured, by component (used by `unroll rehearse`).

    weights       this rank's parameters and buffers as allocated (local shards; counted from the objects)
    gradients     their gradients after the step's backward (from the objects)
    optimizer     the optimizer's state after its step (from the objects)
    gathered      the largest moment of FSDP's unsharded parameters, all-gather outputs, unsharded gradients
                  and reduce-scatter inputs, plus the output matrix's gradient that the loss's backward
                  leaves waiting through the blocks' (with tied embeddings autograd holds it until the
                  embedding's own gradient joins it)
    activations   the largest moment, outside the loss, of the tensors the step made besides the above: what
                  autograd keeps for the backward, recomputed blocks, the gradients of activations, inputs
    logits        the chunked loss on its own (models/lm.py, kernels/cross_entropy.py): its largest moment
                  over the hidden states it starts from

The dynamic ones come from torch's memory tracker (`torch.distributed._tools`: FSDPMemTracker when the model
is FSDP-sharded, MemTracker otherwise), which sees every tensor storage the step allocates or frees and
sorts it by kind; `Phases` follows its running totals through the step's phases (forward, the loss,
backward: hooks on the model mark them) and keeps each phase's largest. `peak` is the tracker's largest
total. Tensor storages only: no allocator rounding, fragmentation, CUDA context or NCCL buffers.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

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


def storage_bytes(tensors) -> int:
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


def weight_bytes(modules: Sequence[nn.Module]) -> int:
    return storage_bytes([t for m in modules for t in list(m.parameters()) + list(m.buffers())])


def gradient_bytes(modules: Sequence[nn.Module]) -> int:
    return storage_bytes([p.grad for m in modules for p in m.parameters()])


def optimizer_bytes(optimizer: torch.optim.Optimizer) -> int:
    return storage_bytes(
        [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    )


if TYPE_CHECKING:  # a mixin of MemTracker's subclasses: what it reads of them is MemTracker's
    _PhasesBase = MemTracker
else:
    _PhasesBase = object


class Phases(_PhasesBase):
    """Largest running totals per phase of a step, kept by a tracker as it updates (a mixin of the trackers
    below). The phases: forward; loss (the loss's forward and backward); backward (the blocks'); embedding
    (the embedding's backward, after the first block's). Entering the backward from the loss notes the
    temporaries the loss leaves behind (`waiting`), which the backward's transient peak does not count and
    the gathered peak does; the embedding's backward is the root's gradient being summed (the output
    matrix's, waiting, and the lookup's): gathered memory too."""

    def _start_phases(self) -> None:
        self.phase = "forward"
        self.transient = {"forward": 0, "loss": 0, "backward": 0, "embedding": 0}
        self.gathered = 0
        self.waiting = 0
        self.embedding_moment = 0  # gathered, the loss's waiting gradient and what the embedding's backward adds
        self._before_embedding = 0

    def _sums(self) -> tuple[int, int, int]:
        transient = gathered = temp = 0
        for snap in self._curr_mem_snap.values():
            transient += snapshot_sums({0: snap}, TRANSIENT)
            gathered += snapshot_sums({0: snap}, GATHERED)
            temp += snapshot_sums({0: snap}, {"Temp"})
        return transient, gathered, temp

    def enter(self, phase: str) -> None:
        if phase == "backward" and self.phase == "loss":
            self.waiting = max(self.waiting, self._sums()[2])
        if phase == "embedding":  # what is transient already (other micro-batches in flight) is not its
            self._before_embedding = self._sums()[0]
        self.phase = phase

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if out is NotImplemented:
            return out
        if getattr(self, "inside_fsdp", None) is not None:  # FSDP's own allocations (see _Tracker)
            if not _aliases(func):  # not a view or an in-place op: FSDP's hooks view the blocks' outputs
                self._allocated_by_fsdp(out)
            self._allocated_by_fsdp((kwargs or {}).get("out", []))
        # An empty allocation is a buffer about to be filled: counted at the op that fills it, by then sorted.
        if func not in _ALLOCATIONS:
            self._note_peaks()
        return out

    def _archive_next_micro_batch(self, module) -> None:
        """A root's next forward in the same step (a micro-batch), which torch's trackers refuse as a next
        iteration: its earlier per-module statistics are dropped (the phases' running totals are what is read)."""
        if module in self.memory_tracking and not self._mod_tracker.is_bw:
            name = self._mod_tracker.get_known_fqn(module)
            if set(self._mod_tracker.parents) - {name} == {"Global"}:
                del self.memory_tracking[module]

    def _note_peaks(self) -> None:
        transient, gathered, _ = self._sums()
        held = transient - (self.waiting if self.phase == "backward" else 0)
        self.transient[self.phase] = max(self.transient[self.phase], held)
        self.gathered = max(self.gathered, gathered)
        if self.phase == "embedding":
            grown = transient - self._before_embedding
            self.embedding_moment = max(self.embedding_moment, gathered + self.waiting + grown)


def _aliases(func) -> bool:
    """Whether the op returns (a view of) one of its inputs rather than new memory."""
    return any(r.alias_info is not None for r in func._schema.returns)


_A = torch.ops.aten
_ALLOCATIONS = {_A.empty.memory_format, _A.empty_strided.default, _A.new_empty.default, _A.new_empty_strided.default}


class Tracker(Phases, MemTracker):
    """torch's MemTracker, also for tensor parallelism: inside a tp module's forward its parameters are
    local views (not leaves: train/parallel/tensor_parallel/style.py swaps them in), on which no gradient hook can be
    registered; the DTensor leaves behind them were registered when the model's own forward began."""

    def __init__(self):
        super().__init__()
        self._start_phases()

    def _pre_fw_hook(self, module, inputs):
        self._archive_next_micro_batch(module)
        return super()._pre_fw_hook(module, inputs)

    def _track_module_params_and_buffers(self, module, install_grad_hooks=True):
        leaves = all(p.is_leaf for p in module.parameters())
        with warnings.catch_warnings():  # it reads .grad of those views too, which torch warns about
            warnings.filterwarnings("ignore", message="The .grad attribute of a Tensor that is not a leaf")
            return super()._track_module_params_and_buffers(module, install_grad_hooks=install_grad_hooks and leaves)


class _Tracker(Phases, FSDPMemTracker):
    """FSDPMemTracker over several FSDP roots (a pipeline rank's stages), which torch's takes one of; whose
    roots may run several forwards in a step (micro-batches: torch's refuses a root's second forward as a
    next iteration; the earlier per-module statistics are dropped); and for which whatever FSDP allocates
    inside its own hooks (all-gather buffers and the unsharded parameters they are copied into, the
    prefetch of the next block, reduce-scatter inputs, accumulated unsharded gradients) is gathered
    memory from the moment it exists, where torch's sorts part of it only after the hook has returned."""

    def __init__(self, roots: Sequence[nn.Module], optimizer: torch.optim.Optimizer):
        MemTracker.__init__(self)
        self._root_mod = nn.ModuleList(roots)  # type: ignore[assignment]  # walked for the FSDP modules to instrument
        self._optm = optimizer
        self._fsdp_mod_to_saved_methods = WeakIdKeyDictionary()
        self._fsdp_state = _FSDPState.PRE_FW
        self._ref_class = _FSDPRefType
        self._hooked = WeakIdKeyDictionary()  # unsharded parameters → their gradient hook
        self._start_phases()
        self.inside_fsdp: _FSDPRefType | None = None  # set while an FSDP hook runs: what it allocates is this
        # parameters FSDP leaves alone (expert parallelism's experts) get plain gradients: gradients, not
        # temporaries (the hooks stay with the parameters, which a rehearsal does not keep)
        for root in roots:
            for p in root.parameters():
                if not isinstance(p, DTensor) and p.requires_grad:
                    p.register_post_accumulate_grad_hook(self._plain_gradient)

    def _plain_gradient(self, param: torch.Tensor) -> None:
        assert param.grad is not None, "called after the gradient was accumulated"
        self._update_and_maybe_create_winfos(param.grad, _FSDPRefType.SHARDED_GRAD)

    def _allocated_by_fsdp(self, out) -> None:
        if self.inside_fsdp is not None:
            for t in out if isinstance(out, (list, tuple)) else [out]:
                if isinstance(t, torch.Tensor) and t.untyped_storage().nbytes():
                    self._update_and_maybe_create_winfos(t, self.inside_fsdp)

    def _within(self, kind: _FSDPRefType, hook):
        def run(*args, **kwargs):
            outer, self.inside_fsdp = self.inside_fsdp, kind
            try:
                return hook(*args, **kwargs)
            finally:
                self.inside_fsdp = outer

        return run

    def _fsdp_state_pre_forward(self, fsdp_mod, orig_fsdp_state_pre_fw):
        inner = super()._fsdp_state_pre_forward(fsdp_mod, self._within(_FSDPRefType.ALL_GATHER, orig_fsdp_state_pre_fw))

        def again(*args, **kwargs):
            self._archive_next_micro_batch(fsdp_mod)
            return inner(*args, **kwargs)

        return again

    def _fsdp_param_group_pre_backward(self, fsdp_mod, orig_fsdp_param_group_pre_backward):
        inner = super()._fsdp_param_group_pre_backward(
            fsdp_mod, self._within(_FSDPRefType.ALL_GATHER, orig_fsdp_param_group_pre_backward)
        )

        def and_gradients(*args, **kwargs):
            inner(*args, **kwargs)
            # the block's unsharded gradients, as autograd makes them, are FSDP's (torch's tracker sorts them
            # only in the post-backward hook; until then a block's worth would count as temporaries)
            for fsdp_param in _fsdp_params(fsdp_mod):
                param = fsdp_param.unsharded_param
                if param.requires_grad and param not in self._hooked:
                    self._hooked[param] = param.register_post_accumulate_grad_hook(self._unsharded_gradient)

        return and_gradients

    def _unsharded_gradient(self, param: torch.Tensor) -> None:
        assert param.grad is not None, "called after the gradient was accumulated"
        self._update_and_maybe_create_winfos(param.grad, _FSDPRefType.UNSHARDED_GRAD)
        self._note_peaks()

    def _fsdp_param_group_post_backward(self, fsdp_mod, orig_fsdp_param_group_post_backward):
        inner = super()._fsdp_param_group_post_backward(
            fsdp_mod, self._within(_FSDPRefType.REDUCE_SCATTER, orig_fsdp_param_group_post_backward)
        )

        def also_accumulated(*args, **kwargs):
            inner(*args, **kwargs)
            # without a reduction (torch's pipeline schedules until a stage's last micro-batch) FSDP adds
            # each micro-batch's gradient into an unsharded fp32 copy: a gathered gradient, not a temporary
            for fsdp_param in _fsdp_params(fsdp_mod):
                if fsdp_param.unsharded_accumulated_grad is not None:
                    self._update_and_maybe_create_winfos(
                        fsdp_param.unsharded_accumulated_grad, _FSDPRefType.UNSHARDED_GRAD
                    )

        return also_accumulated


def _fsdp_params(fsdp_mod) -> list:
    """The FSDPParams of an FSDP2 module's own parameter group (none without one)."""
    group = fsdp_mod._get_fsdp_state()._fsdp_param_group
    return group.fsdp_params if group else []


def tracker_for(roots: Sequence[nn.Module], optimizer: torch.optim.Optimizer) -> Tracker | _Tracker:
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


def mark_phases(tracker: Phases, parts: Sequence[nn.Module]) -> list:
    """Hooks marking the step's phases on `parts` (the LM, or a rank's pipeline stages): a forward begins,
    the final norm starts the loss, the loss's backward ends at the norm's input gradient and the blocks'
    backward follows, the first block's input gradient hands over to the embedding's backward; a stage
    without the loss goes from forward to backward. Returns the handles."""
    handles = []
    for part in parts:
        handles.append(part.register_forward_pre_hook(lambda *_: tracker.enter("forward")))
        norm = getattr(part, "norm", None)
        if norm is not None:  # the loss is computed here
            handles.append(norm.register_forward_pre_hook(lambda *_: tracker.enter("loss")))
            handles.append(norm.register_full_backward_hook(lambda *_: tracker.enter("backward")))
        else:
            handles.append(part.register_full_backward_pre_hook(lambda *_: tracker.enter("backward")))
        blocks = part.get_submodule("blocks")
        if (
            getattr(part, "embed", None) is not None
            and isinstance(blocks, (nn.ModuleList, nn.ModuleDict))
            and len(blocks)
        ):
            first = blocks[0] if isinstance(blocks, nn.ModuleList) else next(iter(blocks.values()))
            handles.append(first.register_full_backward_hook(lambda *_: tracker.enter("embedding")))
    return handles


def dynamic_peaks(tracker: Phases) -> tuple[int, int, int]:
    """(gathered, activations, total) of a tracked step (module docstring); total: the tracker's largest."""
    peak = tracker.get_tracker_snapshot("peak")
    total = sum(cats.get("Total", 0) for cats in peak.values())
    activations = max(tracker.transient["forward"], tracker.transient["backward"])
    return max(tracker.gathered + tracker.waiting, tracker.embedding_moment), activations, total
