"""ParaGRU and ParaLSTM against independent step-by-step implementations of their equations (float64,
forward and gradients, both solvers), closed-form Jacobians against autograd, Newton's iteration count
at initialisation, and the fallback when Newton does not converge."""

import pytest
import torch
from torch.func import jacrev

from unroll.models.paragru import ParaGRU
from unroll.models.paralstm import ParaLSTM


def dense_input(mixer, x):
    """u = B x + b with B assembled as a dense [gates, width, d] matrix from the per-head blocks."""
    proj = mixer.in_proj
    H, G, Wh, dh = proj.weight.shape
    dense = x.new_zeros(G, Wh * H, dh * H)
    for h in range(H):
        dense[:, h * Wh : (h + 1) * Wh, h * dh : (h + 1) * dh] = proj.weight[h]
    return torch.einsum("gwd,btd->btgw", dense, x) + proj.bias


def sig(v):
    return 1 / (1 + torch.exp(-v))


def reference_gru(mixer, x, h0):
    """z = σ(a_z⊙h₋ + u_z), r = σ(a_r⊙h₋ + u_r), c = tanh(a_c⊙(r⊙h₋) + u_c), h = z⊙c + (1−z)⊙h₋."""
    u, (a_z, a_r, a_c) = dense_input(mixer, x), mixer.a
    h, hs = h0, []
    for t in range(x.shape[1]):
        z = sig(a_z * h + u[:, t, 0])
        r = sig(a_r * h + u[:, t, 1])
        c = torch.tanh(a_c * (r * h) + u[:, t, 2])
        h = z * c + (1 - z) * h
        hs.append(h)
    return torch.stack(hs, 1) @ mixer.out_proj.weight.T, h


def reference_lstm(mixer, x, s0):
    """f = σ(a_f⊙h₋ + u_f + p_f⊙c₋), c̃ = tanh(a_c⊙h₋ + u_c), c = f⊙c₋ + (1−f)⊙c̃,
    o = σ(a_o⊙h₋ + u_o + p_o⊙c), h = o⊙tanh(c)."""
    u, (a_f, a_c, a_o), (p_f, p_o) = dense_input(mixer, x), mixer.a, mixer.p
    c, h, hs = s0[..., 0], s0[..., 1], []
    for t in range(x.shape[1]):
        f = sig(a_f * h + u[:, t, 0] + p_f * c)
        c_tilde = torch.tanh(a_c * h + u[:, t, 1])
        c = f * c + (1 - f) * c_tilde
        o = sig(a_o * h + u[:, t, 2] + p_o * c)
        h = o * torch.tanh(c)
        hs.append(h)
    return torch.stack(hs, 1) @ mixer.out_proj.weight.T, torch.stack([c, h], -1)


CASES = {"G": (ParaGRU, reference_gru, ()), "L": (ParaLSTM, reference_lstm, (2,))}


def make(kind, solver, scale=2.0, seed=0, d=12, width=8, heads=2):
    torch.manual_seed(seed)
    cls = CASES[kind][0]
    mixer = cls(d, width, heads=heads, solver=solver).double()
    with torch.no_grad():  # larger recurrent coefficients than the init, so the recurrence matters
        mixer.a.uniform_(-scale, scale)
        if kind == "L":
            mixer.p.uniform_(-scale, scale)
        mixer.in_proj.bias.normal_()
    return mixer


@pytest.mark.parametrize("kind", ["G", "L"])
@pytest.mark.parametrize("solver", ["newton", "sequential"])
@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("heads", [1, 2])
def test_matches_step_by_step_equations_forward_and_gradients(kind, solver, T, heads):
    mixer = make(kind, solver, heads=heads)
    _, reference, extra = CASES[kind]
    B = 3
    x = torch.randn(B, T, 12, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, 8, *extra, dtype=torch.float64, requires_grad=True)
    y, last = mixer(x, h0)
    y_ref, last_ref = reference(mixer, x, h0)
    torch.testing.assert_close(y, y_ref, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(last, last_ref, rtol=1e-11, atol=1e-12)
    gy, gl = torch.randn_like(y), torch.randn_like(last)
    inputs = [x, h0, *mixer.parameters()]
    grads = torch.autograd.grad((y * gy).sum() + (last * gl).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (last_ref * gl).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("kind", ["G", "L"])
def test_gradcheck_newton_path(kind):
    mixer = make(kind, "newton", width=4, d=4, heads=1)
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: mixer(inp)[0], (x,))


@pytest.mark.parametrize("kind", ["G", "L"])
@pytest.mark.parametrize("scale", [0.5, 4.0])
def test_closed_form_jacobian_matches_autograd(kind, scale):
    mixer = make(kind, "newton", scale=scale)
    cell = mixer.make_cell()
    extra = CASES[kind][2]
    h_prev = 2 * torch.randn(4, 9, 8, *extra, dtype=torch.float64)
    u = 2 * torch.randn(4, 9, 3, 8, dtype=torch.float64)
    value, J = cell.value_and_jacobian(h_prev, u)
    torch.testing.assert_close(value, cell(h_prev, u), rtol=0, atol=1e-15)
    # the full Jacobian of one timestep's state (all channels) by reverse-mode autodiff
    full = jacrev(lambda h: cell(h.unsqueeze(0).unsqueeze(0), u[:1, :1]).squeeze(0).squeeze(0))(h_prev[0, 0])
    if kind == "G":  # [D, D]: diagonal
        torch.testing.assert_close(full, torch.diag(J[0, 0]), rtol=1e-12, atol=1e-13)
    else:  # [D, 2, D, 2]: block-diagonal over channels, 2×2 per channel
        blocks = torch.stack([full[d, :, d, :] for d in range(8)])
        torch.testing.assert_close(blocks, J[0, 0], rtol=1e-12, atol=1e-13)
        off = full.clone()
        for d in range(8):
            off[d, :, d, :] = 0
        assert off.abs().max() == 0
        # stored components first ([2, ..., D] and [2, 2, ..., D] in memory): what the CPU scan reads without a copy
        assert value.permute(3, 0, 1, 2).is_contiguous() and J.permute(3, 4, 0, 1, 2).is_contiguous()


@pytest.mark.parametrize("kind", ["G", "L"])
def test_newton_converges_in_at_most_4_iterations_at_initialisation(kind):
    torch.manual_seed(0)
    mixer = CASES[kind][0](256, 256, solver="newton")
    x = torch.nn.functional.rms_norm(torch.randn(4, 2048, 256), (256,))  # what a block feeds a mixer
    with torch.no_grad():
        mixer(x)
    info = mixer.last_solve
    assert info.converged and info.fallback is None and info.iterations <= 4, info


@pytest.mark.parametrize("kind", ["G", "L"])
def test_coefficients_of_3_still_give_the_sequential_answer(kind):
    mixer = make(kind, "newton", scale=3.0, seed=1)  # recurrent coefficients ~U(−3, 3)
    x = 3 * torch.randn(4, 300, 12, dtype=torch.float64)
    y, _ = mixer(x)
    y_ref, _ = CASES[kind][1](mixer, x, torch.zeros(4, 8, *CASES[kind][2], dtype=torch.float64))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    info = mixer.last_solve
    assert info.converged or info.fallback.startswith("sequential for"), info
    assert info.residual < 1e-12


@pytest.mark.parametrize("kind", ["G", "L"])
def test_large_coefficients_fall_back_to_the_exact_sequential_answer(kind):
    # Coefficients this large make Newton fail for most seeds, and make some draws chaotic (where no two
    # loops agree past rounding); seed 7 is one that fails for G and L and stays tame.
    mixer = make(kind, "newton", scale=6.0, seed=7)
    x = 3 * torch.randn(4, 200, 12, dtype=torch.float64)
    y, _ = mixer(x)
    info = mixer.last_solve
    y_ref, _ = CASES[kind][1](mixer, x, torch.zeros(4, 8, *CASES[kind][2], dtype=torch.float64))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-11)
    assert not info.converged and info.fallback.startswith("sequential for") and info.fallback_sequences > 0, info
    assert info.residual < 1e-12


@pytest.mark.parametrize("kind", ["G", "L"])
def test_step_equals_forward(kind):
    mixer = make(kind, "newton")
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    y, last = mixer(x)
    state, ys = None, []
    for t in range(9):
        yt, state = mixer.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(state, last, rtol=1e-11, atol=1e-12)


def test_recurrence_runs_in_float32_under_bf16_autocast(monkeypatch):
    import unroll.models.recurrent as module

    mixer = make("G", "sequential").float()
    x = torch.randn(2, 40, 12)
    seen, real = {}, module.sequential_solve

    def spy(cell, u, h0, **kw):
        seen["u"], seen["h0"] = u.dtype, h0.dtype
        return real(cell, u, h0, **kw)

    monkeypatch.setattr(module, "sequential_solve", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = mixer(x)
    assert seen == {"u": torch.float32, "h0": torch.float32} and h.dtype == torch.float32
    assert y.dtype == torch.bfloat16  # the output projection ran in bf16
    y32, _ = mixer(x)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.05)
