"""ParaLSTM: the ParaRNN paper's LSTM — coupled input and forget gates (CIFG), peepholes, diagonal
recurrent weights — whose state per channel is the pair (c, h), so its Jacobian is 2×2 per channel."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from unroll.kernels.structure import stack_components
from unroll.models.init import Rule, init_eagerly, uniform
from unroll.models.paragru import chrono_bias
from unroll.models.recurrent import RecurrentMixer


def paralstm_cell(s_prev: torch.Tensor, u: torch.Tensor, a: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """One ParaLSTM step for any leading shape; the state s = [c, h] is [..., D, 2].

    u = Bx + b holds the pre-activations [..., 3, D] (f, c̃, o); a = (a_f, a_c, a_o) [3, D]; p = (p_f, p_o) [2, D]:
        f = σ(a_f ⊙ h₋ + u_f + p_f ⊙ c₋)
        c̃ = tanh(a_c ⊙ h₋ + u_c)
        c = f ⊙ c₋ + (1 − f) ⊙ c̃
        o = σ(a_o ⊙ h₋ + u_o + p_o ⊙ c)
        h = o ⊙ tanh(c)
    """
    c_prev, h_prev = s_prev[..., 0], s_prev[..., 1]
    f = torch.sigmoid(a[0] * h_prev + u[..., 0, :] + p[0] * c_prev)
    c_tilde = torch.tanh(a[1] * h_prev + u[..., 1, :])
    c = f * c_prev + (1 - f) * c_tilde
    o = torch.sigmoid(a[2] * h_prev + u[..., 2, :] + p[1] * c)
    return stack_components([c, o * torch.tanh(c)])


class ParaLSTMCell:
    """paralstm_cell with its parameters and its closed-form 2×2 Jacobian per channel,
    rows (c, h) by columns (c₋, h₋):
        ∂c/∂c₋ = f + (c₋ − c̃) f(1−f) p_f             ∂c/∂h₋ = (c₋ − c̃) f(1−f) a_f + (1−f)(1−c̃²) a_c
        ∂o/∂· = o(1−o) (p_o ∂c/∂· + [a_o for h₋])    ∂h/∂· = ∂o/∂· tanh(c) + o (1 − tanh²c) ∂c/∂·
    """

    def __init__(self, a: torch.Tensor, p: torch.Tensor):
        self.a, self.p = a, p

    def __call__(self, s_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return paralstm_cell(s_prev, u, self.a, self.p)

    def value_and_jacobian(self, s_prev: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a, p = self.a, self.p
        c_prev, h_prev = s_prev[..., 0], s_prev[..., 1]
        f = torch.sigmoid(a[0] * h_prev + u[..., 0, :] + p[0] * c_prev)
        c_tilde = torch.tanh(a[1] * h_prev + u[..., 1, :])
        c = f * c_prev + (1 - f) * c_tilde
        o = torch.sigmoid(a[2] * h_prev + u[..., 2, :] + p[1] * c)
        tc = torch.tanh(c)
        df = f * (1 - f)
        dc_dc = f + (c_prev - c_tilde) * df * p[0]
        dc_dh = (c_prev - c_tilde) * df * a[0] + (1 - f) * (1 - c_tilde * c_tilde) * a[1]
        do = o * (1 - o)
        dtc = o * (1 - tc * tc)
        dh_dc = do * p[1] * dc_dc * tc + dtc * dc_dc
        dh_dh = do * (a[2] + p[1] * dc_dh) * tc + dtc * dc_dh
        # rows (c, h), columns (c₋, h₋); stored components first, as stack_components does
        J = torch.stack([dc_dc, dc_dh, dh_dc, dh_dh]).view(2, 2, *c.shape).movedim((0, 1), (-2, -1))
        return stack_components([c, o * tc]), J

    def jacobian(self, s_prev: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return self.value_and_jacobian(s_prev, u)[1]

    # the fused Newton kernel's form of this cell (kernels/fused_newton.py): its Triton code, by name (Triton is
    # imported only where the kernel runs), its parameters (a_f, a_c, a_o, p_f, p_o) [5, D], and the cell rebuilt
    fused_kernel = "unroll.kernels.triton_cells:PARALSTM"

    def fused_params(self) -> torch.Tensor:
        return torch.cat([self.a, self.p])

    @classmethod
    def from_fused_params(cls, params: torch.Tensor) -> ParaLSTMCell:
        return cls(params[:3], params[3:])


class ParaLSTM(RecurrentMixer):
    """Sequence mixer: u_t = B x_t + b (B block-diagonal over heads), the ParaLSTM recurrence over t,
    y_t = W_o h_t. Channels are independent; each carries (c, h), so the Newton solve scans 2×2 blocks.
    The state carried between calls is s_{T−1} = [c, h]: [B, D, 2]."""

    gates, state_size = 3, 2

    def __init__(self, d_model: int, width: int, **kw: Any):
        super().__init__(d_model, width, **kw)
        self.a = nn.Parameter(torch.empty(3, width))
        self.p = nn.Parameter(torch.empty(2, width))
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        # Chrono forget bias: f ≈ 1 − 1/τ, τ ~ U[2, 64], a spread of memory lengths from the start.
        return super().init_rules() | {
            "a": uniform(-self.rnn_init, self.rnn_init),
            "p": uniform(-self.rnn_init, self.rnn_init),
            "in_proj.bias": chrono_bias(sign=1.0),
        }

    def make_cell(self) -> ParaLSTMCell:
        return ParaLSTMCell(self.a, self.p)

    def readout(self, s: torch.Tensor) -> torch.Tensor:
        return s[..., 1]
