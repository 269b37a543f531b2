"""Triton kernels of the fused Newton solve (kernels/fused_newton.py) for any cell whose state per channel is a
k-vector with a k×k Jacobian block (k = 1: a diagonal cell such as ParaGRU; k = 2: ParaLSTM's (c, h)): the whole
Newton solve in one launch (`launch_newton`), its adjoint backward in another (`launch_adjoint`).

  - One program per (sequence b, block of BLOCK_D channels). The channels are independent recurrences, so a
    program's Newton iterations need nothing from any other program: it decides its own convergence, on the
    device, and iterates until its channels converge or `max_iters`.
  - An iteration is one sweep over the sequence in chunks of C steps: per chunk, f and J at the current
    iterate's s_{t−1} (the cell's Triton function), the residual max_t |f − s| / (1 + |f|) over components
    accumulated, and the correction δ_t = J_t δ_{t−1} + (f_t − s_t) by one associative scan of the chunk over
    k×k affine maps, carried from the chunk before (triton_scan's decomposition). The sweep is sequential over
    T/C chunks inside a program, as Mamba's selective-scan kernel is: with B·D/BLOCK_D programs the GPU is full
    in training.
  - Two iterate buffers alternate (the correction is computed from the old iterate while the new one is
    written), so the returned iterate is exactly the one whose residual was measured, as in newton.py: a
    program that converges returns the iterate before the (discarded) last correction.
  - The first guess is f(0, x) (s0 at t = 0), as in newton.py; resets zero s_{t−1} and J_t where a document
    starts. Each program writes its iterations and its residual.
  - The adjoint is one reverse sweep per program: λ_t = g_t + J_{t+1}ᵀ λ_{t+1} by reverse associative scans over
    chunks (J_{t+1} from s*_t and x_{t+1}), and in the same pass the cell's VJP with λ: ∂L/∂x_t, the
    per-channel parameters' gradients (summed over the program's steps; the host sums the programs), ∂L/∂s0.

A cell's Triton code (`FusedBlockKernel`; ParaGRU's and ParaLSTM's in kernels/triton_cells.py) is two
@triton.jit functions over [C, BLOCK_D] tiles, the state given as its k components s_0 … s_{k−1}:
    value_and_jacobian(s_0, …, s_{k−1}, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
        -> (f_0, …, f_{k−1}, J_00, J_01, …, J_{k−1,k−1})          J_ij = ∂f_i/∂s_j, row-major
    vjp(s_0, …, s_{k−1}, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, λ_0, …, λ_{k−1}, du_ptrs, F64)
        -> (ds_0, …, ds_{k−1}, dp_0, …, dp_{P−1})
where u_ptrs point at gate 0 of the tile's inputs (gate g at + g·gate_stride), p_ptr at the parameters ([P, D]
row-major: parameter i of channel d at i·D + d), and vjp stores λ·∂f/∂u into du_ptrs (the same layout) and
returns λ·∂f/∂s_{t−1} and the parameters' λ·∂f/∂p per element. States are [B, T, D, k] (component i of channel d
at k·d + i; for k = 1 that is [B, T, D]). Float64 problems compute in float64, others in float32.

Triton's scan hands its combine function every component as a separate scalar, so the k×k kernels are written
out per (k, P) from the templates below and compiled like any module-level Triton function (their source is
registered with linecache, where Triton reads it); `newton_k2_p5` and `adjoint_k2_p5` are this module's
attributes, as `unroll check kernels` looks them up.
"""

from __future__ import annotations

import functools
import linecache
import re
from dataclasses import dataclass
from typing import Any

import torch
import triton
import triton.language as tl

from unroll.kernels.triton_scan import upcast

# mypy: disable-error-code="untyped-decorator,no-untyped-def"

MAX_K = 4  # the largest block the kernels are written out for (k² + k scan operands per tile)


@dataclass(frozen=True)
class FusedBlockKernel:
    """A k×k-block cell's Triton code (the module docstring gives the contract); params: how many parameter
    gradients its vjp returns (the rows of its fused_params, at most)."""

    value_and_jacobian: Any  # a @triton.jit function
    vjp: Any  # a @triton.jit function
    k: int = 1
    params: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.k <= MAX_K or self.params < 1:
            raise ValueError(f"FusedBlockKernel: k = {self.k} (1 to {MAX_K}), params = {self.params} (≥ 1)")


@triton.jit
def _tile(pid_b, c, cols, T, D, C: tl.constexpr, K: tl.constexpr):
    """Rows (steps) of chunk c, the offsets of component 0 of a [B, T, D, K] tensor's [C, BLOCK_D] tile, its mask."""
    rows = c * C + tl.arange(0, C)
    mask = (rows < T)[:, None] & (cols < D)[None, :]
    offs = ((pid_b.to(tl.int64) * T + rows[:, None]) * D + cols[None, :]) * K
    return rows, offs, mask


@triton.jit
def _inputs(u_ptr, pid_b, rows, cols, T, D, G: tl.constexpr):
    """Pointers to gate 0 of the inputs u [B, T, G, D] at the tile's rows and columns, and the gate stride."""
    return u_ptr + ((pid_b.to(tl.int64) * T + rows[:, None]) * G) * D + cols[None, :], D


@triton.jit
def _starts(reset_ptr, pid_b, rows, T, HAS_RESETS: tl.constexpr):
    """Where a document starts, per row of the tile (nowhere without resets)."""
    starts = rows < 0
    if HAS_RESETS:
        starts = tl.load(reset_ptr + pid_b.to(tl.int64) * T + rows, mask=rows < T, other=0) != 0
    return starts


@triton.jit
def _relative(r, f):
    """|r| / (1 + |f|), NaN as inf (newton.py's residual: not converged); before any tl.maximum, which does not
    propagate NaN by default."""
    x = tl.abs(r) / (1.0 + tl.abs(f))
    return tl.where(x == x, x, float("inf"))


# --------------------------------------------------------------------------------------- the templates
# `{s}` and the like are the comma-separated names of all components (`{j}`, `{a}`, `{m}`: the k² entries of a
# matrix, row-major; `{q}`: the P parameter gradients); a line with `@i` is repeated per component, `@ij` (`@ji`:
# the transposed entry) per matrix entry, `@p` per parameter, each with the index substituted; `{OUTSIDE(ij)}`
# is entry ij where a step is not kept (the identity's outside the sequence, 0 at a reset in it); `{carried}`
# (`{carried_l}`) is row i of the scanned map a (m) times the carry.

_TEMPLATE = '''
@triton.jit
def _combine_{tag}({a}, {b}, {c}, {d}):
    """The map (a, b) then the map (c, d), each s -> M s + v with a k×k M: (c·a, c·b + d)."""
    return {combined}


@triton.jit
def _previous_{tag}(buf_ptr, offs, mask, rows, {first}, starts, D, F64: tl.constexpr):
    """s_{{t−1}} of a tile from the buffer (row 0 of the sequence: first = s0), zero where a document starts."""
    before = mask & (rows > 0)[:, None]
    s@i = upcast(tl.load(buf_ptr + offs - {K} * D + @i, mask=before, other=0.0), F64)
    s@i = tl.where((rows == 0)[:, None], first@i[None, :], s@i)
    s@i = tl.where(starts[:, None], 0.0, s@i)
    return {s}


@triton.jit
def newton_{tag}(
    u_ptr, p_ptr, s0_ptr, reset_ptr, buf_ptr, iters_ptr, res_ptr, T, D, n_chunks, tol, max_iters,
    CELL: tl.constexpr, G: tl.constexpr, HAS_RESETS: tl.constexpr, C: tl.constexpr, BLOCK_D: tl.constexpr,
    F64: tl.constexpr,
):
    """Program (channel block db, sequence b): Newton to convergence in buf[0] or buf[1] ([2, B, T, D, k]), the
    answer left in buf[0]; iterations and residual into [B, n_db]."""
    db, pid_b = tl.program_id(0), tl.program_id(1)
    n_db = tl.num_programs(0)
    B = tl.num_programs(1)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    base = (pid_b.to(tl.int64) * D + cols) * {K}
    first@i = upcast(tl.load(s0_ptr + base + @i, mask=col_mask, other=0.0), F64)
    zero = tl.zeros([BLOCK_D], dtype=first0.dtype)
    slot = B.to(tl.int64) * T * D * {K}  # elements of one iterate buffer
    for c in range(n_chunks):  # the first guess f(0, x), s0 at t = 0
        rows, offs, mask = _tile(pid_b, c, cols, T, D, C, {K})
        starts = _starts(reset_ptr, pid_b, rows, T, HAS_RESETS)
        s@i = tl.where((rows == 0)[:, None] & ~starts[:, None], first@i[None, :], 0.0)
        u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
        {f}, {j} = CELL({s}, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
        tl.store(buf_ptr + offs + @i, f@i.to(buf_ptr.dtype.element_ty), mask=mask)

    # loop-carried scalars as tensors from the start, updated without branches (one type throughout the loop)
    cur = pid_b * 0  # the buffer holding the current iterate
    iterations = pid_b * 0
    residual = tl.max(tl.full([BLOCK_D], float("inf"), first0.dtype), axis=0)
    searching = pid_b == pid_b
    while searching:
        old, new = cur * slot, (1 - cur) * slot
        worst = zero
        # δ before the chunk (δ_{{−1}} = 0: s0 is given)
        carry@i = zero
        for c in range(n_chunks):
            rows, offs, mask = _tile(pid_b, c, cols, T, D, C, {K})
            h@i = upcast(tl.load(buf_ptr + old + offs + @i, mask=mask, other=0.0), F64)
            # s_{{t−1}} of the current iterate: the buffer is only written in the other slot, so t − 1 is there
            starts = _starts(reset_ptr, pid_b, rows, T, HAS_RESETS)
            {s} = _previous_{tag}(buf_ptr + old, offs, mask, rows, {first}, starts, D, F64)
            u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
            {f}, {j} = CELL({s}, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, F64)
            keep = mask & ~starts[:, None]
            r@i = tl.where(mask, f@i - h@i, 0.0)
            rel = zero[None, :]
            rel = tl.maximum(rel, _relative(r@i, f@i))
            worst = tl.maximum(worst, tl.max(tl.where(mask, rel, 0.0), axis=0))
            # J where the step is kept, 0 at a reset, the identity outside the sequence (the carry passes)
            j@ij = tl.where(keep, j@ij, {OUTSIDE(ij)})
            {a}, {d} = tl.associative_scan(({j}, {r}), 0, _combine_{tag})
            d@i = d@i + {carried}
            last = (rows == c * C + C - 1)[:, None]
            carry@i = tl.sum(tl.where(last, d@i, 0.0), axis=0)
            tl.store(buf_ptr + new + offs + @i, (h@i + d@i).to(buf_ptr.dtype.element_ty), mask=mask)
        residual = tl.max(tl.where(col_mask, worst, 0.0), axis=0)
        done = (residual <= tol) | (iterations >= max_iters) | (residual == float("inf"))  # inf: overflowed
        searching = ~done
        iterations = tl.where(done, iterations, iterations + 1)
        cur = tl.where(done, cur, 1 - cur)
    if cur == 1:  # the answer into buf[0]
        for c in range(n_chunks):
            rows, offs, mask = _tile(pid_b, c, cols, T, D, C, {K})
            tl.store(buf_ptr + offs + @i, tl.load(buf_ptr + slot + offs + @i, mask=mask), mask=mask)
    out = pid_b * n_db + db
    tl.store(iters_ptr + out, iterations)
    tl.store(res_ptr + out, residual.to(res_ptr.dtype.element_ty))


@triton.jit
def adjoint_{tag}(
    u_ptr, p_ptr, s0_ptr, reset_ptr, h_ptr, g_ptr, du_ptr, dp_ptr, ds0_ptr, T, D, n_chunks,
    CELL: tl.constexpr, CELL_VJP: tl.constexpr, G: tl.constexpr, HAS_RESETS: tl.constexpr, C: tl.constexpr,
    BLOCK_D: tl.constexpr, F64: tl.constexpr,
):
    """Program (channel block db, sequence b): λ by a reverse sweep, with ∂L/∂u into du [B, T, G, D], the
    parameters' gradients summed over the steps into dp [B, P, D], ∂L/∂s0 into ds0 [B, D, k]."""
    db, pid_b = tl.program_id(0), tl.program_id(1)
    cols = db * BLOCK_D + tl.arange(0, BLOCK_D)
    col_mask = cols < D
    base = (pid_b.to(tl.int64) * D + cols) * {K}
    first@i = upcast(tl.load(s0_ptr + base + @i, mask=col_mask, other=0.0), F64)
    zero = tl.zeros([BLOCK_D], dtype=first0.dtype)
    # λ after the chunk (λ_T = 0)
    carry@i = zero
    ds@i = zero
    dp@p = zero
    for step in range(n_chunks):
        c = n_chunks - 1 - step
        rows, offs, mask = _tile(pid_b, c, cols, T, D, C, {K})
        # J_{{t+1}}: the cell at (s*_t, x_{{t+1}}), zero past the end and where a document starts at t + 1
        nxt = rows + 1
        keep = (nxt < T)[:, None] & col_mask[None, :]
        h@i = upcast(tl.load(h_ptr + offs + @i, mask=mask, other=0.0), F64)
        u_next, gate_stride = _inputs(u_ptr, pid_b, nxt, cols, T, D, G)
        {unused}, {j} = CELL({h}, u_next, gate_stride, keep, p_ptr, cols, col_mask, D, F64)
        keep = keep & ~_starts(reset_ptr, pid_b, nxt, T, HAS_RESETS)[:, None]
        # the transposed J_{{t+1}} where kept, 0 past the end or at a reset there, the identity outside the sequence
        a@ij = tl.where(keep, j@ji, {OUTSIDE(ij)})
        g@i = upcast(tl.load(g_ptr + offs + @i, mask=mask, other=0.0), F64)
        {m}, {l} = tl.associative_scan(({a}, {g}), 0, _combine_{tag}, reverse=True)
        l@i = tl.where(mask, l@i + {carried_l}, 0.0)
        top = (rows == c * C)[:, None]
        carry@i = tl.sum(tl.where(top, l@i, 0.0), axis=0)
        # the cell's VJP with λ at (s*_{{t−1}}, x_t)
        starts = _starts(reset_ptr, pid_b, rows, T, HAS_RESETS)
        {s} = _previous_{tag}(h_ptr, offs, mask, rows, {first}, starts, D, F64)
        u_ptrs, gate_stride = _inputs(u_ptr, pid_b, rows, cols, T, D, G)
        du_ptrs, _ = _inputs(du_ptr, pid_b, rows, cols, T, D, G)
        {e}, {q} = CELL_VJP({s}, u_ptrs, gate_stride, mask, p_ptr, cols, col_mask, D, {l}, du_ptrs, F64)
        dp@p += tl.sum(tl.where(mask, q@p, 0.0), axis=0)
        at_s0 = (rows == 0)[:, None] & mask & ~starts[:, None]
        ds@i += tl.sum(tl.where(at_s0, e@i, 0.0), axis=0)
    tl.store(ds0_ptr + base + @i, ds@i.to(ds0_ptr.dtype.element_ty), mask=col_mask)
    out = pid_b.to(tl.int64) * {P} * D + cols
    tl.store(dp_ptr + out + @p * D, dp@p, mask=col_mask)
'''


def _names(prefix: str, k: int) -> list[str]:
    return [f"{prefix}{i}" for i in range(k)]


def _matrix(prefix: str, k: int) -> list[str]:
    return [f"{prefix}{i}{j}" for i in range(k) for j in range(k)]


def _expand(line: str, k: int, p: int) -> list[str]:
    """A template line, repeated per component (@i), Jacobian entry (@ij, @ji) or parameter (@p)."""
    if "@p" in line:
        return [line.replace("@p", str(q)) for q in range(p)]
    if "@ij" in line or "@ji" in line:
        out = []
        for i in range(k):
            for j in range(k):
                outside = "tl.where(mask, 0.0, 1.0)" if i == j else "0.0"
                out.append(line.replace("{OUTSIDE(ij)}", outside).replace("@ij", f"{i}{j}").replace("@ji", f"{j}{i}"))
        return out
    if "@i" in line:
        return [line.replace("@i", str(i)) for i in range(k)]
    return [line]


def _source(k: int, p: int) -> str:
    """The Newton and adjoint kernels for k-vector states and P parameter gradients, as Python source."""
    combined = [" + ".join(f"c{i}{m} * a{m}{j}" for m in range(k)) for i in range(k) for j in range(k)]
    combined += [" + ".join(f"c{i}{m} * b{m}" for m in range(k)) + f" + d{i}" for i in range(k)]
    lines = []
    for raw in _TEMPLATE.splitlines():
        for line in _expand(raw, k, p):
            # (the scanned map · the carry) for the row the line assigns: d_i (Newton) or l_i (adjoint)
            row = re.match(r"\s*[dl](\d+) = ", line)
            if row is not None and ("{carried}" in line or "{carried_l}" in line):
                maps = "a" if "{carried}" in line else "m"
                term = " + ".join(f"{maps}{row.group(1)}{m} * carry{m}[None, :]" for m in range(k))
                line = line.replace("{carried}", term).replace("{carried_l}", term)
            lines.append(line)
    fields = {
        "tag": f"k{k}_p{p}",
        "K": str(k),
        "P": str(p),
        "combined": "(" + ", ".join(combined) + ")",
        "unused": ", ".join(["_"] * k),
    }
    for name in "a", "c", "j", "m":
        fields[name] = ", ".join(_matrix(name, k))
    for name in "b", "d", "first", "s", "f", "h", "r", "g", "l", "e":
        fields[name] = ", ".join(_names(name, k))
    fields["q"] = ", ".join(_names("q", p))
    return "\n".join(lines).format(**fields)


@functools.cache
def kernels(k: int, p: int) -> tuple[Any, Any]:
    """(Newton kernel, adjoint kernel) for k-vector states and P parameter gradients, written out and compiled
    once per process (the module docstring says why written out)."""
    tag = f"k{k}_p{p}"
    filename = f"<unroll.kernels.triton_newton {tag}>"
    source = _source(k, p)
    # Triton reads a kernel's source through inspect, which finds it in linecache (no mtime: never invalidated)
    linecache.cache[filename] = (len(source), None, source.splitlines(keepends=True), filename)
    namespace: dict[str, Any] = {
        "__name__": __name__, "triton": triton, "tl": tl, "upcast": upcast, "_tile": _tile, "_inputs": _inputs,
        "_starts": _starts, "_relative": _relative,
    }  # fmt: skip
    exec(compile(source, filename, "exec"), namespace)
    return namespace[f"newton_{tag}"], namespace[f"adjoint_{tag}"]


def __getattr__(name: str) -> Any:
    """newton_k{k}_p{P} and adjoint_k{k}_p{P}: the written-out kernels, by name (for `unroll check kernels`)."""
    found = re.fullmatch(r"(newton|adjoint)_k(\d+)_p(\d+)", name)
    if found is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    newton, adjoint = kernels(int(found.group(2)), int(found.group(3)))
    return newton if found.group(1) == "newton" else adjoint


def _launch(T: int, D: int) -> tuple[int, int]:
    """(C, BLOCK_D): chunk rows and channels per program (powers of two; untuned on GPUs)."""
    C = min(64, triton.next_power_of_2(max(T, 1)))
    return C, min(triton.next_power_of_2(D), 32)


def launch_newton(
    kernel: FusedBlockKernel, u: torch.Tensor, params: torch.Tensor, s0: torch.Tensor, starts: torch.Tensor | None,
    tol: float, max_iters: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The Newton kernel on contiguous u [B, T, G, D], params [P, D], s0 [B, D] (k = 1) or [B, D, k], starts uint8
    [B, T] or None: (the last iterate [B, T, *s0.shape[1:]], iterations int32 [B, n_db], residual float64
    [B, n_db]) per program."""
    B, T, G, D = u.shape
    C, block_d = _launch(T, D)
    n_db = triton.cdiv(D, block_d)
    newton, _ = kernels(kernel.k, kernel.params)
    buf = torch.empty((2, B, T, *s0.shape[1:]), dtype=u.dtype, device=u.device)
    iters = torch.empty((B, n_db), dtype=torch.int32, device=u.device)
    res = torch.empty((B, n_db), dtype=torch.float64, device=u.device)
    newton[(n_db, B)](
        u, params, s0, starts if starts is not None else iters, buf, iters, res, T, D, triton.cdiv(T, C), tol,
        max_iters, CELL=kernel.value_and_jacobian, G=G, HAS_RESETS=starts is not None, C=C, BLOCK_D=block_d,
        F64=u.dtype == torch.float64,
    )  # fmt: skip
    return buf[0], iters, res


def launch_adjoint(
    kernel: FusedBlockKernel, g: torch.Tensor, h: torch.Tensor, u: torch.Tensor, params: torch.Tensor,
    s0: torch.Tensor, starts: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # fmt: skip
    """The adjoint kernel: (∂L/∂u, ∂L/∂params, ∂L/∂s0) from g = ∂L/∂h at the solution h (all contiguous)."""
    B, T, G, D = u.shape
    C, block_d = _launch(T, D)
    _, adjoint = kernels(kernel.k, kernel.params)
    du = torch.zeros_like(u)
    dp = torch.zeros((B, kernel.params, D), dtype=torch.float64 if u.dtype == torch.float64 else torch.float32,
                     device=u.device)  # fmt: skip
    ds0 = torch.empty_like(s0)
    adjoint[(triton.cdiv(D, block_d), B)](
        u, params, s0, starts if starts is not None else ds0, h, g, du, dp, ds0, T, D, triton.cdiv(T, C),
        CELL=kernel.value_and_jacobian, CELL_VJP=kernel.vjp, G=G, HAS_RESETS=starts is not None, C=C,
        BLOCK_D=block_d, F64=u.dtype == torch.float64,
    )  # fmt: skip
    return du, dp.sum(0)[: params.shape[0]].to(params.dtype), ds0
