"""newton_solve and sequential_solve against a step-by-step loop in float64: diagonal, 2×2, 16×16 blocks
and dense Jacobians (all by autodiff here), long and awkward lengths, resets, non-zero h0, gradients."""

import pytest
import torch

from unroll.kernels import newton_solve, sequential_solve


def loop(cell, x, h0, resets=None):
    """h_t = cell(h_{t−1}, x_t) one step at a time (the cell sees a length-1 time axis), h_{t−1} = 0 at
    resets; plain autograd, inputs split with unbind so the backward stays linear in T."""
    h, out = h0, []
    for t, x_t in enumerate(x.unbind(1)):
        if resets is not None:
            h = h * (~resets[:, t]).to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        h = cell(h.unsqueeze(1), x_t.unsqueeze(1)).squeeze(1)
        out.append(h)
    return torch.stack(out, 1)


def make_problem(structure, T, seed, scale=0.9):
    """A cell of the given Jacobian structure with its own parameters, inputs x, h0 and resets."""
    g = torch.Generator().manual_seed(seed)
    B, D = 2, 5
    opts = dict(dtype=torch.float64)
    if structure == "diag":
        w = (torch.rand(2, D, generator=g, **opts) * 2 - 1) * scale

        def cell(h, x):  # elementwise in the state: a GRU-like gate and a nonlinearity
            return torch.sigmoid(x[..., 0, :] + w[1] * h) * torch.tanh(w[0] * h + x[..., 1, :]) + 0.05 * h

        x, h0, params = torch.randn(B, T, 2, D, generator=g, **opts), torch.randn(B, D, generator=g, **opts), [w]
    elif structure == "dense":
        W = torch.randn(D, D, generator=g, **opts) * scale / D**0.5

        def cell(h, x):
            return torch.tanh(h @ W + x)

        x, h0, params = torch.randn(B, T, D, generator=g, **opts), torch.randn(B, D, generator=g, **opts), [W]
    else:
        k = structure[1]
        W = torch.randn(D, k, k, generator=g, **opts) * scale / k**0.5

        def cell(h, x):  # D independent k-vectors, each mixed by its own k×k matrix
            return torch.tanh(torch.einsum("dij,...dj->...di", W, h) + x) * (1 - 0.1 * torch.sigmoid(h))

        x = torch.randn(B, T, D, k, generator=g, **opts)
        h0, params = torch.randn(B, D, k, generator=g, **opts), [W]
    resets = torch.rand(B, T, generator=g) < 0.01
    resets[0, T // 2] = True
    return cell, x, h0, resets, params


STRUCTURES = ["diag", ("block", 2), ("block", 16), "dense"]


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
@pytest.mark.parametrize("T", [1, 7, 1000, 4097])
def test_newton_equals_loop_forward_and_gradients(structure, T):
    cell, x, h0, resets, params = make_problem(structure, T, seed=T)
    leaves = [x.requires_grad_(), h0.requires_grad_(), *[p.requires_grad_() for p in params]]
    h, info = newton_solve(cell, x, h0, structure=structure, resets=resets)
    ref = loop(cell, x, h0, resets)
    assert info.converged and info.fallback is None and info.residual <= 1e-12, info
    torch.testing.assert_close(h, ref, rtol=1e-11, atol=1e-11)
    g = torch.randn_like(h)
    grads = torch.autograd.grad((h * g).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * g).sum(), leaves)
    for name, a, b in zip(["x", "h0", "params"], grads, grads_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("structure", STRUCTURES, ids=str)
def test_sequential_solve_equals_loop_forward_and_gradients(structure):
    cell, x, h0, resets, params = make_problem(structure, 300, seed=3)
    leaves = [x.requires_grad_(), h0.requires_grad_(), *[p.requires_grad_() for p in params]]
    h, info = sequential_solve(cell, x, h0, structure=structure, resets=resets)
    ref = loop(cell, x, h0, resets)
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-14)
    g = torch.randn_like(h)
    for a, b in zip(torch.autograd.grad((h * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("structure", ["diag", ("block", 2), "dense"], ids=str)
def test_gradcheck(structure):
    cell, x, h0, resets, params = make_problem(structure, 6, seed=1)
    resets[1, 3] = True

    # x and h0 through newton_solve as it is; the parameter through a cell that takes it as an argument
    assert torch.autograd.gradcheck(
        lambda x_, h0_: newton_solve(cell, x_, h0_, structure=structure, resets=resets)[0],
        (x.requires_grad_(), h0.requires_grad_()),
    )
    p = params[0].requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p_: newton_solve(
            lambda h, xx: cell_with(structure, p_, h, xx), x.detach(), h0.detach(), structure=structure, resets=resets
        )[0],
        (p,),
    )


def cell_with(structure, p, h, x):
    """make_problem's cells written with their parameter as an argument (for gradcheck)."""
    if structure == "diag":
        return torch.sigmoid(x[..., 0, :] + p[1] * h) * torch.tanh(p[0] * h + x[..., 1, :]) + 0.05 * h
    if structure == "dense":
        return torch.tanh(h @ p + x)
    return torch.tanh(torch.einsum("dij,...dj->...di", p, h) + x) * (1 - 0.1 * torch.sigmoid(h))


@pytest.mark.parametrize("structure", ["diag", ("block", 2)], ids=str)
def test_divergent_newton_falls_back_to_the_sequential_answer_and_says_so(structure):
    cell, x, h0, resets, params = make_problem(structure, 400, seed=2, scale=12.0)
    h, info = newton_solve(cell, x, h0, structure=structure, resets=resets, max_iters=6)
    ref = loop(cell, x, h0, resets)
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    assert not info.converged and info.fallback == f"sequential for {info.fallback_sequences} of 2 sequences"
    assert info.fallback_sequences >= 1 and info.iterations == 6 and info.residual < 1e-12


def test_t1_needs_no_iteration_and_bad_shapes_are_named():
    cell, x, h0, _, _ = make_problem("diag", 1, seed=0)
    h, info = newton_solve(cell, x, h0)
    assert info.iterations == 0 and info.converged
    torch.testing.assert_close(h, loop(cell, x, h0))
    with pytest.raises(ValueError, match=r"\('block', 3\) needs h0 of shape \[B, D, 3\]"):
        newton_solve(cell, x, h0, structure=("block", 3))
    with pytest.raises(ValueError, match="structure 'blocky'"):
        newton_solve(cell, x, h0, structure="blocky")
    with pytest.raises(ValueError, match="resets"):
        newton_solve(cell, x, h0, resets=torch.zeros(2, 5, dtype=torch.bool))


@pytest.mark.parametrize("structure", ["diag", ("block", 2)], ids=str)
def test_newton_with_the_triton_scan_equals_the_torch_scan(structure):
    scan_triton = pytest.importorskip("unroll.kernels.triton_scan").scan_triton
    cell, x, h0, resets, params = make_problem(structure, 40, seed=4)
    leaves = [x.requires_grad_(), h0.requires_grad_()]
    h, info = newton_solve(cell, x, h0, structure=structure, resets=resets, scan_impl=scan_triton)
    ref, info_ref = newton_solve(cell, x, h0, structure=structure, resets=resets)
    assert info.iterations == info_ref.iterations and info.converged
    torch.testing.assert_close(h, ref, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(h)
    for a, b in zip(torch.autograd.grad((h * g).sum(), leaves), torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-11, atol=1e-12)
