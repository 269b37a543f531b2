"""M²RNN (Mishra et al., 2026): a matrix-valued nonlinear recurrent state per value head.

Per token, one input projection gives q, k (K per q/k head), v (V per value head), a forget input a (one
per value head) and an output gate g (V per value head); q, k, v go through a causal depthwise
convolution and SiLU. With f = exp(−exp(A_log)·softplus(a + dt_bias)) per head:

    H_t = f·H_{t−1} + (1 − f)·tanh(H_{t−1} W + k_t v_tᵀ)      H ∈ R^{K×V}, W ∈ R^{V×V} per value head
    y_t = q_tᵀ H_t + D ⊙ v_t
    out = W_o · RMSNorm(y ⊙ SiLU(g))  (the norm over all heads together)

Where this differs from the authors' code (lm-engine's M²RNN layer, xma's recurrence; the outputs, states and
gradients agree with theirs on the same weights): the convolution is initialised as theirs, N(0, init_std)
(`conv_init="reference"`, the default; `"torch"` is torch's Conv1d default, ~14× larger). Their training
configs clip the state gradient at 1 (`gradient_clipping`); here `state_grad_clip` c does the same (the
backward clamps the gradient carried back into H_t from later steps to [−c, c] at every step,
kernels/m2rnn_scan.py; the forward is unchanged) but is off by default: the Newton solver has no clipped
adjoint, so a default of 1 would make the two solvers train differently, and on the state-tracking bench it
changed nothing measurable (`unroll bench state-tracking --set m2rnn.state_grad_clip=1`). Sequential solver
only.

q/k heads are shared by v_heads / qk_heads value heads each (GQA-like). Two ways to train, selectable
(`solver`) and tested equal: the sequential kernel (Triton on CUDA, a PyTorch loop on CPU) and the
Newton solver. For Newton, the K rows of each head's H are independent V-vectors (row i of H_{t−1}W +
k_t v_tᵀ depends on row i of H_{t−1} only), so the state is [B, H·K, V] with V×V Jacobian blocks
    ∂h_i,t/∂h_i,t−1 = f·I + (1 − f)·diag(1 − u_i²)·Wᵀ,   u = tanh(H_{t−1}W + k_t v_tᵀ).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from unroll.kernels import newton_solve
from unroll.kernels.context import previous_tail, receive_state, send_state
from unroll.kernels.m2rnn_scan import m2rnn_sequential
from unroll.kernels.newton import SolveInfo
from unroll.kernels.seqpar_newton import newton_solve_seqpar
from unroll.models.context_parallel import ContextParallel
from unroll.models.init import Draws, Rule, constant, identity, init_eagerly, normal, uniform


@dataclass
class M2RNNState:
    conv: torch.Tensor  # [B, conv channels, conv − 1]: the last inputs of the convolution
    h: torch.Tensor  # [B, v_heads, K, V]: the matrix state after the last token


class M2RNNCell:
    """The recurrence on the Newton solver's layout: state h [..., H·K, V] (rows of every head's matrix),
    input u [..., H·K, V + 1] = (row i of k_t v_tᵀ, f_t of the row's head)."""

    def __init__(self, W: torch.Tensor, k_dim: int):
        self.W, self.k_dim = W, k_dim

    def _update(self, h_prev: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        H, V = self.W.shape[0], self.W.shape[-1]
        rows = torch.unflatten(h_prev, -2, (H, self.k_dim))  # [..., H, K, V]
        z = (rows @ self.W).flatten(-3, -2) + u[..., :V]
        return torch.tanh(z), u[..., V:]  # (tanh(H W + k vᵀ) rows, f)

    def __call__(self, h_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        c, f = self._update(h_prev, u)
        return f * h_prev + (1 - f) * c

    def value_and_jacobian(self, h_prev: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        c, f = self._update(h_prev, u)
        H, V = self.W.shape[0], self.W.shape[-1]
        wt = self.W.transpose(-1, -2).unsqueeze(1).expand(H, self.k_dim, V, V).reshape(H * self.k_dim, V, V)
        eye = torch.eye(V, dtype=h_prev.dtype, device=h_prev.device)
        J = f.unsqueeze(-1) * eye + ((1 - f) * (1 - c * c)).unsqueeze(-1) * wt
        return f * h_prev + (1 - f) * c, J

    def jacobian(self, h_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.value_and_jacobian(h_prev, u)[1]


def pick_m2rnn_solver(solver: str) -> str:
    """`auto` is the sequential kernel everywhere: its work per step is one K×V·V×V product per head,
    while a Newton iteration scans V×V Jacobian blocks for every row (V times the work, V·T·K·V² memory).
    Newton stays selectable for the sequence-parallel path and for checking."""
    return "sequential" if solver == "auto" else solver


def _last_document_only(inputs: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """inputs [B, C, n] (a convolution's last inputs) zeroed where their document ids [B, n] are not the last
    one's: what a later call, or the next context rank, may still see."""
    return inputs * (ids == ids[:, -1:]).unsqueeze(1).to(inputs.dtype)


class M2RNN(ContextParallel, nn.Module):
    """Context parallelism: the convolution takes the previous rank's last inputs, the sequential
    recurrence its final state (a hand-off pipeline); Newton runs sequence-parallel."""

    def __init__(
        self,
        d_model: int,
        *,
        k_dim: int = 64,
        v_dim: int = 16,
        qk_heads: int = 1,
        v_heads: int = 0,
        conv: int = 4,
        solver: str = "auto",
        newton_damping: str = "trust_region",
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_std: float | None = None,
        conv_init: str = "reference",
        state_grad_clip: float | None = None,
    ):
        super().__init__()
        if conv_init not in ("reference", "torch"):
            raise ValueError(f"conv_init must be 'reference' or 'torch', got {conv_init!r}")
        if state_grad_clip is not None and solver == "newton":
            raise ValueError("state_grad_clip: the Newton solver does not clip the state gradient")
        self.conv_init, self.state_grad_clip = conv_init, state_grad_clip
        v_heads = v_heads or d_model // v_dim
        if v_heads % qk_heads:
            raise ValueError(f"v_heads={v_heads} is not a multiple of qk_heads={qk_heads}")
        self.k_dim, self.v_dim, self.qk_heads, self.v_heads = k_dim, v_dim, qk_heads, v_heads
        self.solver, self.conv_width, self.newton_damping = solver, conv, newton_damping
        self.conv_channels = 2 * qk_heads * k_dim + v_heads * v_dim  # q, k, v
        value = v_heads * v_dim
        self.in_proj = nn.Linear(d_model, self.conv_channels + v_heads + value, bias=False)  # q k v | a | g
        self.conv = nn.Conv1d(self.conv_channels, self.conv_channels, conv, groups=self.conv_channels, bias=False)
        self.A_log = nn.Parameter(torch.empty(v_heads))
        self.dt_bias = nn.Parameter(torch.empty(v_heads))
        self.D = nn.Parameter(torch.empty(v_heads, v_dim))
        self.W = nn.Parameter(torch.empty(v_heads, v_dim, v_dim))
        self.norm = nn.RMSNorm(value, eps=norm_eps)
        self.out_proj = nn.Linear(value, d_model, bias=False)
        self.init_std, self.out_std = init_std, out_std or init_std
        self.last_solve: SolveInfo | None = None
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        """The paper's init: W = I, D = 1, A ~ U[0, 16] stored as log A, dt log-uniform in [1e-3, 0.1] with
        dt_bias = softplus⁻¹(dt) (so f starts between exp(−1.6) and ~1: a spread of memory lengths). The
        depthwise convolution N(0, init_std) as the authors' code (lm-engine) initialises it
        (`conv_init="reference"`, the default); `conv_init="torch"` is torch's Conv1d default U(±1/√width),
        ~14× larger at width 4 and std 0.02, this module's default before the state-tracking bench showed
        the difference (launch/bench/state_tracking.py)."""

        def dt_bias(d: Draws) -> torch.Tensor:
            dt = torch.exp(d.uniform(math.log(1e-3), math.log(0.1)))
            return dt + torch.log(-torch.expm1(-dt))  # softplus⁻¹(dt)

        bound = 1 / math.sqrt(self.conv_width)
        return {
            "in_proj.weight": normal(self.init_std),
            "out_proj.weight": normal(self.out_std),
            "conv.weight": normal(self.init_std) if self.conv_init == "reference" else uniform(-bound, bound),
            "W": identity(),
            "D": constant(1.0),
            "A_log": Rule(lambda d: d.uniform(0.0, 16.0).clamp_min(1e-4).log(), whole=True),
            "dt_bias": Rule(dt_bias, whole=True),
        }

    def state_elements(self) -> int:
        """Recurrent state per sequence (the H matrices; the convolution's last inputs not counted)."""
        return self.v_heads * self.k_dim * self.v_dim

    # ------------------------------------------------------------------------------------------------
    def _convolve(
        self, x: torch.Tensor, past: torch.Tensor | None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Causal depthwise convolution over time: x [B, T, C] → (SiLU(conv) [B, T, C], last inputs). With
        resets [B, T] a tap never reaches into an earlier document, and the last inputs kept (or handed to the
        next context rank) are only those of the last document (zeros elsewhere: the convolution has no bias,
        so a zero input is no input)."""
        xt, tail = x.transpose(1, 2), self.conv_width - 1
        # document ids of the inputs: 0 for those before the row's first start (and for the past ones)
        doc = None if resets is None else resets.long().cumsum(dim=1)
        if past is None:
            past = xt.new_zeros(xt.shape[0], xt.shape[1], tail)
            if self.context_group is not None:
                mine = xt[:, :, xt.shape[2] - tail :]
                if doc is not None:
                    mine = _last_document_only(mine, doc[:, doc.shape[1] - tail :])
                past = previous_tail(mine, past, self.context_group)
        full = torch.cat([past.to(xt.dtype), xt], dim=2)
        if doc is None:
            out = F.conv1d(full, self.conv.weight, groups=self.conv_channels)
            return F.silu(out).transpose(1, 2), full[:, :, full.shape[2] - tail :]
        doc_full = torch.cat([doc.new_zeros(doc.shape[0], tail), doc], dim=1)
        # out[t] = Σ_j w[j] · full[t + j] (conv1d's cross-correlation), tap j kept where full[t + j] is in t's document
        same = doc_full.unfold(1, self.conv_width, 1) == doc_full[:, tail:, None]  # [B, T, width]
        windows = full.unfold(2, self.conv_width, 1)  # [B, C, T, width]
        out = (windows * same.unsqueeze(1).to(full.dtype) * self.conv.weight[:, 0, None, :]).sum(-1)
        last = _last_document_only(full[:, :, full.shape[2] - tail :], doc_full[:, doc_full.shape[1] - tail :])
        return F.silu(out).transpose(1, 2), last

    def _recurrence(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        f: torch.Tensor,
        h0: torch.Tensor,
        resets: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(y [B, T, H, V], H_last) by the configured solver; the state before a reset is zero."""
        solver, group = pick_m2rnn_solver(self.solver), self.context_group
        if solver == "sequential":
            self.last_solve = SolveInfo(0, 0.0, True)
            if group is not None:  # the previous rank's final state in; ours goes out in forward()
                h0 = receive_state(h0, group, anchor=k)
            return m2rnn_sequential(q, k, v, f, self.W.to(q.dtype), h0, resets=resets, clip=self.state_grad_clip)
        B, T, H, V = v.shape
        K, per = self.k_dim, H // self.qk_heads
        kh = k.repeat_interleave(per, dim=2)  # [B, T, H, K]: each value head's key
        u = torch.cat(
            [
                (kh.unsqueeze(-1) * v.unsqueeze(-2)).flatten(2, 3),
                f[..., None, None].expand(B, T, H, K, 1).flatten(2, 3),
            ],
            dim=-1,
        )
        solve = newton_solve if group is None else partial(newton_solve_seqpar, group=group)
        rows, self.last_solve = solve(
            M2RNNCell(self.W.to(q.dtype), K),
            u,
            h0.flatten(1, 2),
            structure=("block", V),
            resets=resets,
            damping=self.newton_damping,
        )
        states = torch.unflatten(rows, 2, (H, K))  # [B, T, H, K, V]
        y = (q.repeat_interleave(per, dim=2).unsqueeze(-1) * states).sum(-2)
        return y, (states[:, -1] if T else h0)

    def forward(
        self, x: torch.Tensor, state: M2RNNState | None = None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, M2RNNState]:
        """x: [B, T, d_model] → (y [B, T, d_model], state after the last token). resets [B, T]: at a document's
        first token the matrix state restarts from zero and the convolution sees none of the earlier inputs."""
        B, T, _ = x.shape
        G, H, K, V = self.qk_heads, self.v_heads, self.k_dim, self.v_dim
        qkv, a, g = self.in_proj(x).split([self.conv_channels, H, H * V], dim=-1)
        qkv, conv_state = self._convolve(qkv, state.conv if state is not None else None, resets)
        # The recurrence runs in at least float32 even under bf16 autocast (errors compound over time).
        dtype = torch.promote_types(qkv.dtype, torch.float32)
        q, k, v = torch.split(qkv.to(dtype), [G * K, G * K, H * V], dim=-1)
        q, k, v = torch.unflatten(q, -1, (G, K)), torch.unflatten(k, -1, (G, K)), torch.unflatten(v, -1, (H, V))
        f = torch.exp(-torch.exp(self.A_log) * F.softplus(a.to(dtype) + self.dt_bias))
        h0 = state.h.to(dtype) if state is not None else x.new_zeros(B, H, K, V, dtype=dtype)
        y, h_last = self._recurrence(q, k, v, f.to(dtype), h0, resets)
        y = (y + self.D * v) * F.silu(g.to(dtype).unflatten(-1, (H, V)))
        out = self.out_proj(self.norm(y.flatten(-2)).to(x.dtype))
        if self.context_group is not None and pick_m2rnn_solver(self.solver) == "sequential":
            out = out + send_state(h_last, self.context_group)  # the backward receives h_last's gradient
        return out, M2RNNState(conv_state, h_last)

    def step(self, x: torch.Tensor, state: M2RNNState | None) -> tuple[torch.Tensor, M2RNNState]:
        """One token: x [B, d_model] → (y [B, d_model], state)."""
        y, state = self.forward(x[:, None], state)
        return y[:, 0], state

    def extra_repr(self) -> str:
        return (
            f"k_dim={self.k_dim}, v_dim={self.v_dim}, qk_heads={self.qk_heads}, v_heads={self.v_heads}, "
            f"conv={self.conv_width}, solver={self.solver}"
        )
