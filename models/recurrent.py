"""What the ParaRNN mixers share: a (head-block-diagonal) input projection computed once for the whole
sequence, a recurrence solved by Newton or sequentially, an output projection, and token-by-token steps.

Subclasses give the cell (`make_cell`), its Jacobian structure and its per-channel state size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

import torch
from torch import nn

from unroll.kernels import newton_solve, sequential_solve
from unroll.kernels.context import receive_state, send_state
from unroll.kernels.newton import SolveInfo
from unroll.kernels.seqpar_newton import newton_solve_seqpar
from unroll.models.context_parallel import ContextParallel
from unroll.models.init import Rule, constant, normal

if TYPE_CHECKING:
    from unroll.kernels.fused_newton import SolveStats  # imports Triton

# A state's Jacobian structure, as the solvers take it: "diag", or ("block", k) for k-vectors.
Structure = str | tuple[str, int]


class RecurrentCell(Protocol):
    """cell(h_prev, u) -> h for [B, T, ...] tensors (or one step), with its Jacobian ∂h/∂h_prev."""

    def __call__(self, h_prev: torch.Tensor, u: torch.Tensor, /) -> torch.Tensor: ...

    def value_and_jacobian(self, h_prev: torch.Tensor, u: torch.Tensor, /) -> tuple[torch.Tensor, torch.Tensor]: ...

    def jacobian(self, h_prev: torch.Tensor, u: torch.Tensor, /) -> torch.Tensor: ...


def pick_solver(solver: str, device: torch.device, batch: int, length: int, width: int, state_size: int = 1) -> str:
    """`auto`: Newton where its parallel scans beat a T-step loop. Always on GPU, where the loop is
    launch-bound. On CPU only when each step has little work (batch × width × state ≤ 512 numbers) and
    the sequence is long: with two cores, Newton's ~3 passes over the whole [B, T, D] tensor cost more
    than the loop as soon as a step's work amortises the loop's overhead (`unroll bench solver`)."""
    if solver != "auto":
        return solver
    if device.type == "cuda":
        return "newton"
    return "newton" if length >= 256 and batch * width * state_size <= 512 else "sequential"


class HeadLinear(nn.Module):
    """y = B x + b with B block-diagonal over `heads` (each head maps its d/heads inputs to its share of
    every gate); heads=1 is a dense projection. Output [..., gates, width]."""

    def __init__(self, d_model: int, gates: int, width: int, heads: int, init_std: float):
        super().__init__()
        self.gates, self.width, self.heads, self.init_std = gates, width, heads, init_std
        self.weight = nn.Parameter(torch.empty(heads, gates, width // heads, d_model // heads))
        self.bias = nn.Parameter(torch.empty(gates, width))

    def init_rules(self) -> dict[str, Rule]:
        return {
            "weight": normal(self.init_std * self.heads**0.5),  # the same output scale as dense
            "bias": constant(0.0),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.heads == 1:  # one dense matmul (einsum would route through a slower batched path)
            y = torch.nn.functional.linear(x, self.weight.flatten(0, 2))
            return torch.unflatten(y, -1, (self.gates, self.width)) + self.bias
        xh = torch.unflatten(x, -1, (self.heads, -1))  # [..., H, d/H]
        y = torch.einsum("...hi,hgji->...ghj", xh, self.weight)  # [..., gates, H, width/H]
        return y.flatten(-2) + self.bias


class RecurrentMixer(ContextParallel, nn.Module):
    """Context parallelism: Newton runs sequence-parallel over the context group, the sequential loop as a
    state hand-off pipeline (the previous rank's last state in, this rank's out)."""

    gates: int  # input pre-activations per channel
    state_size: int  # 1 for a scalar state per channel ("diag"), k for k-vectors (("block", k))

    def __init__(
        self,
        d_model: int,
        width: int,
        *,
        heads: int = 1,
        solver: str = "auto",
        newton_kernel: str = "auto",
        newton_damping: str = "trust_region",
        init_std: float = 0.02,
        rnn_init: float = 0.5,
        out_std: float | None = None,
    ):
        super().__init__()
        self.width, self.solver, self.newton_kernel = width, solver, newton_kernel
        self.rnn_init = rnn_init  # the recurrent coefficients' init half-width (a subclass's init_rules)
        self.newton_damping = newton_damping  # kernels/newton_damping.py; the fused kernel's unsolved sequences get it
        self.in_proj = HeadLinear(d_model, self.gates, width, heads, init_std)
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.out_std = out_std or init_std
        # how the last forward solved its recurrence (for metrics)
        self.last_solve: SolveInfo | SolveStats | None = None

    def init_rules(self) -> dict[str, Rule]:
        return {"out_proj.weight": normal(self.out_std)}

    # --- for subclasses ---------------------------------------------------------------------------
    @property
    def structure(self) -> Structure:
        return "diag" if self.state_size == 1 else ("block", self.state_size)

    def make_cell(self) -> RecurrentCell:
        """The cell with this module's parameters: cell(h_prev, u) -> h, for [B, T, ...] tensors."""
        raise NotImplementedError

    def readout(self, h: torch.Tensor) -> torch.Tensor:
        """What the output projection sees from the state [..., D] or [..., D, k]."""
        return h

    # --- shared -------------------------------------------------------------------------------------
    def recurrence_inputs(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., d_model] -> the recurrence's inputs u [..., gates, width], in at least float32."""
        # The recurrence runs in at least float32 even under bf16 autocast: rounding errors compound
        # over the sequence, while the projections around it are where low precision pays.
        u: torch.Tensor = self.in_proj(x)
        return u.to(torch.promote_types(u.dtype, torch.float32))

    def initial_state(self, state: torch.Tensor | None, u: torch.Tensor) -> torch.Tensor:
        """`state` in u's dtype, or zeros [B, width] ([B, width, k] for k-vector states) when None."""
        shape = (u.shape[0], self.width) + ((self.state_size,) if self.state_size > 1 else ())
        return state.to(u.dtype) if state is not None else u.new_zeros(shape)

    def forward(
        self, x: torch.Tensor, state: torch.Tensor | None = None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, T, d_model] → (y [B, T, d_model], state after the last step). resets [B, T]: the state before
        a document's first step is zero (the solvers' resets; at t = 0 the incoming or handed-over state is
        dropped)."""
        u = self.recurrence_inputs(x)
        h0 = self.initial_state(state, u)
        solver = pick_solver(self.solver, x.device, x.shape[0], x.shape[1], self.width, self.state_size)
        group = self.context_group
        if group is not None and solver == "newton":
            h, self.last_solve = newton_solve_seqpar(
                self.make_cell(),
                u,
                h0,
                group=group,
                structure=self.structure,
                resets=resets,
                damping=self.newton_damping,
                compiled=self.newton_kernel == "compiled",
            )
        elif group is not None:  # the previous rank's last state in, ours out to the next rank
            h, self.last_solve = sequential_solve(
                self.make_cell(), u, receive_state(h0, group, anchor=u), structure=self.structure, resets=resets
            )
            return self.out_proj(self.readout(h)) + send_state(h[:, -1], group), h[:, -1]
        elif solver == "newton" and self.fused(u.device):
            from unroll.kernels.fused_newton import fused_newton_solve  # imports Triton: only where it runs

            h, self.last_solve = fused_newton_solve(self.make_cell(), u, h0, resets=resets, damping=self.newton_damping)
        elif solver == "newton":
            h, self.last_solve = newton_solve(
                self.make_cell(),
                u,
                h0,
                structure=self.structure,
                resets=resets,
                damping=self.newton_damping,
                compiled=self.newton_kernel == "compiled",
            )
        else:
            h, self.last_solve = sequential_solve(self.make_cell(), u, h0, structure=self.structure, resets=resets)
        last = h[:, -1] if h.shape[1] else h0
        return self.out_proj(self.readout(h)), last

    def fused(self, device: torch.device) -> bool:
        """Whether Newton runs as the fused kernel (kernels/fused_newton.py): newton_kernel=fused, or auto on a
        CUDA device, for a cell that has one (the context-parallel solver is never fused)."""
        has_one = hasattr(self.make_cell(), "fused_kernel")
        if self.newton_kernel == "fused":
            if not has_one:
                raise ValueError(f"newton_kernel=fused: {type(self).__name__}'s cell has no fused kernel")
            return True
        return self.newton_kernel == "auto" and device.type == "cuda" and has_one

    def step(self, x: torch.Tensor, state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """One token: x [B, d_model] → (y [B, d_model], state)."""
        u = self.recurrence_inputs(x)
        h = self.make_cell()(self.initial_state(state, u).unsqueeze(1), u.unsqueeze(1)).squeeze(1)
        return self.out_proj(self.readout(h)), h

    def extra_repr(self) -> str:
        return (
            f"width={self.width}, heads={self.in_proj.heads}, solver={self.solver}, newton_kernel={self.newton_kernel}"
        )
