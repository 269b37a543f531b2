"""Run by tests/test_seqpar_newton.py under torchrun: newton_solve_seqpar on every rank against the
single-process newton_solve of the same seeded full problem (computed on every rank), float64.

    torchrun --standalone --nproc-per-node R tests/seqpar_worker.py OUT_DIR

Writes OUT_DIR/rank{r}.json: {check: {"fwd": err, "grad_x": err, "grad_h0": err, "grad_params": err,
"info": SolveInfo dict, "ref_info": ...}} or {"error": traceback}. Gradients of h0 and the parameters are
all-reduced over the group before comparing; h0 is deliberately wrong off rank 0 (it must be ignored).
"""

import faulthandler
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from unroll.launch.torchrun import finish_rank

F64 = dict(dtype=torch.float64)


def problem(kind: str, T: int, seed: int, boundaries: list[int]):
    """(cell factory taking the parameter list, parameters, x, h0, resets, structure) for the full sequence."""
    from unroll.models.m2rnn import M2RNNCell
    from unroll.models.paragru import ParaGRUCell
    from unroll.models.paralstm import ParaLSTMCell

    g = torch.Generator().manual_seed(seed)
    B, D = 2, 3
    if kind.startswith("stiff_"):  # plain Newton's steps blow up: damped steps (tests/stiff_cells.py)
        from stiff_cells import ForgetGatedSwitch, GatedSwitch, stiff_problem

        cell, x, h0, _, structure = stiff_problem(kind.removeprefix("stiff_"), T, seed, a=10.0, B=B, D=D)
        resets = torch.zeros(B, T, dtype=torch.bool)
        for i, t in enumerate(boundaries):
            resets[i % B, t] = True
        kind_cell = GatedSwitch if kind == "stiff_diag" else ForgetGatedSwitch
        return (lambda p: kind_cell(p[0])), [cell.a], x, h0, resets, structure

    def uni(*shape, scale=1.0):
        return (torch.rand(*shape, generator=g, **F64) * 2 - 1) * scale

    if kind == "clipped":  # ParaGRU with recurrent weights up to 8: damped with radii below inf for a while
        g = torch.Generator().manual_seed(3)
        B, D = 2, 3
        params = [(torch.rand(3, D, generator=g, **F64) * 2 - 1) * 8.0]
        h0 = torch.randn(B, D, generator=g, **F64)
        x = torch.randn(B, T, 3, D, generator=g, **F64) * 0.5
        resets = torch.zeros(B, T, dtype=torch.bool)
        resets[0, 64], resets[1, 32], resets[0, 96] = True, True, True
        return (lambda p: ParaGRUCell(p[0])), params, x, h0, resets, "diag"
    if kind == "diag" or kind == "hard":
        params = [uni(3, D, scale=5.0 if kind == "hard" else 1.0)]
        x = torch.randn(B, T, 3, D, generator=g, **F64) * (2.0 if kind == "hard" else 1.0)
        if kind == "hard":
            x[0, :, 0] = -40.0  # row 0: update gate shut, nearly linear, converges; row 1 does not in 3
        make, structure, h0 = (lambda p: ParaGRUCell(p[0])), "diag", torch.randn(B, D, generator=g, **F64)
    elif kind == "block2":
        params = [uni(3, D), uni(2, D)]
        x = torch.randn(B, T, 3, D, generator=g, **F64)
        make, structure = (lambda p: ParaLSTMCell(p[0], p[1])), ("block", 2)
        h0 = torch.randn(B, D, 2, generator=g, **F64)
    elif kind == "m2rnn":  # one head, K = 3 rows, V = 3: state [B, 3, 3], 3×3 Jacobian blocks
        V = 3
        params = [torch.eye(V, **F64).unsqueeze(0) + 0.4 * torch.randn(1, V, V, generator=g, **F64)]
        kv = torch.randn(B, T, D, V, generator=g, **F64)
        f = torch.sigmoid(torch.randn(B, T, 1, 1, generator=g, **F64)).expand(B, T, D, 1)
        x = torch.cat([kv, f], dim=-1)
        make, structure, h0 = (lambda p: M2RNNCell(p[0], D)), ("block", V), torch.randn(B, D, V, generator=g, **F64)
    elif kind == "dense":  # no closed-form Jacobian: forward-mode autodiff, one D×D block
        params = [torch.randn(D, D, generator=g, **F64) * 0.8 / D**0.5]
        x = torch.randn(B, T, D, generator=g, **F64)
        make, structure = (lambda p: lambda h, xx: torch.tanh(h @ p[0] + xx)), "dense"
        h0 = torch.randn(B, D, generator=g, **F64)
    else:
        raise ValueError(kind)
    resets = torch.rand(B, T, generator=g) < 0.08
    resets[:, 0] = False
    for i, t in enumerate(boundaries):  # exactly at rank boundaries
        resets[i % B, t] = True
    return make, params, x, h0, resets, structure


def check(kind: str, group, T: int, seed: int, *, with_resets=True, max_iters=None, compiled=False) -> dict:
    from unroll.kernels import newton_solve
    from unroll.kernels.seqpar_newton import newton_solve_seqpar

    R, r = dist.get_world_size(group), dist.get_rank(group)
    L = T // R
    make, params, x, h0, resets, structure = problem(kind, T, seed, [L * j for j in range(1, R)])
    resets = resets if with_resets else None
    gout = torch.randn(x.shape[0], T, *h0.shape[1:], generator=torch.Generator().manual_seed(seed + 1), **F64)

    leaves = [x.clone().requires_grad_(), h0.clone().requires_grad_(), *[p.clone().requires_grad_() for p in params]]
    ref, ref_info = newton_solve(
        make(leaves[2:]), leaves[0], leaves[1], structure=structure, resets=resets, max_iters=max_iters
    )
    ref_grads = torch.autograd.grad((ref * gout).sum(), leaves)

    sl = slice(r * L, (r + 1) * L)
    h0_here = h0 if r == 0 else h0 + 100.0  # only rank 0's h0 may matter
    mine = [
        x[:, sl].clone().requires_grad_(),
        h0_here.clone().requires_grad_(),
        *[p.clone().requires_grad_() for p in params],
    ]
    from torch._dynamo.utils import counters

    graphs = counters["stats"]["unique_graphs"]
    h, info = newton_solve_seqpar(
        make(mine[2:]),
        mine[0],
        mine[1],
        group=group,
        structure=structure,
        resets=resets[:, sl] if resets is not None else None,
        max_iters=max_iters,
        compiled=compiled,
    )
    grads = [gr.contiguous() for gr in torch.autograd.grad((h * gout[:, sl]).sum(), mine)]
    for gr in grads[1:]:  # (a gradient may be a strided view, which all_reduce would not write back into)
        dist.all_reduce(gr, group=group)

    def err(a, b):
        return float((a - b).detach().abs().max())

    return {
        "fwd": err(h, ref[:, sl]),
        "grad_x": err(grads[0], ref_grads[0][:, sl]),
        "grad_h0": err(grads[1], ref_grads[1]),
        "grad_params": max(err(a, b) for a, b in zip(grads[2:], ref_grads[2:])),
        "info": info.as_dict(),
        "ref_info": ref_info.as_dict(),
        "graphs_compiled": counters["stats"]["unique_graphs"] - graphs,  # by torch.compile, during this solve
    }


def communication(kind: str, T: int, seed: int) -> dict:
    """The bytes each all_gather of one solve (no gradient) contributes, against bytes_per_iteration."""
    from unroll.kernels.seqpar_newton import bytes_per_iteration, newton_solve_seqpar

    R, r = dist.get_world_size(), dist.get_rank()
    L = T // R
    make, params, x, h0, resets, structure = problem(kind, T, seed, [L * j for j in range(1, R)])
    sent, real = [], dist.all_gather_single

    def counting(out, inp, *args, **kw):
        sent.append(inp.numel() * inp.element_size())
        return real(out, inp, *args, **kw)

    dist.all_gather_single = counting
    try:
        with torch.no_grad():
            _, info = newton_solve_seqpar(
                make(params), x[:, r * L : (r + 1) * L], h0, structure=structure, resets=resets[:, r * L : (r + 1) * L]
            )
    finally:
        dist.all_gather_single = real
    return {
        "sent": sent,
        "iterations": info.iterations,
        "expected": bytes_per_iteration(h0.shape[0], h0.shape[1], R, structure=structure, dtype=x.dtype).as_dict(),
    }


def main() -> None:
    out_dir = sys.argv[1]
    faulthandler.dump_traceback_later(170, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results: dict = {}
    try:
        T = 32
        results["diag"] = check("diag", None, T, 1)
        results["diag_no_resets"] = check("diag", None, T, 2, with_resets=False)
        results["block2"] = check("block2", None, T, 3)
        results["m2rnn"] = check("m2rnn", None, T, 4)
        results["dense"] = check("dense", None, T, 5)
        results["fallback_all"] = check("block2", None, T, 6, max_iters=0)
        results["fallback_partial"] = check("hard", None, T, 7, max_iters=3)
        results["converges_hard"] = check("hard", None, T, 7)
        results["stiff_diag"] = check("stiff_diag", None, 128, 10)
        results["stiff_block"] = check("stiff_block", None, 128, 11)
        results["clipped"] = check("clipped", None, 128, 3, max_iters=40)
        results["comm_diag"] = communication("diag", T, 1)
        results["comm_m2rnn"] = communication("m2rnn", T, 4)
        singles = [dist.new_group([j]) for j in range(world)]  # every rank creates every group
        results["one_rank_group"] = check("block2", singles[rank], 16, 8)
        if world == 2:  # the compiled pieces (torch.compile on every rank: seconds each, so on 2 ranks only)
            results["diag_compiled"] = check("diag", None, T, 1, compiled=True)
            results["stiff_block_compiled"] = check("stiff_block", None, 128, 11, compiled=True)
        if world == 4:
            pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
            results["subgroup_pairs"] = check("hard", pairs[rank // 2], T, 9 + rank // 2, max_iters=3)
    except Exception:
        results = {"error": traceback.format_exc()}
    finish_rank(out_dir, rank, results)


if __name__ == "__main__":
    main()
