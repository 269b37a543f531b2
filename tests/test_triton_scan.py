"""scan_triton (kernels/triton_scan.py) against scan_reference, and through linear_scan(impl=scan_triton)
forward and backward against the default impl. Without a GPU the kernels run in Triton's interpreter
(conftest sets TRITON_INTERPRET=1), which costs ~ms per program step: sizes stay small, and small chunks
stand in for long sequences (T=129 in chunks of 4 recurses four levels deep, as blocks at T≈10⁶ do by
default). Failing-test checks done by hand: an off-by-one in the chunk carry, the summary taken one row
early, a chunk one step short, a transposed k×k product, no float32 upcast, no .contiguous() — each fails."""

import pytest
import torch

pytest.importorskip("triton")

from conftest import scan_inputs  # noqa: E402

from unroll.kernels import triton_scan as ts  # noqa: E402
from unroll.kernels.linear_scan import linear_scan, scan_reference  # noqa: E402
from unroll.kernels.triton_scan import scan_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5)}


def inputs(T, k, seed, dtype=torch.float64, B=2, D=3):
    """a, b, h0 (k=0: diagonal) and resets [B, T], on the test device in `dtype`."""
    a, b, h0, resets = scan_inputs(T, k, seed, B=B, D=D, reset_rate=0.1)
    return [x.to(DEVICE, dtype) for x in (a, b, h0)] + [resets.to(DEVICE)]


# float64 on the whole grid; float32 (the same kernels, other casts) on a part of it, for interpreter time
FORWARD = [(k, T, "float64") for k in (0, 1, 2, 3, 16) for T in (1, 7, 64, 129)] + [
    (k, T, "float32") for k in (0, 1, 2, 3, 16) for T in (1, 7, 129) if T < 129 or k in (0, 2, 16)
]


@pytest.mark.parametrize("k,T,dtype", FORWARD)  # k = 0: diagonal
def test_forward_matches_reference(k, T, dtype):
    dtype = getattr(torch, dtype)
    a, b, h0, _ = inputs(T, k, seed=10 * T + k, dtype=dtype, B=1 if k in (1, 3, 16) else 2)
    h = scan_triton(a, b, h0, bool(k))
    assert h.dtype == dtype and h.shape == b.shape
    # float32 against the float64 reference on the same (rounded) inputs
    ref = scan_reference(a.double(), b.double(), h0.double(), bool(k)).to(dtype)
    torch.testing.assert_close(h, ref, **TOL[dtype])


@pytest.mark.parametrize("T,chunk", [(7, 2), (64, 4), (129, 4)])
@pytest.mark.parametrize("k", [0, 2, 3])
def test_small_chunks_recurse(k, T, chunk):
    """Chunks much shorter than T: several levels of chunk summaries, a short last chunk at every level."""
    a, b, h0, _ = inputs(T, k, seed=T + chunk + k, B=1 if k else 2, D=5)
    torch.testing.assert_close(
        scan_triton(a, b, h0, bool(k), chunk=chunk), scan_reference(a, b, h0, bool(k)), **TOL[torch.float64]
    )


GRADS = [
    (0, 129, None, "float64"),
    (0, 129, None, "float32"),
    (0, 64, 4, "float64"),
    (2, 65, None, "float64"),
    (2, 65, None, "float32"),
    (3, 33, 4, "float64"),
    (16, 9, 4, "float64"),
]


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("k,T,chunk,dtype", GRADS)
def test_linear_scan_forward_and_backward(k, T, chunk, dtype, reverse):
    """linear_scan with impl=scan_triton (resets, non-zero h0, reverse) against the default impl, gradients
    of a, b and h0 included; the backward runs scan_triton on flipped, transposed coefficients."""
    dtype = getattr(torch, dtype)
    a, b, h0, resets = inputs(T, k, seed=T + k + reverse, dtype=dtype, B=1 if k == 16 else 2)

    def impl(a_, b_, h0_, block):
        return scan_triton(a_, b_, h0_, block, chunk=chunk)

    leaves = [x.requires_grad_() for x in (a, b, h0)]
    h = linear_scan(a, b, h0, reverse=reverse, resets=resets, impl=impl)
    ref = linear_scan(a, b, h0, reverse=reverse, resets=resets)
    tol = TOL[dtype] if dtype == torch.float64 else dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(h, ref, **tol)
    g = torch.randn_like(h)
    grads = torch.autograd.grad((h * g).sum(), leaves)
    grads_ref = torch.autograd.grad((ref * g).sum(), leaves)
    for name, x, r in zip(["a", "b", "h0"], grads, grads_ref):
        torch.testing.assert_close(x, r, **tol, msg=lambda m: f"grad {name}: {m}")


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("k", [0, 3])
def test_16_bit_inputs_accumulate_in_float32(k, dtype):
    dtype = getattr(torch, dtype)
    a, b, h0, _ = inputs(65, k, seed=3, dtype=dtype)
    h = scan_triton(a, b, h0, bool(k), chunk=8)
    assert h.dtype == dtype
    ref = scan_reference(a.float(), b.float(), h0.float(), bool(k))
    # float32 accumulation: only the final rounding to 16 bits (one ulp) separates the two
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(h.float(), ref, rtol=eps, atol=eps * ref.abs().max().item())


@pytest.mark.parametrize("k", [0, 2])
def test_non_contiguous_inputs(k):
    a, b, h0, _ = inputs(20, k, seed=4, D=4)

    # the same values laid out [D, B, T, ...] and viewed back as [B, T, D, ...]
    def strided(x, dims):
        return x.permute(*dims).contiguous().permute(*[dims.index(i) for i in range(len(dims))])

    a2 = strided(a, (2, 0, 1, 3, 4) if k else (2, 0, 1))
    b2, h02 = strided(b, (2, 0, 1, 3) if k else (2, 0, 1)), h0.transpose(0, 1).contiguous().transpose(0, 1)
    assert not (a2.is_contiguous() or b2.is_contiguous() or h02.is_contiguous())
    torch.testing.assert_close(
        scan_triton(a2, b2, h02, bool(k), chunk=4), scan_reference(a, b, h0, bool(k)), **TOL[torch.float64]
    )


def test_empty_and_bad_arguments():
    a, b, h0, _ = inputs(0, 0, seed=0)
    assert scan_triton(a, b, h0, False).shape == (2, 0, 3)
    a, b, h0, _ = inputs(5, 2, seed=0)
    with pytest.raises(ValueError, match="power of two"):
        scan_triton(a, b, h0, True, chunk=3)
    with pytest.raises(ValueError, match="block-diagonal"):
        scan_triton(a[..., 0], b, h0, True)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        scan_triton(a, b.to(torch.int32), h0, True)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU-tensor check")
def test_cpu_tensors_need_the_interpreter(monkeypatch):
    assert ts.interpreted()  # conftest chose the interpreter before triton was imported
    monkeypatch.setattr(ts, "interpreted", lambda: False)
    a, b, h0, _ = inputs(5, 0, seed=0)
    with pytest.raises(RuntimeError, match="Triton kernels need a CUDA device or TRITON_INTERPRET=1"):
        scan_triton(a, b, h0, False)


@pytest.mark.parametrize(
    "T,block",
    [
        (1, False),
        (129, False),
        (16384, False),
        (4097, False),
        (1, True),
        (8, True),
        (9, True),
        (4097, True),
        (16384, True),
    ],
)
def test_default_chunk(T, block):
    C = ts.default_chunk(T, block)
    assert C & (C - 1) == 0
    N = -(-T // C)
    assert N - 1 <= (C if not block else C * C)  # at most two (diagonal) or three (blocks) levels here
