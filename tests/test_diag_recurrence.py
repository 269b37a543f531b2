"""diag_recurrence (sequential forward, adjoint backward) against autograd through the plain time loop."""
import pytest
import torch

from unroll.kernels import diag_recurrence, sequential_scan


def cell(h, u, w, b):
    """An elementwise (diagonal-Jacobian) cell with two parameters and a two-part input."""
    return torch.tanh(w * h + u[..., 0, :]) * torch.sigmoid(u[..., 1, :] + b * h * h) + 0.1 * h


@pytest.mark.parametrize("T", [1, 2, 17, 64])
def test_values_and_gradients_match_autograd_through_the_loop(T):
    torch.manual_seed(T)
    B, D = 3, 5
    u = torch.randn(B, T, 2, D, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, D, dtype=torch.float64, requires_grad=True)
    w = torch.randn(D, dtype=torch.float64, requires_grad=True)
    b = torch.randn(D, dtype=torch.float64, requires_grad=True)

    h = diag_recurrence(cell, u, h0, (w, b))
    h_ref = sequential_scan(lambda hp, ut: cell(hp, ut, w, b), u, h0)
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-15)

    g = torch.randn_like(h)
    grads = torch.autograd.grad((h * g).sum(), (u, h0, w, b))
    grads_ref = torch.autograd.grad((h_ref * g).sum(), (u, h0, w, b))
    for name, a, r in zip(("u", "h0", "w", "b"), grads, grads_ref):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-13, msg=name)


def test_gradcheck_and_partial_requires_grad():
    torch.manual_seed(0)
    u = torch.randn(2, 6, 2, 3, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(2, 3, dtype=torch.float64)
    w = torch.randn(3, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, dtype=torch.float64)  # a constant: no gradient asked for
    assert torch.autograd.gradcheck(lambda u_, w_: diag_recurrence(cell, u_, h0, (w_, b)), (u, w))


def test_empty_sequence():
    h0 = torch.randn(2, 3)
    assert diag_recurrence(cell, torch.randn(2, 0, 2, 3), h0, (torch.ones(3), torch.ones(3))).shape == (2, 0, 3)
