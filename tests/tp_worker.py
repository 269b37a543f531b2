"""Run by tests/test_tensor_parallel.py under torchrun (2 ranks): apply_tensor_parallel against the same
single-device model (same seed, so the same weights on every rank), for every case below, with and
without sequence parallelism.

    torchrun --standalone --nproc-per-node 2 tests/tp_worker.py OUT_DIR

Writes OUT_DIR/rank{r}.json: {check: result dict, or {"error": traceback}}:
  f64/<case>/<sp|nosp>    float64: max |logits − ref|, |loss − ref| (the model's own chunked,
                          vocabulary-parallel loss against the reference's from full logits), max over
                          parameters of |grad.full_tensor() − ref grad| (and which); the same for the loss
                          from the TP model's gathered logits; whether every parameter is a DTensor
  f32/<case>/<sp|nosp>    float32: the losses of 3 AdamW steps, TP (its own loss, chunks of 5) and reference
  vocab_parallel_loss     kernels/cross_entropy.py with the vocabulary split over the 2 ranks, float64, against
                          the plain loss: value, hidden gradient summed over ranks, weight rows' gradient
  placements              each parameter's placement in one model (the plan as applied)
  dcp                     model + AdamW state of a TP run saved with tp_view load into one process's
                          layout, and a single-device save loads into the TP model and optimizer
  errors                  what apply_tensor_parallel refuses, by message; generation refused
"""

import copy
import faulthandler
import os
import sys
import traceback
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.nn.functional as F

from unroll.launch.torchrun import finish_rank

M2 = dict(k_dim=8, v_dim=4, v_heads=4, conv=4)
MOE = dict(experts=4, top_k=2, hidden=16, shared_experts=1, shared_hidden=16, aux_loss_coef=0.01, z_loss_coef=1e-3)
BASE = dict(vocab_size=64, d_model=16, mlp_hidden=32, n_heads=4)

# name → ModelConfig fields: every mixer with a dense and a MoE MLP, ParaRNN heads 1 / 2 / 4 (2 = tp: one
# local head), both solvers, M²RNN with q/k replicated (1 head) and split (2 heads), GQA and untied head.
CASES = {
    "GA-dense-newton": dict(pattern="GA", solver="newton"),
    "GA-moe-seq-heads2": dict(pattern="GA", solver="sequential", rnn_heads=2, mlp_pattern="E"),
    "GA-dense-newton-heads4-gqa-untied": dict(
        pattern="GA", solver="newton", rnn_heads=4, n_kv_heads=2, tie_embeddings=False
    ),
    "LA-moe-newton": dict(pattern="LA", solver="newton", mlp_pattern="E"),
    "LA-dense-seq-heads2": dict(pattern="LA", solver="sequential", rnn_heads=2),
    "MA-dense-qk1": dict(pattern="MA", m2rnn=dict(qk_heads=1, solver="sequential")),
    "MA-moe-qk2": dict(pattern="MA", mlp_pattern="E", m2rnn=dict(qk_heads=2, solver="sequential")),
    "MA-dense-qk2-newton": dict(pattern="MA", m2rnn=dict(qk_heads=2, solver="newton")),
}


def config(**fields):
    from unroll.models.config import M2RNNConfig, ModelConfig, MoEConfig

    fields = {**BASE, **fields}
    fields["m2rnn"] = M2RNNConfig(**{**M2, **fields.get("m2rnn", {})})
    fields["moe"] = MoEConfig(**MOE)
    return ModelConfig(**fields)


def build(cfg, dtype, seed):
    from unroll.models import LM

    torch.manual_seed(seed)
    return LM(cfg).to(dtype)


# packed documents for the f64 checks with resets: row 0 starts documents at 0 and 3, row 1 at 5 (8 inputs)
DOCUMENTS = torch.zeros(2, 8, dtype=torch.bool)
DOCUMENTS[0, [0, 3]] = True
DOCUMENTS[1, 5] = True
DOCUMENT_CASES = ["GA-dense-newton", "LA-moe-newton", "MA-moe-qk2", "MA-dense-qk2-newton"]


def loss_of(model, tokens, resets=None):
    """The reference's loss: cross-entropy of the full logits (+ MoE losses)."""
    logits = model(tokens[:, :-1], resets=resets)
    loss = F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())
    aux = model.aux_loss()
    return logits, (loss + aux if aux is not None else loss)


def model_loss(model, tokens, resets=None):
    """The training loss: the model's own (chunked, vocabulary-parallel under tp) cross-entropy (+ MoE losses)."""
    loss = model(tokens[:, :-1], targets=tokens[:, 1:], resets=resets)
    aux = model.aux_loss()
    return loss + aux if aux is not None else loss


def err(a, b) -> float:
    return float((a.detach() - b.detach()).abs().max())


def parallel(model, mesh, sp):
    from unroll.train.parallel.tensor_parallel import apply_tensor_parallel

    apply_tensor_parallel(model, mesh, sequence_parallel=sp)
    return model


def check_f64(cfg, mesh, sp, seed, loss_chunk, resets=None) -> dict:
    """The reference's loss from full logits against the TP model's own loss (loss_chunk tokens of logits at a
    time, vocabulary-parallel), and against the cross-entropy of the TP model's (gathered) logits: value and
    every parameter's gradient."""
    ref = build(cfg, torch.float64, seed)
    tp = parallel(copy.deepcopy(ref), mesh, sp)
    tp.loss_chunk = loss_chunk
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(seed))
    ref_logits, ref_loss = loss_of(ref, tokens, resets)
    ref_loss.backward()

    def grad_error(model) -> tuple[float, str | None, list[str]]:
        params = dict(model.named_parameters())
        worst, worst_name, missing = 0.0, None, []
        for name, p in ref.named_parameters():
            q = params[name]
            if q.grad is None:
                missing.append(name)
                continue
            e = err(q.grad.full_tensor(), p.grad)
            if e >= worst:
                worst, worst_name = e, name
        return worst, worst_name, missing

    loss = model_loss(tp, tokens, resets)
    loss.backward()
    worst, worst_name, missing = grad_error(tp)
    tp.zero_grad(set_to_none=True)
    logits, logits_loss = loss_of(tp, tokens, resets)
    logits_loss.backward()
    logits_grad = grad_error(tp)[0]
    return {
        "logits": err(logits, ref_logits),
        "loss": err(loss, ref_loss),
        "grad": worst,
        "grad_worst": worst_name,
        "logits_loss": err(logits_loss, ref_loss),
        "logits_grad": logits_grad,
        "grad_scale": max(float(p.grad.abs().max()) for p in ref.parameters()),
        "missing_grads": missing,
        "all_dtensor": all(type(p).__name__ == "DTensor" for p in tp.parameters()),
    }


def check_vocab_parallel_loss(mesh) -> dict:
    """kernels/cross_entropy.py's vocabulary-parallel loss, float64, each rank holding its rows of the [V, d]
    matrix, against the plain loss on the full logits: the loss (on every rank), the gradient with respect to
    the hidden states summed over the ranks, and this rank's weight rows' gradient against those rows of the
    full gradient. Per (N, chunk): the largest of the three errors."""
    from unroll.kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference

    group, tp, rank = mesh.get_group(), mesh.size(), mesh.get_local_rank()
    V, d = 10, 6
    out = {}
    for N, chunk in [(7, 0), (7, 1), (7, 3), (7, 7), (7, 20), (1, 0), (1, 1)]:
        g = torch.Generator().manual_seed(N * 10 + chunk)  # the same inputs on every rank
        hidden = torch.randn(N, d, dtype=torch.float64, generator=g, requires_grad=True)
        weight = torch.randn(V, d, dtype=torch.float64, generator=g, requires_grad=True)
        targets = torch.randint(0, V, (N,), generator=g)
        targets[0] = V - 1  # a target on the last rank's rows
        ref = cross_entropy_reference(hidden, weight, targets)
        ref_dh, ref_dw = torch.autograd.grad(ref, (hidden, weight))
        rows = slice(rank * V // tp, (rank + 1) * V // tp)
        local = weight.detach()[rows].clone().requires_grad_()
        loss = chunked_cross_entropy(hidden, local, targets, chunk=chunk, group=group)
        dh, dw = torch.autograd.grad(loss, (hidden, local))
        dist.all_reduce(dh, group=group)  # each rank's part: the caller sums it over the group
        out[f"N{N}/chunk{chunk}"] = max(err(loss, ref), err(dh, ref_dh), err(dw, ref_dw[rows]))
    return out


def check_f32_training(cfg, mesh, sp, seed, steps=3) -> dict:
    ref = build(cfg, torch.float32, seed)
    tp = parallel(copy.deepcopy(ref), mesh, sp)
    tp.loss_chunk = 5
    out = {}
    for name, model in (("ref", ref), ("tp", tp)):
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        g = torch.Generator().manual_seed(seed + 1)
        losses = []
        for _ in range(steps + 1):  # the last loss is after the last step
            tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=g)
            loss = loss_of(model, tokens)[1] if model is ref else model_loss(model, tokens)
            losses.append(loss.item())
            loss.backward()
            opt.step()
            opt.zero_grad()
        out[name] = losses
    return out


def placements(mesh) -> dict:
    model = parallel(build(config(pattern="GMA", mlp_pattern="DED", rnn_heads=1), torch.float64, 0), mesh, True)
    untied = parallel(build(config(pattern="A", tie_embeddings=False), torch.float64, 0), mesh, True)
    return {name: str(p.placements[0]) for name, p in model.named_parameters()} | {
        "head.weight": str(untied.head.weight.placements[0])
    }


def check_dcp(mesh, path: str) -> dict:
    """Model and AdamW state, TP → single-device layout and back, through get_state_dict / DCP /
    set_state_dict as train/checkpoint/dcp.py does, with tp_view in front of DCP on the TP side."""
    import warnings

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from unroll.train.checkpoint.views import tp_view

    warnings.filterwarnings("ignore")
    cfg = config(pattern="GMA", mlp_pattern="DED", m2rnn=dict(qk_heads=2, solver="sequential"))
    tokens = torch.randint(0, cfg.vocab_size, (2, 9), generator=torch.Generator().manual_seed(1))

    def trained(model):  # one AdamW step, so that the optimizer has state
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        loss_of(model, tokens)[1].backward()
        opt.step()
        return model, opt

    def full(t):
        return t.full_tensor() if hasattr(t, "full_tensor") else t

    def compare(a, a_opt, b, b_opt) -> tuple[float, float]:
        pa, pb = dict(a.named_parameters()), dict(b.named_parameters())
        params = max(err(full(pa[n]), full(pb[n])) for n in pa)
        states = max(
            err(full(a_opt.state[pa[n]][k]), full(b_opt.state[pb[n]][k])) for n in pa for k in ("exp_avg", "exp_avg_sq")
        )
        return params, states

    ref, ref_opt = trained(build(cfg, torch.float64, 5))
    tp, tp_opt = trained(parallel(build(cfg, torch.float64, 5), mesh, True))
    model_sd, optim_sd = get_state_dict(tp, tp_opt)
    dcp.save(tp_view({"model": model_sd, "optim": optim_sd}), checkpoint_id=os.path.join(path, "tp"))
    single, single_opt = trained(build(cfg, torch.float64, 6))  # other weights and state, overwritten
    model_sd, optim_sd = get_state_dict(single, single_opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(sd, checkpoint_id=os.path.join(path, "tp"))
    set_state_dict(single, single_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    to_single = compare(single, single_opt, ref, ref_opt)

    model_sd, optim_sd = get_state_dict(ref, ref_opt)
    dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=os.path.join(path, "single"))
    tp2, tp2_opt = trained(parallel(build(cfg, torch.float64, 7), mesh, True))
    model_sd, optim_sd = get_state_dict(tp2, tp2_opt)
    sd = {"model": model_sd, "optim": optim_sd}
    dcp.load(tp_view(sd), checkpoint_id=os.path.join(path, "single"))
    set_state_dict(tp2, tp2_opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])
    to_tp = compare(tp2, tp2_opt, ref, ref_opt)
    return {
        "tp_to_single_params": to_single[0],
        "tp_to_single_optim": to_single[1],
        "single_to_tp_params": to_tp[0],
        "single_to_tp_optim": to_tp[1],
        "logits_after_load": err(tp2(tokens[:, :-1]), ref(tokens[:, :-1])),
    }


def check_errors(mesh) -> dict:
    from unroll.train.parallel.tensor_parallel.layout import TensorParallelError

    out = {}
    bad = {
        "m2rnn_qk3": config(pattern="M", m2rnn=dict(qk_heads=3, v_heads=6)),
        "gqa_kv1": config(pattern="A", n_kv_heads=1),
        "rnn_heads3": config(pattern="G", d_model=12, rnn_heads=3),
        "mlp_width33": config(pattern="A", mlp_hidden=33),
        "vocab63": config(pattern="A", vocab_size=63),
    }
    for name, cfg in bad.items():
        try:
            parallel(build(cfg, torch.float64, 0), mesh, True)
            out[name] = None
        except TensorParallelError as e:
            out[name] = str(e)
    model = parallel(build(config(pattern="G"), torch.float64, 0), mesh, True)
    try:
        model.step(torch.zeros(2, dtype=torch.long))
        out["step"] = None
    except NotImplementedError as e:
        out["step"] = str(e)
    try:
        model(torch.zeros(2, 7, dtype=torch.long))
        out["odd_length"] = None
    except Exception as e:  # noqa: BLE001
        out["odd_length"] = str(e)
    return out


def main() -> None:
    out_dir = sys.argv[1]
    faulthandler.dump_traceback_later(150, exit=True)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=60))
    from torch.distributed.device_mesh import init_device_mesh

    rank = dist.get_rank()
    mesh = init_device_mesh("cpu", (dist.get_world_size(),), mesh_dim_names=("tp",))
    results: dict = {}

    def run(name, fn, *args):
        try:
            results[name] = fn(*args)
        except Exception:  # noqa: BLE001
            results[name] = {"error": traceback.format_exc()}

    for i, (case, fields) in enumerate(CASES.items()):
        for sp in (True, False):
            tag = "sp" if sp else "nosp"
            # the loss in chunks of 5 of the 16 tokens, or all at once
            run(f"f64/{case}/{tag}", check_f64, config(**fields), mesh, sp, 10 + i, 5 if i % 2 == 0 else 0)
            run(f"f32/{case}/{tag}", check_f32_training, config(**fields), mesh, sp, 10 + i)
            if case in DOCUMENT_CASES:
                run(f"f64/{case}/{tag}-documents", check_f64, config(**fields), mesh, sp, 10 + i, 5, DOCUMENTS)
    run("vocab_parallel_loss", check_vocab_parallel_loss, mesh)
    run("placements", placements, mesh)
    run("dcp", check_dcp, mesh, os.path.join(out_dir, "ckpt"))
    run("errors", check_errors, mesh)
    finish_rank(out_dir, rank, results)


if __name__ == "__main__":
    main()
