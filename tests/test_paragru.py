"""ParaGRU against an independent step-by-step implementation of the paper's equations, in float64."""
import pytest
import torch

from unroll.models.paragru import ParaGRU


def reference_paragru(x, W, b, a_z, a_r, a_c, W_o, h0):
    """Written from the equations, one timestep and one gate at a time, with separate matrices.

    z = σ(a_z⊙h₋ + B_z x + b_z), r = σ(a_r⊙h₋ + B_r x + b_r), c = tanh(a_c⊙(r⊙h₋) + B_c x + b_c),
    h = z⊙c + (1−z)⊙h₋, y = W_o h.
    """
    D = a_z.shape[0]
    B_z, B_r, B_c = W[:D], W[D:2 * D], W[2 * D:]
    b_z, b_r, b_c = b[:D], b[D:2 * D], b[2 * D:]
    h, ys = h0, []
    for t in range(x.shape[1]):
        xt = x[:, t]
        z = 1 / (1 + torch.exp(-(a_z * h + xt @ B_z.T + b_z)))
        r = 1 / (1 + torch.exp(-(a_r * h + xt @ B_r.T + b_r)))
        c = torch.tanh(a_c * (r * h) + xt @ B_c.T + b_c)
        h = z * c + (1 - z) * h
        ys.append(h @ W_o.T)
    return torch.stack(ys, 1), h


@pytest.mark.parametrize("T", [1, 7, 33])
@pytest.mark.parametrize("with_state", [False, True])
def test_paragru_matches_reference_forward_and_gradients(T, with_state):
    torch.manual_seed(T)
    d, D, B = 12, 10, 3
    mixer = ParaGRU(d, D).double()
    with torch.no_grad():  # larger recurrent coefficients than the init, so the recurrence matters
        mixer.a.uniform_(-2, 2)
        mixer.in_proj.bias.normal_()
    x = torch.randn(B, T, d, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True) if with_state else None

    y, h_last = mixer(x, h0)
    W, b = mixer.in_proj.weight, mixer.in_proj.bias
    a_z, a_r, a_c = mixer.a
    y_ref, h_ref = reference_paragru(x, W, b, a_z, a_r, a_c, mixer.out_proj.weight,
                                     h0 if with_state else torch.zeros(B, D, dtype=torch.float64))
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h_last, h_ref, rtol=1e-12, atol=1e-12)

    gy, gh = torch.randn_like(y), torch.randn_like(h_last)
    inputs = [x, *mixer.parameters()] + ([h0] if with_state else [])
    grads = torch.autograd.grad((y * gy).sum() + (h_last * gh).sum(), inputs)
    grads_ref = torch.autograd.grad((y_ref * gy).sum() + (h_ref * gh).sum(), inputs)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)


def test_paragru_gradient_matches_finite_differences():
    torch.manual_seed(0)
    mixer = ParaGRU(4, 3).double()
    x = torch.randn(2, 5, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda inp: mixer(inp)[0], (x,))


def test_paragru_step_equals_forward():
    torch.manual_seed(1)
    mixer = ParaGRU(8, 6).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y, h = mixer(x)
    state, ys = None, []
    for t in range(9):
        yt, state = mixer.step(x[:, t], state)
        ys.append(yt)
    torch.testing.assert_close(torch.stack(ys, 1), y, rtol=0, atol=1e-14)
    torch.testing.assert_close(state, h, rtol=0, atol=1e-14)


def test_recurrence_runs_in_float32_under_bf16_autocast(monkeypatch):
    import unroll.models.paragru as module

    torch.manual_seed(2)
    mixer = ParaGRU(16, 8)
    x = torch.randn(2, 40, 16)
    seen, real = {}, module.diag_recurrence

    def spy(cell, u, h0, params):
        seen["u"], seen["h0"] = u.dtype, h0.dtype
        return real(cell, u, h0, params)

    monkeypatch.setattr(module, "diag_recurrence", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, h = mixer(x)
    assert seen == {"u": torch.float32, "h0": torch.float32} and h.dtype == torch.float32
    assert y.dtype == torch.bfloat16  # the output projection ran in bf16
    y32, _ = mixer(x)
    torch.testing.assert_close(y.float(), y32, rtol=0.05, atol=0.02)
