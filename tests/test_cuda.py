"""CUDA paths (skipped without a GPU): bf16 autocast training, checkpoints with CUDA tensors and RNG,
resume, generation, and the adjoint recurrence against float64 on the CPU.

On a GPU machine: `pytest -s tests/test_cuda.py`. UNROLL_CUDA_DATA=DIR (holding tokenizer.model and
shards/{train,valid}.bin/.idx) uses prepared data instead of building the small test corpus.
"""

import math
import os
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from conftest import tiny_config_dict

from unroll.kernels import newton_solve, sequential_solve
from unroll.models.paragru import ParaGRUCell
from unroll.train.config import load_config
from unroll.train.metrics import read_metrics
from unroll.train.parallel import distributed as D
from unroll.train.trainer import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture
def cuda_data(request):
    root = os.environ.get("UNROLL_CUDA_DATA")
    if root:
        from unroll.data.tokenizer import Tokenizer

        return SimpleNamespace(
            tokenizer=f"{root}/tokenizer.model",
            train=f"{root}/shards/train",
            valid=f"{root}/shards/valid",
            vocab=Tokenizer(f"{root}/tokenizer.model").vocab_size,
        )
    return request.getfixturevalue("small_data")


def config(data, run_dir: Path, **sections) -> str:
    base = dict(
        model={"pattern": "GGGG", "d_model": 192, "n_heads": 4},
        run={"device": "cuda", "dtype": "auto", "threads": 0},
        data={"seq_len": 128},
        train={"batch_size": 32, "steps": 60, "log_every": 1},
        checkpoint={"every": 20},
        eval={"every": 20, "batches": 4, "batch_size": 32},
        sample={"prompt": "KING.", "max_new_tokens": 40},
    )
    for section, values in sections.items():
        base[section] = {**base.get(section, {}), **values}
    cfg = tiny_config_dict(data, run_dir, **base)
    path = run_dir.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_bf16_training_checkpoint_resume_and_sample_on_cuda(cuda_data, tmp_path, monkeypatch):
    straight = load_config(config(cuda_data, tmp_path / "straight"))
    summary = train(straight)
    rows = read_metrics(straight.run.dir)
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    tok_s = [r["tokens_per_s"] for r in rows if "loss" in r][5:]
    print(
        f"\ncuda bf16 ParaGRU d=192: val ppl {math.exp(val[0]):.1f} -> {math.exp(val[-1]):.1f}, "
        f"median {sorted(tok_s)[len(tok_s) // 2]:,.0f} tokens/s"
    )
    assert val[-1] < val[0] - 1.0 and summary["sample"].startswith("KING.")

    # the same run stopped at step 40 (as by SIGTERM) and resumed: CUDA tensors and CUDA RNG through DCP
    resumed = load_config(config(cuda_data, tmp_path / "resumed"))
    real, steps_seen = D.any_rank, []

    def stop_at_step_40(flag, device):  # the loop asks once per step whether any rank got a signal
        steps_seen.append(flag)
        return real(flag, device) or len(steps_seen) == 40

    monkeypatch.setattr(D, "any_rank", stop_at_step_40)
    assert train(resumed) == {"step": 40, "stopped": True}
    monkeypatch.undo()
    assert train(resumed)["step"] == 60
    a = {r["step"]: r["loss"] for r in rows if "loss" in r}
    b = {r["step"]: r["loss"] for r in read_metrics(resumed.run.dir) if "loss" in r}
    assert a.keys() == b.keys()
    worst = max(abs(a[s] - b[s]) / abs(a[s]) for s in a)
    print(
        f"resume on cuda at step 40: max relative loss difference over 60 steps {worst:.2e} "
        f"({'bit-exact' if worst == 0 else 'not bit-exact'})"
    )
    assert worst < 1e-3


@pytest.mark.parametrize("solver", ["newton", "sequential"])
def test_solvers_on_cuda_match_float64_cpu(solver):
    """ParaGRU's recurrence solved on the GPU (Newton with the Triton scan, or the sequential loop; both
    with the adjoint backward through the Triton scan) against the sequential solve in float64 on CPU."""
    from unroll.kernels.triton_scan import scan_triton

    torch.manual_seed(0)
    B, T, D = 4, 257, 64
    u = torch.randn(B, T, 3, D, dtype=torch.float64)
    a = torch.empty(3, D, dtype=torch.float64).uniform_(-2, 2)
    h0 = torch.randn(B, D, dtype=torch.float64)
    g = torch.randn(B, T, D, dtype=torch.float64)

    def run(solve, device, dtype, **kw):
        u_, h0_, a_ = [t.to(device, dtype).requires_grad_() for t in (u, h0, a)]
        h, _ = solve(ParaGRUCell(a_), u_, h0_, **kw)
        grads = torch.autograd.grad((h * g.to(device, dtype)).sum(), (u_, h0_, a_))
        return [t.double().cpu() for t in (h, *grads)]

    ref = run(sequential_solve, "cpu", torch.float64)
    solve = newton_solve if solver == "newton" else sequential_solve
    for dtype, tol in ((torch.float64, 1e-10), (torch.float32, 1e-3)):
        for name, x, r in zip(("h", "du", "dh0", "da"), run(solve, "cuda", dtype, scan_impl=scan_triton), ref):
            torch.testing.assert_close(x, r, rtol=tol, atol=tol, msg=f"{name} {dtype}")


@pytest.mark.parametrize("documents", [False, True], ids=["one-stream", "documents"])
@pytest.mark.parametrize("K,V,heads", [(64, 16, 8), (32, 64, 4)])
def test_m2rnn_triton_on_cuda_matches_float64_cpu(K, V, heads, documents):
    """The compiled M²RNN kernels (forward and backward, float32) against the PyTorch loop in float64 on
    the CPU, at the 7B preset's head shape and a wide-V one, over a length that spans many chunks; with
    documents, the state restarts at starts on and off chunk edges."""
    from unroll.kernels.m2rnn_scan import m2rnn_reference
    from unroll.kernels.triton_m2rnn import m2rnn_triton

    g = torch.Generator().manual_seed(0)
    B, T, G = 2, 300, 2
    inputs = [
        torch.randn(B, T, G, K, generator=g) / K**0.5,
        torch.randn(B, T, G, K, generator=g) / K**0.5,
        torch.randn(B, T, heads, V, generator=g),
        torch.rand(B, T, heads, generator=g) * 0.5 + 0.5,
        torch.eye(V) + 0.1 * torch.randn(heads, V, V, generator=g),
        0.1 * torch.randn(B, heads, K, V, generator=g),
    ]
    w_y, w_h = torch.randn(B, T, heads, V, generator=g), torch.randn(B, heads, K, V, generator=g)
    resets = torch.zeros(B, T, dtype=torch.bool)
    resets[0, [0, 31, 32, 150]] = resets[1, [64, 299]] = documents

    def run(fn, tensors):
        leaves = [t.clone().requires_grad_() for t in tensors]
        y, h = fn(*leaves, resets.to(leaves[0].device) if documents else None)
        ((y * w_y.to(y)).sum() + (h * w_h.to(h)).sum()).backward()
        return [y.detach(), h.detach()] + [t.grad for t in leaves]

    want = run(m2rnn_reference, [t.double() for t in inputs])
    got = run(m2rnn_triton, [t.cuda() for t in inputs])
    # the bar: the same loop's own float32 error (W near I + noise lets rounding grow over 300 steps: up to
    # 1e-2 of the largest value at V 64)
    own = run(m2rnn_reference, inputs)
    for name, a, b, c in zip(["y", "h_last", "dq", "dk", "dv", "df", "dW", "dh0"], want, got, own):
        err, bar = (((x.double().cpu() - a).abs().max() / a.abs().max()).item() for x in (b, c))
        print(f"{name}: Triton float32 {err:.1e}, PyTorch float32 {bar:.1e} of the largest float64 value")
        assert err <= 4 * bar + 1e-6, f"{name}: max error {err:.2e}, the float32 loop's {bar:.2e}"


@pytest.mark.parametrize("name", ["paragru-1b", "m2rnn-hybrid-400m"])
def test_plan_matches_what_one_gpu_allocates(name):
    """`unroll plan`'s figures for one GPU against CUDA's own allocator, in a real training step of the preset
    at its sequence length and micro-batch (two micro-batches per step, synthetic tokens): weights after the
    build, weights + optimizer after a step, + gradients just before the step, and the peak of the step
    (paragru-1b measured 4.24, 12.56, 16.73 and 22.56 GiB on an H200)."""
    from unroll.train.build import build_training
    from unroll.train.config import check_world
    from unroll.train.parallel.mesh import Layout
    from unroll.train.planning.plan import estimate
    from unroll.train.step import train_step

    probe = load_config(name)
    cfg = load_config(name, ["run.device=cuda", f"train.batch_size={2 * probe.train.micro_batch_size}"])
    device, layout = torch.device("cuda"), Layout()
    micro, accum = check_world(cfg, 1)
    run = build_training(cfg, D.DistInfo(0, 1, 0, device), layout, micro, accum)
    weights = torch.cuda.memory_allocated()
    before_step = []
    run.optimizer.register_step_pre_hook(lambda *_: before_step.append(torch.cuda.memory_allocated()))
    gen = torch.Generator(device).manual_seed(0)

    def batches(start, n):
        return torch.randint(0, cfg.model.vocab_size, (n, cfg.data.seq_len + 1), generator=gen, device=device)

    for _ in range(2):  # the second step holds the optimizer's moments from the first
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
        start = time.perf_counter()
        train_step(run, cfg, batches, 0, 1e-4, device)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    held, peak = torch.cuda.memory_allocated(), torch.cuda.max_memory_allocated()
    plan = estimate(cfg, layout).components
    measured = {
        "weights": weights,
        "weights+optimizer": held,
        "weights+optimizer+gradients": before_step[-1],
        "peak of the step": peak,
    }
    planned = {
        "weights": plan.weights,
        "weights+optimizer": plan.weights + plan.optimizer,
        "weights+optimizer+gradients": plan.weights + plan.optimizer + plan.gradients,
        "peak of the step": plan.total,
    }
    GiB = 1024**3
    print(
        f"\n{name} on one GPU, {micro} × {cfg.data.seq_len} tokens per micro-batch, {accum} micro-batches: "
        f"{seconds:.2f} s per step, {accum * micro * cfg.data.seq_len / seconds:,.0f} tokens/s; "
        f"plan's components (GiB) {', '.join(f'{k} {v / GiB:.2f}' for k, v in plan.as_dict().items())}"
    )
    for key in measured:
        print(
            f"  {key:30} measured {measured[key] / GiB:7.2f} GiB   plan {planned[key] / GiB:7.2f} GiB   "
            f"plan/measured {planned[key] / measured[key]:.2f}"
        )
    for key in ("weights", "weights+optimizer", "weights+optimizer+gradients"):
        assert planned[key] == pytest.approx(measured[key], rel=0.15), key
    # the plan adds components that peak at different moments (the gathered copies at the end of the
    # backward, the activations at its start), and probes the recurrences' CPU paths, which keep more than
    # the Triton kernels (M²RNN's checkpointed loop): an upper bound, and not a loose one (measured on an
    # H200: 1.22 for paragru-1b, 1.44 for m2rnn-hybrid-400m)
    assert measured["peak of the step"] <= planned["peak of the step"] <= 1.5 * measured["peak of the step"]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-5), (torch.bfloat16, 2e-2)])
def test_flex_document_attention_on_cuda_matches_float64_cpu(dtype, tol):
    """The fused flex_attention over the tile mask (forward and backward) against SDPA with the dense
    document mask in float64 on the CPU: grouped heads, a window, queries after earlier keys, lengths off
    the 128 tile."""
    from unroll.models.document_mask import document_block_mask, flex_document_attention

    g = torch.Generator().manual_seed(0)
    B, T, S, H, KV, hd, window = 2, 700, 1000, 8, 2, 64, 300
    doc_k = (torch.rand(B, S, generator=g) < 1 / 150).long().cumsum(1)
    doc_q = doc_k[:, S - T :]
    q, k, v = (
        torch.randn(B, H, T, hd, generator=g),
        torch.randn(B, KV, S, hd, generator=g),
        torch.randn(B, KV, S, hd, generator=g),
    )
    w = torch.randn(B, H, T, hd, generator=g)
    q_pos, k_pos = torch.arange(S - T, S)[:, None], torch.arange(S)[None]
    mask = (doc_q[:, None, :, None] == doc_k[:, None, None, :]) & (k_pos <= q_pos) & (k_pos > q_pos - window)

    def run(attend, device, dt):
        leaves = [x.to(device, dt).requires_grad_() for x in (q, k, v)]
        y = attend(*leaves)
        (y * w.to(y)).sum().backward()
        return [y.detach()] + [x.grad for x in leaves]

    want = run(
        lambda a, b, c: torch.nn.functional.scaled_dot_product_attention(a, b, c, attn_mask=mask, enable_gqa=True),
        "cpu",
        torch.float64,
    )
    block_mask = document_block_mask(doc_q.cuda(), doc_k.cuda(), S - T, window)
    got = run(lambda a, b, c: flex_document_attention(a, b, c, block_mask, fused=True), "cuda", dtype)
    for name, a, b in zip(["y", "dq", "dk", "dv"], got, want):
        err = ((a.double().cpu() - b).abs().max() / b.abs().max()).item()
        print(f"{name}: flex {dtype} {err:.1e} of the largest float64 value")
        assert err <= tol, name


@pytest.mark.parametrize("isolated", [False, True])
def test_prefetched_batches_are_pinned_and_reach_the_gpu_unchanged(cuda_data, isolated):
    # what the trainer reads on CUDA (train/trainer.py read_ahead: pin when the device is CUDA): page-locked
    # batches from the prefetch thread, copied without blocking, equal to the batches read directly
    from unroll.data.loader import PackedDataset, TokenLoader
    from unroll.train.data_setup import RunData

    loader = TokenLoader([PackedDataset(cuda_data.train, 64)], [1.0], seed=0)
    data = RunData(tokenizer=None, train=loader, valid=None, valid_loader=None, isolated=isolated)
    plan = [(s * 8, 8) for s in range(6)]
    with data.train_reader(iter(plan), depth=2, pin=True) as read:
        for request in plan:
            batch = read(*request)
            assert batch.tokens.is_pinned() and (batch.starts is None or batch.starts.is_pinned())
            on_gpu, direct = batch.to("cuda"), data.train_batch(*request)
            torch.cuda.synchronize()
            assert on_gpu.tokens.is_cuda and torch.equal(on_gpu.tokens.cpu(), direct.tokens)
            assert (on_gpu.starts is None) == (not isolated)
            if isolated:
                assert torch.equal(on_gpu.starts.cpu(), direct.starts)
