"""Run by tests/test_context.py under torchrun: every mixer kind with the sequence split over the ranks
(context parallelism) against the whole sequence in one process, float64, forward and gradients.

    torchrun --standalone --nproc-per-node R tests/context_worker.py OUT_DIR

Each rank builds the same seeded LM, computes the single-process loss and gradients of the full
sequence, then its slice's loss with the mixers' context group set; the slices' parameter gradients are
summed over the ranks (the loss is a sum over positions, so the sum of the slices' losses is the whole's).
Writes OUT_DIR/rank{r}.json: {case: {"logits": max error of this slice, "grads": max error, "worst": name}}.
"""

import faulthandler
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist

from unroll.launch.torchrun import finish_rank

CASES = {  # name: (pattern, ParaGRU/LSTM solver, M²RNN solver, extra model fields)
    "gru_newton": ("GG", "newton", "sequential", {}),
    "gru_handoff": ("G", "sequential", "sequential", {}),
    "lstm_newton": ("L", "newton", "sequential", {}),
    "lstm_handoff": ("L", "sequential", "sequential", {}),
    "m2rnn_handoff": ("M", "newton", "sequential", {}),
    "m2rnn_newton": ("M", "newton", "newton", {}),
    "attention_rope": ("A", "newton", "sequential", {"n_kv_heads": 1}),
    "attention_nope_window": ("A", "newton", "sequential", {"rope": False, "window": 5}),
    "hybrid": ("GAML", "newton", "sequential", {"mlp_pattern": "DEDE"}),
    "tnt": ("TAT", "newton", "sequential", {}),  # local memories fresh per rank, the global one handed on
    # the sequence-parallel Newton with its pieces through torch.compile (the one-process model's too)
    "lstm_newton_compiled": ("L", "newton", "sequential", {"newton_kernel": "compiled"}),
}
# packed documents (resets) under the split: every case (TNT: the gathered slices, each document run whole)
DOCUMENT_CASES = [c for c in CASES if c != "lstm_newton_compiled"]  # (compiling once is enough)


def document_starts(world: int) -> torch.Tensor:
    """resets [2, 6·world]: row 0 has documents starting exactly on the first rank boundary (6) and one token
    after it (7); row 1 has one spanning the boundaries (3 … 10) and one starting on the last token."""
    T = 6 * world
    resets = torch.zeros(2, T, dtype=torch.bool)
    resets[0, [0, 6, 7]] = True
    resets[1, [3, 11, T - 1]] = True
    return resets


def run_case(pattern, solver, m_solver, extra, group, rank, world, documents=False):
    from unroll.models import LM, ModelConfig
    from unroll.models.config import M2RNNConfig, MoEConfig, TNTConfig

    cfg = ModelConfig(
        pattern=pattern,
        vocab_size=40,
        d_model=16,
        n_heads=2,
        solver=solver,
        m2rnn=M2RNNConfig(k_dim=4, v_dim=4, v_heads=4, qk_heads=2, solver=m_solver),
        moe=MoEConfig(experts=4, top_k=2, hidden=8),
        tnt=TNTConfig(heads=2, global_chunk=3, local_chunks=[2, 3], local_reset=6),
        **extra,
    )
    torch.manual_seed(0)
    model = LM(cfg).double()
    T = 6 * world  # slices of 6 tokens: longer than the convolution's reach (3), not a power of two
    tokens = torch.randint(0, 40, (2, T))
    weights = torch.randn(2, T, 40, dtype=torch.float64)
    resets = document_starts(world) if documents else None
    full = model(tokens, resets=resets)
    (full * weights).sum().backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    for block in model.blocks:
        block.mixer.context_group = group
    s = slice(rank * 6, (rank + 1) * 6)
    from unroll.models import recurrent

    solve, compiled = recurrent.newton_solve_seqpar, []

    def recording(*args, **kwargs):  # which solve the mixers asked for
        compiled.append(kwargs.get("compiled", False))
        return solve(*args, **kwargs)

    recurrent.newton_solve_seqpar = recording
    try:
        local = model(tokens[:, s], resets=None if resets is None else resets[:, s])
    finally:
        recurrent.newton_solve_seqpar = solve
    (local * weights[:, s]).sum().backward()
    worst, name = 0.0, ""
    for n, p in model.named_parameters():
        g = (p.grad if p.grad is not None else torch.zeros_like(p)).contiguous()
        dist.all_reduce(g, group=group)
        err = (g - ref[n]).abs().max().item()
        if err >= worst:
            worst, name = err, n
    return {"logits": (local - full[:, s]).abs().max().item(), "grads": worst, "worst": name, "compiled": compiled}


def main(out_dir: str) -> None:
    faulthandler.dump_traceback_later(170, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    results = {}
    try:
        for name, (pattern, solver, m_solver, extra) in CASES.items():
            results[name] = run_case(pattern, solver, m_solver, extra, dist.group.WORLD, rank, world)
        for name in DOCUMENT_CASES:
            pattern, solver, m_solver, extra = CASES[name]
            results[f"{name}_documents"] = run_case(
                pattern, solver, m_solver, extra, dist.group.WORLD, rank, world, documents=True
            )
    except Exception:
        results = {"error": traceback.format_exc()}
    finish_rank(out_dir, rank, results)


if __name__ == "__main__":
    main(sys.argv[1])
