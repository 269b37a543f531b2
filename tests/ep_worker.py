"""Run by tests/test_expert_parallel.py under torchrun: the MoE made expert-parallel over all ranks
(train/parallel/expert_parallel.py) against the single-device MoE on the concatenation of every rank's tokens.

    torchrun --standalone --nproc-per-node R tests/ep_worker.py OUT_DIR

Every rank builds the same seeded module and the same per-rank batches (rank r has 5 + 3r tokens, so
the ranks' batches differ in size), computes the single-process output and gradients of
loss = Σ_r Σ(out_r · w_r) on the concatenation, then applies expert parallelism and runs only its own
batch with loss_r = Σ(out_r · w_r). Checked per rank: its output rows and input gradient; its experts'
gradients against the reference's slice (complete sums, no reduction); replicated parameters' gradients
summed over the ranks; the load counts summed over the ranks. Writes OUT_DIR/rank{r}.json:
{case: {"received": rows this rank's experts got, "expert_grad_norm": ..., "out": err, "x_grad": err,
"experts": err, "replicated": err, "load": err, "tol": tol, ...}}.
"""

import faulthandler
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from unroll.launch.torchrun import finish_rank

D, E, K, H = 8, 8, 2, 6

CASES = {  # name: (MoE kwargs, options)
    "softmax": ({}, {}),
    "softmax_shared": ({"shared_experts": 1, "shared_hidden": 5}, {}),
    "sigmoid": ({"score": "sigmoid"}, {}),
    "sigmoid_shared": ({"score": "sigmoid", "shared_experts": 2, "shared_hidden": 3}, {}),
    # Every assignment to experts 0 and 1 (rank 0's): all other ranks receive nothing, send everything.
    "skew_all_to_rank0": ({"shared_experts": 1, "shared_hidden": 4}, {"skew": (0, 1)}),
    # top-1, every token to the last expert: only the last rank computes.
    "skew_top1_last": ({"top_k": 1, "score": "sigmoid"}, {"skew": (E - 1,)}),
    # Rank 1 has no tokens at all.
    "empty_rank": ({"shared_experts": 1, "shared_hidden": 4}, {"tokens": lambda r: 0 if r == 1 else 7 + r}),
    "batch_3d": ({}, {"shape": lambda r: (2, 2 + r)}),
    # float32 on torch._grouped_mm (row widths of 32 bytes), reference on it too.
    "float32_grouped": ({"hidden": 8}, {"dtype": torch.float32, "grouped": True, "tol": 1e-5}),
}


def max_err(a, b) -> float:
    return (a - b).abs().max().item() if a.numel() else 0.0


def run_moe_case(kw, opt, group, rank, world):
    from unroll.models.moe import MoE
    from unroll.train.parallel.expert_parallel import apply_expert_parallel

    dtype = opt.get("dtype", torch.float64)
    torch.manual_seed(0)
    moe = MoE(D, **({"n_experts": E, "top_k": K, "hidden": H, "init_std": 0.4} | kw)).to(dtype)
    moe.use_grouped_mm = opt.get("grouped", False)
    with torch.no_grad():
        moe.expert_bias.copy_(0.1 * torch.randn(E))  # nonzero: selection shifted, weights not
        for e in opt.get("skew", ()):
            moe.expert_bias[e] = 100.0
    gen = torch.Generator().manual_seed(1)
    shape = opt.get("shape", lambda r: (opt.get("tokens", lambda r: 5 + 3 * r)(r),))
    xs = [torch.randn(*shape(r), D, generator=gen, dtype=dtype) for r in range(world)]
    ws = [torch.randn(x.shape, generator=gen, dtype=dtype) for x in xs]

    x_all = torch.cat([x.reshape(-1, D) for x in xs]).requires_grad_()
    out_all = moe(x_all)
    (out_all * torch.cat([w.reshape(-1, D) for w in ws])).sum().backward()
    ref = {n: p.grad.clone() for n, p in moe.named_parameters()}
    ref_load = moe.last_load.clone()
    lo = sum(xs[r].reshape(-1, D).shape[0] for r in range(rank))
    rows = slice(lo, lo + xs[rank].reshape(-1, D).shape[0])
    moe.zero_grad(set_to_none=True)

    apply_expert_parallel(moe, group)
    x = xs[rank].clone().requires_grad_()
    out = moe(x)
    (out * ws[rank]).sum().backward()

    n_local = E // world
    experts = replicated = 0.0
    for n, p in moe.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if n in ("w_gate_up", "w_down"):
            assert p.shape[0] == n_local, (n, p.shape)
            experts = max(experts, max_err(g, ref[n][rank * n_local : (rank + 1) * n_local]))
        else:
            g = g.clone().contiguous()
            dist.all_reduce(g, group=group)
            replicated = max(replicated, max_err(g, ref[n]))
    load = moe.last_load.clone()
    dist.all_reduce(load, group=group)
    expert_norm = moe.w_gate_up.grad.norm().item() + moe.w_down.grad.norm().item()
    return {
        "received": load[rank * n_local : (rank + 1) * n_local].sum().item(),
        "expert_grad_norm": expert_norm,
        "out": max_err(out.reshape(-1, D), out_all[rows].detach()),
        "x_grad": max_err(x.grad.reshape(-1, D), x_all.grad[rows]),
        "experts": experts,
        "replicated": replicated,
        "load": max_err(load, ref_load),
        "tol": opt.get("tol", 1e-10),
    }


def run_lm_case(group, rank, world):
    """Two attention + MoE blocks: the whole-model helper, several layers' exchanges in one backward,
    and scale_expert_grads."""
    from unroll.models import LM, ModelConfig
    from unroll.models.config import MoEConfig
    from unroll.train.parallel.expert_parallel import (
        apply_expert_parallel_to_model,
        expert_parameters,
        scale_expert_grads,
    )

    cfg = ModelConfig(
        pattern="AA",
        mlp_pattern="E",
        vocab_size=40,
        d_model=16,
        n_heads=2,
        moe=MoEConfig(experts=4, top_k=2, hidden=8, shared_experts=1, score="sigmoid"),
    )
    torch.manual_seed(0)
    model = LM(cfg).double()
    with torch.no_grad():
        for _, moe in model.moe_layers():
            moe.expert_bias.copy_(0.1 * torch.randn(4))
    gen = torch.Generator().manual_seed(2)
    batches = [1 + r for r in range(world)]  # different batch sizes per rank
    tokens = torch.randint(0, 40, (sum(batches), 6), generator=gen)
    weights = torch.randn(sum(batches), 6, 40, generator=gen, dtype=torch.float64)
    full = model(tokens)
    (full * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    converted = apply_expert_parallel_to_model(model, group)
    rows = slice(sum(batches[:rank]), sum(batches[: rank + 1]))
    local = model(tokens[rows])
    (local * weights[rows]).sum().backward()
    names = {n for n, _ in expert_parameters(model)}
    n_local = 4 // world
    experts = replicated = 0.0
    for n, p in model.named_parameters():
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        if n in names:
            experts = max(experts, max_err(g, ref[n][rank * n_local : (rank + 1) * n_local]))
        else:
            g = g.clone().contiguous()
            dist.all_reduce(g, group=group)
            replicated = max(replicated, max_err(g, ref[n]))
    before = {n: p.grad.clone() for n, p in expert_parameters(model)}
    scale_expert_grads(model, 0.5)
    scaled = max(max_err(p.grad, 0.5 * before[n]) for n, p in expert_parameters(model))
    return {
        "out": max_err(local, full[rows].detach()),
        "experts": experts,
        "replicated": replicated,
        "tol": 1e-10,
        "converted": converted,
        "expert_names": sorted(names),
        "scaled": scaled,
    }


def run_errors(group, world):
    from unroll.models.moe import MoE
    from unroll.train.parallel.expert_parallel import apply_expert_parallel

    out = {}
    try:
        apply_expert_parallel(MoE(D, world + 1, 1, H), group)
        out["indivisible"] = "no error"
    except ValueError as e:
        out["indivisible"] = str(e)
    moe = MoE(D, 2 * world, 1, H)
    apply_expert_parallel(moe, group)
    try:
        apply_expert_parallel(moe, group)
        out["twice"] = "no error"
    except ValueError as e:
        out["twice"] = str(e)
    return out


def main(out_dir: str) -> None:
    faulthandler.dump_traceback_later(100, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    group = dist.group.WORLD
    results = {}
    try:
        for name, (kw, opt) in CASES.items():
            results[name] = run_moe_case(kw, opt, group, rank, world)
        results["lm"] = run_lm_case(group, rank, world)
        results["errors"] = run_errors(group, world)
    except Exception:
        results = {"error": traceback.format_exc()}
    finish_rank(out_dir, rank, results)


if __name__ == "__main__":
    main(sys.argv[1])
