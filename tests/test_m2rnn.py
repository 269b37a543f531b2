"""The M²RNN mixer: its solvers agree (Newton, the PyTorch sequential loop, the Triton sequential kernel),
in float64, forward and gradients; the Newton cell's closed-form Jacobian; the paper's initialisation;
and the 7B preset's layer size."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import jacrev

from unroll.models.m2rnn import M2RNN, M2RNNCell


def mixer(solver, **kw):
    torch.manual_seed(0)
    shape = dict(k_dim=6, v_dim=5, qk_heads=2, v_heads=4, conv=4) | kw
    m = M2RNN(24, solver=solver, init_std=0.3, **shape).double()
    with torch.no_grad():  # move off the identity init so that W's role is exercised
        m.W.add_(0.3 * torch.randn_like(m.W))
        m.D.add_(0.1 * torch.randn_like(m.D))
    return m


def explicit(m: M2RNN, x: torch.Tensor) -> torch.Tensor:
    """The paper's equations written out token by token, head by head, in plain loops."""
    B, T, _ = x.shape
    G, H, K, V = m.qk_heads, m.v_heads, m.k_dim, m.v_dim
    qkv, a, g = m.in_proj(x).split([m.conv_channels, H, H * V], dim=-1)
    w = m.conv.weight[:, 0]  # [C, width]
    padded = F.pad(qkv, (0, 0, m.conv_width - 1, 0))
    conv = torch.stack([(padded[:, t : t + m.conv_width] * w.t()).sum(1) for t in range(T)], 1)
    q, k, v = F.silu(conv).split([G * K, G * K, H * V], dim=-1)
    q, k, v = q.view(B, T, G, K), k.view(B, T, G, K), v.view(B, T, H, V)
    A = m.A_log.exp()
    out = []
    for b in range(B):
        state = [torch.zeros(K, V, dtype=x.dtype) for _ in range(H)]
        rows = []
        for t in range(T):
            ys = []
            for h in range(H):
                grp = h // (H // G)
                f = torch.exp(-A[h] * F.softplus(a[b, t, h] + m.dt_bias[h]))
                state[h] = f * state[h] + (1 - f) * torch.tanh(
                    state[h] @ m.W[h] + torch.outer(k[b, t, grp], v[b, t, h])
                )
                ys.append(q[b, t, grp] @ state[h] + m.D[h] * v[b, t, h])
            y = torch.cat(ys) * F.silu(g[b, t])
            rows.append(m.out_proj(m.norm(y)))
        out.append(torch.stack(rows))
    return torch.stack(out)


@pytest.mark.parametrize("solver", ["sequential", "newton"])
def test_mixer_equals_the_papers_equations(solver):
    m = mixer(solver)
    x = torch.randn(2, 7, 24, dtype=torch.float64)
    y, state = m(x)
    torch.testing.assert_close(y, explicit(m, x), rtol=1e-9, atol=1e-10)
    assert state.h.shape == (2, 4, 6, 5) and state.conv.shape == (2, m.conv_channels, 3)


@pytest.mark.parametrize("qk_heads,conv", [(1, 4), (2, 1)])
def test_newton_torch_and_triton_sequential_agree_forward_and_gradients(monkeypatch, qk_heads, conv):
    """The three training paths in float64 (Triton interpreted on CPU): outputs, final state and the
    gradients of every parameter and of the input."""
    import unroll.models.m2rnn as m2rnn_module
    from unroll.kernels.m2rnn_scan import m2rnn_sequential

    torch.manual_seed(1)
    x = torch.randn(2, 19, 24, dtype=torch.float64)
    w_out = torch.randn(2, 19, 24, dtype=torch.float64)
    results = {}
    for path in ("newton", "torch", "triton"):
        m = mixer("newton" if path == "newton" else "sequential", qk_heads=qk_heads, conv=conv)
        impl = "triton" if path == "triton" else "torch"
        monkeypatch.setattr(
            m2rnn_module, "m2rnn_sequential", lambda *a, impl=impl, **k: m2rnn_sequential(*a, impl=impl, **k)
        )
        xi = x.clone().requires_grad_()
        y, state = m(xi)
        ((y * w_out).sum() + state.h.square().sum()).backward()
        results[path] = [y, state.h, xi.grad] + [p.grad for p in m.parameters()]
        if path == "newton":
            assert m.last_solve.converged and m.last_solve.iterations >= 1
    names = ["y", "h_last", "x.grad"] + [n for n, _ in mixer("newton").named_parameters()]
    for path in ("torch", "triton"):
        for name, a, b in zip(names, results["newton"], results[path]):
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-11, msg=lambda s: f"{path} vs newton, {name}: {s}")


def test_closed_form_jacobian_matches_autograd():
    torch.manual_seed(2)
    H, K, V = 3, 4, 5
    cell = M2RNNCell(torch.randn(H, V, V, dtype=torch.float64), K)
    h = torch.randn(2, 3, H * K, V, dtype=torch.float64)
    u = torch.cat(
        [torch.randn(2, 3, H * K, V, dtype=torch.float64), torch.rand(2, 3, H * K, 1, dtype=torch.float64)], dim=-1
    )
    value, J = cell.value_and_jacobian(h, u)
    torch.testing.assert_close(value, cell(h, u))
    full = jacrev(lambda s: cell(s, u))(h)  # [2, 3, HK, V, 2, 3, HK, V]
    for b in range(2):
        for t in range(3):
            for r in range(H * K):
                torch.testing.assert_close(J[b, t, r], full[b, t, r, :, b, t, r, :])
    # rows are independent: no derivative across rows
    off = full[0, 0, 0, :, 0, 0, 1, :]
    assert off.abs().max() == 0


def test_initialisation_follows_the_paper():
    torch.manual_seed(3)
    m = M2RNN(64, k_dim=8, v_dim=4, qk_heads=1, v_heads=64)
    assert torch.equal(m.W, torch.eye(4).expand(64, 4, 4)) and torch.equal(m.D, torch.ones(64, 4))
    A = m.A_log.exp()
    assert 0 < A.min() and A.max() <= 16 and A.mean() > 4  # U[0, 16]
    dt = F.softplus(m.dt_bias).detach()
    assert dt.min() >= 1e-3 * (1 - 1e-5) and dt.max() <= 0.1 * (1 + 1e-5)
    assert math.log(dt.max() / dt.min()) > 2  # spread log-uniformly over two decades


def test_convolution_init_is_the_references_normal_and_torchs_default_on_request():
    torch.manual_seed(4)
    ref = M2RNN(64, k_dim=16, v_dim=8, init_std=0.02).conv.weight
    assert abs(ref.std().item() - 0.02) < 0.002 and ref.abs().max() < 0.02 * 6  # N(0, init_std), the authors'
    old = M2RNN(64, k_dim=16, v_dim=8, conv_init="torch").conv.weight
    assert old.abs().max() <= 0.5 and old.std() > 0.25  # U(±1/√4), std 0.29: ~14× larger
    with pytest.raises(ValueError, match="conv_init"):
        M2RNN(64, conv_init="xavier")


def test_state_gradient_clipping_reaches_the_recurrence_and_leaves_the_forward():
    """state_grad_clip: the same output, other gradients (the kernel's rule is tested in test_m2rnn_kernel);
    the Newton solver has no clipped adjoint and refuses it, as the config does."""
    from unroll.models.config import M2RNNConfig, ModelConfig

    plain, clipped = mixer("sequential"), mixer("sequential")
    clipped.state_grad_clip = 1e-3
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    ys = [m(x)[0] for m in (plain, clipped)]
    assert torch.equal(ys[0], ys[1])
    grads = [torch.autograd.grad(y.square().sum(), m.W)[0] for y, m in zip(ys, (plain, clipped))]
    assert not torch.allclose(grads[0], grads[1])
    with pytest.raises(ValueError, match="Newton solver does not clip"):
        M2RNN(24, solver="newton", state_grad_clip=1.0)
    cfg = ModelConfig(pattern="M", m2rnn=M2RNNConfig(solver="newton", state_grad_clip=1.0))
    assert [k for k, _ in cfg.problems()] == ["m2rnn.state_grad_clip"]
    bad = ModelConfig(pattern="M", m2rnn=M2RNNConfig(conv_init="xavier", state_grad_clip=0.0))
    assert [k for k, _ in bad.problems()] == ["m2rnn.conv_init", "m2rnn.state_grad_clip"]


def test_7b_moe_layer_has_the_papers_size():
    with torch.device("meta"):
        m = M2RNN(1536, k_dim=64, v_dim=16, qk_heads=1, v_heads=132)
    assert sum(p.numel() for p in m.parameters()) == 10_178_696
    assert m.state_elements() == 135_168


def test_step_carries_conv_and_matrix_state():
    m = mixer("sequential")
    x = torch.randn(2, 9, 24, dtype=torch.float64)
    full, _ = m(x)
    state, outs = None, []
    for t in range(9):
        y, state = m.step(x[:, t], state)
        outs.append(y)
    torch.testing.assert_close(torch.stack(outs, 1), full, rtol=1e-10, atol=1e-12)


def test_bf16_autocast_keeps_the_recurrence_in_float32(monkeypatch):
    import unroll.models.m2rnn as m2rnn_module

    seen = []
    real = m2rnn_module.m2rnn_sequential
    monkeypatch.setattr(m2rnn_module, "m2rnn_sequential", lambda q, *a, **k: seen.append(q.dtype) or real(q, *a, **k))
    m = M2RNN(32, k_dim=8, v_dim=4, v_heads=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, state = m(torch.randn(2, 5, 32))
    assert seen == [torch.float32] and state.h.dtype == torch.float32 and torch.isfinite(y).all()
