"""A Triton kernel that the interpreter runs but Triton's compiler rejects (it reads a global that is not a
constexpr, the mistake `unroll check kernels` found in the fused ParaLSTM adjoint), with the `cases` that
`unroll check kernels --cases` takes."""

import triton
import triton.language as tl

SCALE = 2.0  # a plain global: compiled Triton refuses to read it inside a kernel


@triton.jit
def _scale_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + i, tl.load(x_ptr + i, mask=i < n) * SCALE, mask=i < n)


def cases(torch):
    def launch():
        x = torch.arange(10, dtype=torch.float32)
        out = torch.empty_like(x)
        _scale_kernel[(1,)](x, out, 10, BLOCK=16)
        assert torch.equal(out, 2 * x)  # the interpreter runs it

    return [("a kernel reading a plain global", launch)]
