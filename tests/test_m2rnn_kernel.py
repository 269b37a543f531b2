"""The M²RNN recurrence: m2rnn_reference (kernels/m2rnn_scan.py) pinned by a 2-step example worked in plain
Python, and m2rnn_triton (kernels/triton_m2rnn.py) against it, forward and all six gradients. Without a GPU
the kernels run in Triton's interpreter (conftest sets TRITON_INTERPRET=1): sizes stay small, and chunks of
2-4 steps stand in for long sequences (several checkpoints, a short last chunk)."""

import importlib.util
import math

import pytest
import torch

from unroll.kernels.m2rnn_scan import m2rnn_checkpointed, m2rnn_reference, m2rnn_sequential

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton not installed")


def triton_fn(*args, **kw):
    from unroll.kernels.triton_m2rnn import m2rnn_triton

    return m2rnn_triton(*args, **kw)


def inputs(B, T, G, H, K, V, seed, *, f_range=(0.05, 0.95), h0=True, dtype=torch.float64, noncontig=False):
    """q, k, v, f, W, h0 (or None), scaled so tanh is neither linear nor saturated."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if noncontig:  # time-major storage, transposed views
        q, k, v = r(T, B, G, K).transpose(0, 1), r(T, B, G, K).transpose(0, 1), r(T, B, H, V).transpose(0, 1)
    else:
        q, k, v = r(B, T, G, K), r(B, T, G, K), r(B, T, H, V)
    f = torch.empty(B, T, H, dtype=torch.float64).uniform_(*f_range, generator=g)
    xs = [q, k * 0.7, v * 0.7, f, r(H, V, V) / V**0.5, r(B, H, K, V) * 0.5 if h0 else None]
    return [None if x is None else x.to(DEVICE, dtype).requires_grad_() for x in xs]


def forward_and_grads(fn, xs, seed=0):
    """y, h_last and the gradients of a random weighting of both, for the inputs that are not None."""
    y, h = fn(*xs)
    g = torch.Generator().manual_seed(seed)
    wy, wh = torch.randn(y.shape, generator=g), torch.randn(h.shape, generator=g)
    loss = (y * wy.to(y)).sum() + (h * wh.to(h)).sum()
    # (unused inputs, as at T = 0 in the reference, get zeros)
    return y, h, torch.autograd.grad(loss, [x for x in xs if x is not None], allow_unused=True, materialize_grads=True)


# B, T, G, H, K, V, chunk (None: the default), keyword arguments of `inputs`
CASES = {
    "G1_3heads_T_not_multiple": (2, 9, 1, 3, 4, 3, 4, {}),
    "G2_odd_KV_no_h0_noncontig": (2, 7, 2, 4, 6, 5, 4, dict(h0=False, noncontig=True)),
    "T_multiple_of_chunk": (1, 8, 1, 2, 6, 5, 4, {}),
    "T1": (2, 1, 2, 2, 3, 2, 4, {}),
    "T1_no_h0": (1, 1, 1, 1, 3, 2, 4, dict(h0=False)),
    "f_near_0": (1, 6, 1, 2, 4, 3, 2, dict(f_range=(1e-4, 1e-2))),
    "f_near_1": (1, 6, 1, 2, 4, 3, 2, dict(f_range=(0.99, 1 - 1e-4))),
    "default_chunk": (1, 19, 1, 1, 3, 4, None, {}),
    "K33_V17_padded": (1, 5, 1, 2, 33, 17, 2, dict(h0=False)),
    "K128_V64": (1, 3, 1, 1, 128, 64, 2, {}),
}


@needs_triton
@pytest.mark.parametrize("case", CASES)
def test_triton_matches_reference(case):
    B, T, G, H, K, V, chunk, kw = CASES[case]
    xs = inputs(B, T, G, H, K, V, seed=len(case), **kw)
    got = forward_and_grads(lambda *a: triton_fn(*a, **({"chunk": chunk} if chunk else {})), xs)
    want = forward_and_grads(m2rnn_reference, xs)
    assert got[0].shape == (B, T, H, V) and got[1].shape == (B, H, K, V)
    for name, a, b in zip(["y", "h_last"], got[:2], want[:2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)
    names = [n for n, x in zip("q k v f W h0".split(), xs) if x is not None]
    for name, a, b in zip(names, got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"d{name}")


# B, T, chunk, document starts per row: at t = 0 (h0 dropped), on a chunk's first step, on its last, twice
# in a row, and none
RESET_CASES = {
    "starts_across_chunks": (2, 11, 4, [[0, 4, 7, 8], [3, 10]]),
    "no_starts_in_one_row": (2, 9, 2, [[], [1, 2, 5]]),
    "default_chunk": (1, 37, None, [[5, 32, 33]]),
}


@needs_triton
@pytest.mark.parametrize("case", RESET_CASES)
def test_triton_with_resets_matches_reference(case):
    """The state is zero where a document starts, forward and backward (no gradient into the state
    before it), in the forward, the chunk recompute and the reverse pass alike."""
    B, T, chunk, starts = RESET_CASES[case]
    xs = inputs(B, T, 2, 4, 5, 3, seed=T)
    resets = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    for b, ts in enumerate(starts):
        resets[b, ts] = True
    got = forward_and_grads(lambda *a: triton_fn(*a, resets, **({"chunk": chunk} if chunk else {})), xs)
    want = forward_and_grads(lambda *a: m2rnn_reference(*a, resets), xs)
    unreset = forward_and_grads(m2rnn_reference, xs)
    assert not torch.allclose(want[0], unreset[0])  # the starts change the answer
    for name, a, b in zip(
        ["y", "h_last", "dq", "dk", "dv", "df", "dW", "dh0"], [*got[:2], *got[2]], [*want[:2], *want[2]]
    ):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=name)


@needs_triton
def test_triton_float32():
    """float32 in and out, computed in float32: close to the float64 reference on the same values."""
    xs = inputs(2, 7, 1, 2, 6, 5, seed=3, dtype=torch.float32)
    y, h, grads = forward_and_grads(lambda *a: triton_fn(*a, chunk=4), xs)
    ref = forward_and_grads(m2rnn_reference, [x.detach().double().requires_grad_() for x in xs])
    assert y.dtype == h.dtype == torch.float32 and all(g.dtype == torch.float32 for g in grads)
    for a, b in zip([y, h, *grads], [ref[0], ref[1], *ref[2]]):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4)


@needs_triton
def test_empty_sequence_and_no_grad():
    """T = 0 returns h0 (and passes its gradient through); under no_grad no checkpoints are stored."""
    xs = inputs(2, 0, 1, 2, 3, 2, seed=4)
    y, h, grads = forward_and_grads(triton_fn, xs)
    assert y.shape == (2, 0, 2, 2)
    torch.testing.assert_close(h, xs[-1])
    for a, b in zip(grads, forward_and_grads(m2rnn_reference, xs)[2]):
        torch.testing.assert_close(a, b)
    xs = inputs(1, 5, 1, 2, 3, 2, seed=5)
    with torch.no_grad():
        got, want = m2rnn_sequential(*xs, impl="triton"), m2rnn_sequential(*xs, impl="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)


def test_reference_two_steps_by_hand():
    """B = H = G = 1, K = V = 2, two steps, written out in scalars: pins the reference itself."""
    q = [[1.0, 2.0], [-1.0, 0.5]]
    k = [[0.5, -1.0], [1.0, 1.0]]
    v = [[1.0, 0.5], [-0.5, 2.0]]
    f = [0.3, 0.6]
    W = [[0.5, -0.2], [0.1, 0.9]]
    Hs = [[0.1, 0.2], [-0.3, 0.4]]
    ys = []
    for t in range(2):
        z = [[sum(Hs[i][m] * W[m][j] for m in range(2)) + k[t][i] * v[t][j] for j in range(2)] for i in range(2)]
        Hs = [[f[t] * Hs[i][j] + (1 - f[t]) * math.tanh(z[i][j]) for j in range(2)] for i in range(2)]
        ys.append([sum(q[t][i] * Hs[i][j] for i in range(2)) for j in range(2)])
    # the loop spot-checked by hand at step 0, column 0: z = (0.1·0.5 + 0.2·0.1 + 0.5·1, −0.3·0.5 + 0.4·0.1 − 1·1)
    # = (0.57, −1.11), H = 0.3·(0.1, −0.3) + 0.7·tanh(z), y = 1·H[0] + 2·H[1]
    by_hand = 0.03 + 0.7 * math.tanh(0.57) + 2 * (-0.09 + 0.7 * math.tanh(-1.11))
    assert math.isclose(ys[0][0], by_hand, abs_tol=1e-15)
    d = dict(dtype=torch.float64)
    y, h = m2rnn_reference(
        torch.tensor(q, **d).view(1, 2, 1, 2),
        torch.tensor(k, **d).view(1, 2, 1, 2),
        torch.tensor(v, **d).view(1, 2, 1, 2),
        torch.tensor(f, **d).view(1, 2, 1),
        torch.tensor(W, **d).view(1, 2, 2),
        torch.tensor([[[[0.1, 0.2], [-0.3, 0.4]]]], **d),
    )
    torch.testing.assert_close(y, torch.tensor(ys, **d).view(1, 2, 1, 2), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(h, torch.tensor(Hs, **d).view(1, 1, 2, 2), rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("T,h0", [(77, True), (64, False), (5, True)])
def test_checkpointed_equals_the_reference_and_keeps_a_state_per_chunk(T, h0):
    """Chunks of 8 steps under activation checkpointing: the same outputs and gradients bit for bit (the
    recompute is the same computation), and what the forward keeps for the backward is the inputs and one
    state per chunk instead of several K×V tensors per step."""
    xs = inputs(2, T, 1, 3, 6, 4, seed=T, h0=h0)
    got = forward_and_grads(lambda *a: m2rnn_checkpointed(*a, chunk=8), xs)
    want = forward_and_grads(m2rnn_reference, xs)
    for a, b in zip(list(got[:2]) + list(got[2]), list(want[:2]) + list(want[2])):
        assert torch.equal(a, b)

    def saved_bytes(fn):
        seen = {}

        def pack(t):
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            fn(*xs)
        return sum(seen.values())

    inputs_bytes = sum(x.untyped_storage().nbytes() for x in xs if x is not None)
    state = 2 * 3 * 6 * 4 * 8  # B·H·K·V float64
    if T > 8:
        assert saved_bytes(lambda *a: m2rnn_checkpointed(*a, chunk=8)) <= inputs_bytes + (T // 8 + 1) * state
        assert saved_bytes(m2rnn_reference) > inputs_bytes + T * state


def test_sequential_dispatch():
    xs = inputs(1, 3, 1, 2, 3, 2, seed=6)
    want = m2rnn_reference(*xs)
    for impl in ("auto", "torch"):  # auto on CPU tensors: the reference
        for a, b in zip(m2rnn_sequential(*xs, impl=impl), want):
            torch.testing.assert_close(a, b)
    with pytest.raises(ValueError, match="impl"):
        m2rnn_sequential(*xs, impl="cuda")


BAD_SHAPES = {  # argument index, bad shape, message
    "q_rank": (0, (2, 3, 4), r"q must be \[B, T, G, K\]"),
    "k": (1, (2, 3, 1, 5), r"k must be"),
    "v_batch": (2, (1, 3, 4, 2), r"v must be \[B, T, H, V\]"),
    "H_not_multiple_of_G": (2, (2, 3, 3, 2), r"H=3 .* multiple of .* G=2"),
    "f": (3, (2, 3, 4, 1), r"f must be \[B, T, H\] = \(2, 3, 4\)"),
    "W": (4, (4, 2, 3), r"W must be \[H, V, V\] = \(4, 2, 2\)"),
    "h0": (5, (2, 4, 2, 2), r"h0 must be \[B, H, K, V\] = \(2, 4, 3, 2\)"),
}


@pytest.mark.parametrize("case", BAD_SHAPES)
def test_shape_errors(case):
    index, shape, message = BAD_SHAPES[case]
    xs = [torch.zeros(s) for s in [(2, 3, 2, 3), (2, 3, 2, 3), (2, 3, 4, 2), (2, 3, 4), (4, 2, 2), (2, 4, 3, 2)]]
    xs[index] = torch.zeros(shape)
    fns = [m2rnn_reference, m2rnn_sequential] + ([triton_fn] if importlib.util.find_spec("triton") else [])
    for fn in fns:
        with pytest.raises(ValueError, match=message):
            fn(*xs)


def _clipped_backward_by_hand(xs, clip, resets=None, seed=0):
    """The gradients of forward_and_grads' loss with state-gradient clipping, by a reverse loop written out
    (no autograd): dH = clamp(dH, −c, c), then dH += q_t dy_tᵀ, then the step's adjoint."""
    q, k, v, f, W, h0 = (None if x is None else x.detach() for x in xs)
    B, T, G, K = q.shape
    H, V = v.shape[2:]
    per = H // G
    qh, kh = q.repeat_interleave(per, 2), k.repeat_interleave(per, 2)
    hs = [h0 if h0 is not None else v.new_zeros(B, H, K, V)]
    prevs, us = [], []
    for t in range(T):
        prev = hs[-1] if resets is None else hs[-1].masked_fill(resets[:, t, None, None, None], 0)
        u = torch.tanh(prev @ W + kh[:, t, :, :, None] * v[:, t, :, None, :])
        ft = f[:, t, :, None, None]
        prevs.append(prev), us.append(u), hs.append(ft * prev + (1 - ft) * u)
    y = torch.stack([(qh[:, t, :, :, None] * hs[t + 1]).sum(-2) for t in range(T)], 1) if T else None
    g = torch.Generator().manual_seed(seed)
    wy = torch.randn((B, T, H, V), generator=g).to(v)
    dH = torch.randn((B, H, K, V), generator=g).to(v)  # the gradient of h_last
    dq, dk, dv, df, dW = (torch.zeros_like(x) for x in (qh, kh, v, f, W))
    for t in reversed(range(T)):
        dH = dH.clamp(-clip, clip) + qh[:, t, :, :, None] * wy[:, t, :, None, :]
        ft = f[:, t, :, None, None]
        Gz = (1 - ft) * dH * (1 - us[t] ** 2)
        dq[:, t] = (hs[t + 1] * wy[:, t, :, None, :]).sum(-1)
        dk[:, t] = (Gz * v[:, t, :, None, :]).sum(-1)
        dv[:, t] = (Gz * kh[:, t, :, :, None]).sum(-2)
        df[:, t] = (dH * (prevs[t] - us[t])).sum((-1, -2))
        dW += (prevs[t].transpose(-1, -2) @ Gz).sum(0)
        dH = ft * dH + Gz @ W.transpose(-1, -2)
        if resets is not None:
            dH = dH.masked_fill(resets[:, t, None, None, None], 0)
    grads = [dq.view(B, T, G, per, K).sum(3), dk.view(B, T, G, per, K).sum(3), dv, df, dW]
    return y, hs[-1], grads + ([dH] if h0 is not None else [])


@pytest.mark.parametrize("clip", [1e-3, 0.05, 1.0, 100.0])
def test_state_gradient_clipping_by_hand(clip):
    """clip=c clamps the state gradient carried back from later steps to [−c, c] at every step (the forward
    unchanged): the reference's autograd equals the reverse loop written out, in float64. Small c clips
    nearly every element, large c none (then the gradients are the unclipped ones)."""
    xs = inputs(2, 9, 1, 2, 4, 3, seed=11)
    want = _clipped_backward_by_hand(xs, clip)
    got = forward_and_grads(lambda *a: m2rnn_reference(*a, clip=clip), xs)
    plain = forward_and_grads(m2rnn_reference, xs)
    torch.testing.assert_close(got[0], plain[0], rtol=0, atol=0)  # the forward is unchanged
    names = ["y", "h_last", "dq", "dk", "dv", "df", "dW", "dh0"]
    for name, a, b in zip(names, [*got[:2], *got[2]], [*want[:2], *want[2]]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12, msg=name)
    differs = any(not torch.allclose(a, b) for a, b in zip(got[2], plain[2]))
    assert differs == (clip <= 1.0)  # the clip bites at c ≤ 1 here, and not at c = 100


def test_state_gradient_clipping_with_resets_and_chunks():
    """With document starts, and run chunk by chunk under checkpointing, the clipped gradients stay those of
    the loop written out."""
    xs = inputs(2, 11, 2, 4, 5, 3, seed=12)
    resets = torch.zeros(2, 11, dtype=torch.bool, device=DEVICE)
    resets[0, [0, 4, 7]] = True
    resets[1, 9] = True
    want = _clipped_backward_by_hand(xs, 0.05, resets)
    for fn in (m2rnn_reference, lambda *a, **kw: m2rnn_checkpointed(*a, chunk=4, **kw)):
        got = forward_and_grads(lambda *a: fn(*a, resets=resets, clip=0.05), xs)
        for a, b in zip([*got[:2], *got[2]], [*want[:2], *want[2]]):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="clip must be positive"):
        m2rnn_sequential(*xs, clip=0.0)


@needs_triton
@pytest.mark.parametrize("case", ["G1_3heads_T_not_multiple", "G2_odd_KV_no_h0_noncontig", "T1"])
def test_triton_state_gradient_clipping_matches_reference(case):
    B, T, G, H, K, V, chunk, kw = CASES[case]
    xs = inputs(B, T, G, H, K, V, seed=len(case), **kw)
    resets = torch.zeros(B, T, dtype=torch.bool, device=DEVICE)
    resets[0, T // 2] = True
    for r in (None, resets):
        got = forward_and_grads(lambda *a: triton_fn(*a, r, chunk=chunk, clip=0.05), xs)
        want = forward_and_grads(lambda *a: m2rnn_reference(*a, r, clip=0.05), xs)
        for a, b in zip([*got[:2], *got[2]], [*want[:2], *want[2]]):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10)
