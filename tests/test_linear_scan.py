"""linear_scan (the chunked PyTorch reference) against a plain loop, forward and backward, in float64."""

import pytest
import torch
from conftest import scan_inputs

from unroll.kernels import linear_scan


def loop(a, b, h0, block, reverse=False, resets=None):
    """h_t = a_t h_{t∓1} + b_t one step at a time, the a-term dropped where resets is True.
    (unbind, not a[:, t]: indexing a slice per step makes autograd's backward quadratic in T.)"""
    T, h, out = b.shape[1], h0, [None] * b.shape[1]
    a_t, b_t = a.unbind(1), b.unbind(1)
    keep = (~resets).to(a.dtype).unbind(1) if resets is not None else None
    for t in range(T - 1, -1, -1) if reverse else range(T):
        at = a_t[t] if keep is None else a_t[t] * keep[t].view(-1, *([1] * (a.dim() - 2)))
        h = ((at @ h.unsqueeze(-1)).squeeze(-1) if block else at * h) + b_t[t]
        out[t] = h
    return torch.stack(out, 1)


def inputs(T, k, seed):
    return scan_inputs(T, k, seed)


@pytest.mark.parametrize("T", [1, 7, 1000, 4097])
@pytest.mark.parametrize("k", [0, 2, 16])  # 0: diagonal
@pytest.mark.parametrize("reverse", [False, True])
def test_matches_loop_forward_and_backward(T, k, reverse):
    a, b, h0, resets = inputs(T, k, seed=T + k)
    leaves = [x.requires_grad_() for x in (a, b, h0)]
    h = linear_scan(a, b, h0, reverse=reverse, resets=resets)
    ref = loop(a, b, h0, bool(k), reverse, resets)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-11)
    g = torch.randn_like(h)
    grads = torch.autograd.grad((h * g).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * g).sum(), leaves)
    for name, x, r in zip("a b h0".split(), grads, grads_ref):
        torch.testing.assert_close(x, r, rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("T", [1, 17, 1000, 4097, 16384])  # 16384: chunk ends scanned over two more levels
@pytest.mark.parametrize("k", [0, 2])
def test_reverse_without_autograd_walks_backwards_in_place(T, k):
    """Without autograd a reverse scan walks the chunks from the end (no flipped copies): the same as the loop,
    and as the flipping path autograd takes; a block state stored components first comes back in that layout."""
    a, b, h0, resets = inputs(T, k, seed=T + k + 1)
    if k:  # [B, T, D, k, k] and [B, T, D, k] views of components-first storage, as ParaLSTM's cell writes them
        a, b = a.permute(3, 4, 0, 1, 2).contiguous().permute(2, 3, 4, 0, 1), b.permute(3, 0, 1, 2).contiguous()
        b = b.permute(1, 2, 3, 0)
    with torch.no_grad():
        h = linear_scan(a, b, h0, reverse=True, resets=resets)
    ref = loop(a, b, h0, bool(k), True, resets)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-11)
    h0 = h0.requires_grad_()  # any input that needs a gradient takes the autograd path
    with_grad = linear_scan(a, b, h0, reverse=True, resets=resets)
    torch.testing.assert_close(h, with_grad.detach(), rtol=1e-12, atol=1e-12)
    g = torch.randn_like(h)
    [grad_h0] = torch.autograd.grad((with_grad * g).sum(), [h0])
    torch.testing.assert_close(grad_h0, torch.autograd.grad((loop(a, b, h0, bool(k), True, resets) * g).sum(), [h0])[0])
    if k:  # components outermost, D innermost (a padded length leaves a narrowed view, not contiguous)
        assert h.stride(3) >= h.stride(0) * h.shape[0] and h.stride(2) == 1


@pytest.mark.parametrize("k", [0, 3])
def test_gradcheck(k):
    a, b, h0, resets = inputs(11, k, seed=5)
    assert torch.autograd.gradcheck(
        lambda a_, b_, h_: linear_scan(a_, b_, h_, resets=resets), [x.requires_grad_() for x in (a, b, h0)]
    )
    assert torch.autograd.gradcheck(
        lambda a_, b_, h_: linear_scan(a_, b_, h_, reverse=True), [x.detach().requires_grad_() for x in (a, b, h0)]
    )


def test_default_h0_is_zero_and_shapes_are_checked():
    a, b, _, _ = inputs(9, 0, seed=1)
    torch.testing.assert_close(linear_scan(a, b), loop(a, b, torch.zeros(2, 3, dtype=torch.float64), False))
    with pytest.raises(ValueError, match="neither diagonal"):
        linear_scan(a, b[..., None])
    with pytest.raises(ValueError, match="h0"):
        linear_scan(a, b, torch.zeros(2, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="resets"):
        linear_scan(a, b, resets=torch.zeros(2, 8, dtype=torch.bool))
    assert linear_scan(a[:, :0], b[:, :0]).shape == (2, 0, 3)
