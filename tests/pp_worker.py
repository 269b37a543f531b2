"""Run by tests/test_pipeline.py under torchrun (2 ranks): every pipeline schedule, through the trainer's
`Pipeline` (train/parallel/pipeline.py), against one process, float64, loss and gradients.

    torchrun --standalone --nproc-per-node 2 tests/pp_worker.py OUT_DIR

Each rank builds the same seeded LM and computes the single-process loss from full logits (the mean over
the microbatches, which is the whole batch's mean: equal-size microbatches) and its gradients; then runs
`Pipeline.step`, whose last stage computes the loss itself (in chunks where a case says so), twice, and
compares the gradient of every parameter its stages hold (the tied copies' gradients summed by the step)
with the single-process one (the tied replica against `embed.weight`).
Writes OUT_DIR/rank{r}.json: {case: {"loss": error of the microbatches' mean loss or null off the last
stage, "grads": max error, "worst": name, "names": [LM parameter names this rank holds], "copy": the largest
difference between the tied embedding's two copies after an AdamW step}}.
"""

import faulthandler
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unroll.launch.torchrun import finish_rank

CASES = {  # name: (schedule, pattern, extra model fields)
    "gpipe_tied": ("GPipe", "GA|LG", {}),
    "1f1b_untied": ("1F1B", "GA|LG", {"tie_embeddings": False}),
    "1f1b_auto_split": ("1F1B", "GALA", {}),
    "interleaved_1f1b_tied": ("Interleaved1F1B", "GA|LG|GA|LG", {}),
    "looped_bfs_untied": ("LoopedBFS", "GA|LG|GA|LG", {"tie_embeddings": False}),
    "interleaved_zb_tied": ("InterleavedZeroBubble", "GA|LG|GA|LG", {}),
    "zbv_tied": ("ZBVZeroBubble", "GA|LG|GA|LG", {}),
    "zbv_untied": ("ZBVZeroBubble", "GA|LG|GA|LG", {"tie_embeddings": False}),
    "dualpipev_tied": ("DualPipeV", "GA|LG|GA|LG", {}),
    "gpipe_m2rnn_moe": ("GPipe", "GM|AL", {"mlp_pattern": "DEDE"}),  # no aux-loss coefficients
    # the last stage's loss in chunks of 5 of a microbatch's 12 tokens (recomputed in the backward), also
    # under the zero-bubble schedules' separate input and weight backward passes
    "1f1b_tied_loss_chunks": ("1F1B", "GA|LG", {"loss_chunk": 5}),
    "interleaved_zb_untied_loss_chunks": (
        "InterleavedZeroBubble",
        "GA|LG|GA|LG",
        {"tie_embeddings": False, "loss_chunk": 5},
    ),
    "zbv_tied_loss_chunks": ("ZBVZeroBubble", "GA|LG|GA|LG", {"loss_chunk": 5}),
    # packed documents: the resets split into microbatches with the inputs and given to every stage
    "1f1b_documents": ("1F1B", "GM|AL", {"documents": True}),
    "interleaved_zb_documents": ("InterleavedZeroBubble", "GA|LG|GA|LM", {"documents": True}),
}
N_MB = 4


def reference_loss(logits, targets):
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten())


def run_case(schedule, pattern, extra, group):
    from unroll.models import LM, ModelConfig
    from unroll.models.config import M2RNNConfig, MoEConfig
    from unroll.train.parallel.pipeline import Pipeline

    extra = dict(extra)
    loss_chunk = extra.pop("loss_chunk", 0)
    documents = extra.pop("documents", False)
    cfg = ModelConfig(
        pattern=pattern,
        vocab_size=40,
        d_model=16,
        n_heads=2,
        solver="newton",
        m2rnn=M2RNNConfig(k_dim=4, v_dim=4, v_heads=4, qk_heads=2, solver="sequential"),
        moe=MoEConfig(experts=4, top_k=2, hidden=8),
        **extra,
    )
    torch.manual_seed(0)
    model = LM(cfg).double()
    tokens = torch.randint(0, 40, (2 * N_MB, 6))
    targets = torch.randint(0, 40, (2 * N_MB, 6))
    resets = (torch.rand(2 * N_MB, 6) < 0.3) if documents else None
    ref_loss = torch.stack(
        [
            reference_loss(model(t, resets=r), y)
            for t, y, r in zip(
                tokens.chunk(N_MB), targets.chunk(N_MB), [None] * N_MB if resets is None else resets.chunk(N_MB)
            )
        ]
    ).mean()
    ref_loss.backward()
    ref = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    model.loss_chunk = loss_chunk  # the stages compute the loss as the model does
    pipe = Pipeline(model, group, schedule, hidden_dtype=torch.float64)
    modules = pipe.modules
    assert all(m.loss_chunk == loss_chunk for m in modules)
    out = {"loss": None, "grads": 0.0, "worst": "", "names": []}
    for _ in range(2):
        for m in modules:
            m.zero_grad(set_to_none=True)
        loss_sum, _ = pipe.step(tokens, targets, N_MB, torch.device("cpu"), resets)  # tied gradients summed too
        if pipe.last:
            out["loss"] = max(out["loss"] or 0.0, abs(loss_sum.item() / N_MB - ref_loss.item()))
        for m in modules:
            for n, p in m.named_parameters():
                name = "embed.weight" if n == "tied_embed_weight" else n
                g = p.grad if p.grad is not None else torch.zeros_like(p)
                err = (g - ref[name]).abs().max().item()
                if err >= out["grads"]:
                    out["grads"], out["worst"] = err, n
                if name not in out["names"]:
                    out["names"].append(name)
    out["all_names"] = list(ref)
    # an optimizer step over the stages' parameters: the tied embedding's two copies stay equal
    params = list({id(p): p for m in modules for p in m.parameters()}.values())
    torch.optim.AdamW(params, lr=0.1, weight_decay=0.1).step()
    copies = {"first" if m.first else "last": m.tied_weight().detach() for m in modules if m.tied_weight() is not None}
    held = [None] * dist.get_world_size(group)
    dist.all_gather_object(held, copies, group=group)
    copies = {k: v for c in held for k, v in c.items()}
    out["copy"] = (copies["first"] - copies["last"]).abs().max().item() if copies else 0.0
    return out


def main(out_dir: str) -> None:
    faulthandler.dump_traceback_later(150, exit=True)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    torch.set_num_threads(1)
    rank = dist.get_rank()
    results = {}
    try:
        for name, (schedule, pattern, extra) in CASES.items():
            results[name] = run_case(schedule, pattern, extra, dist.group.WORLD)
    except Exception:
        results = {"error": traceback.format_exc()}
    finish_rank(out_dir, rank, results)


if __name__ == "__main__":
    main(sys.argv[1])
