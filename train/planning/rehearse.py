"""`unroll rehearse`: one rank of an N × G job, run for real on this CPU in one process, before the job waits
in a queue.

The rank's own program, as `unroll train` would run it on a GPU: the config checked, the mesh of all N·G
ranks, the model built on the meta device at full width and depth, the layout applied (FSDP2, tp, ep, pp
stages, cp) and only this rank's part allocated and initialised, the optimizer, `steps` real training
steps (the trainer's own `train_step`) on synthetic tokens of the configured vocabulary (no data shards
needed), and a checkpoint of this rank's shards into a temporary directory. Precision as on a GPU:
run.dtype auto or bfloat16 → bf16 autocast, and FSDP2 gathering bf16 parameters and reducing in float32.

The other ranks are torch's fake process group, their collectives answered by train/planning/fake_comm.py's
symmetric world (every rank holds what this one holds), so MoE split sizes, Newton's convergence, loss sums
and stop flags see plausible values, never uninitialised memory; every collective's bytes are counted.
Memory is measured per component by train/planning/memory.py and read at the configured sequence length too (the
config's `data.seq_len` before a `data.seq_len=` override: rehearse short, read the figures at the real
length): activations in proportion to the tokens, the loss measured again on its own at that length.

DDP (dp_shard 1) sends its gradient buckets through a comm hook that takes the bucket itself as the
all-reduce's result (the fake group's work carries none). Activations read at the configured length grow
with the tokens except for what does not: autocast's bf16 copies of fp32 weights (layouts without FSDP),
taken whole from train/planning/activation_probe.py's fit.

Micro-batches: without pipelining one runs per step (later ones allocate nothing new: FSDP reduce-scatters
every micro-batch, DDP's buckets exist from the first; `microbatches` 2 shows it, at twice the time: a 7B
step on 2 CPU cores is minutes of matrix products); pipelined, as many as the schedule has
stages (1F1B-like schedules then hold their most micro-batches in flight), all of them for GPipe and
LoopedBFS (which hold all), or `microbatches` (activations then scaled to the configured number in flight).

What a rehearsal proves: the layout is accepted, every shape and collective of this rank's program works
at full size, and how many bytes each part holds and sends. What it does not: speed, NCCL and its buffers,
the CUDA allocator's fragmentation and the CUDA context (leave a few GiB), the other ranks' programs
(`rank` another one), the data pipeline. The fake world's collectives complete at once; on real ranks they
are asynchronous and FSDP at times holds one more block's all-gather (2 gloo ranks of tiny-gru: 7.3-8.2 MB
gathered against 6.4 MB rehearsed).
"""

from __future__ import annotations

import contextlib
import gc
import os
import resource
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from unroll.train.build import build_training
from unroll.train.config import Config, ConfigError, load_config
from unroll.train.parallel.distributed import DistInfo
from unroll.train.parallel.mesh import Layout
from unroll.train.parallel.pipeline_split import check_pipeline, schedule_spec
from unroll.train.planning import memory as M
from unroll.train.planning.fake_comm import SymmetricWorld, fake_process_group, static_pipeline_vote
from unroll.train.preflight import check_layout
from unroll.train.step import train_step


@dataclass
class Rehearsal:
    """What `rehearse` measured on one rank. Bytes; `measured` at the rehearsed length, `at_target` at the
    configured one."""

    config: Config  # as rehearsed (the GPU's precision; data.seq_len the rehearsed length)
    target_seq: int  # the configured sequence length the figures are read at
    rank: int
    world: int
    layout: Layout
    tokens: int  # tokens per micro-batch on this rank (micro-batch × sequence / cp) as rehearsed
    target_tokens: int  # the same at the configured sequence length
    microbatches: int  # run per step
    config_microbatches: int  # the config's per step
    measured: M.Components
    at_target: M.Components
    peak: int  # the memory tracker's largest total, as rehearsed
    traffic: dict  # (kind, group size, group) -> (calls, bytes) of the last step
    traffic_table: str
    checkpoint_bytes: int
    checkpoint_files: int
    losses: list[float]
    seconds: dict = field(default_factory=dict)
    max_rss: int = 0  # this process's peak resident memory, bytes
    unknown: dict = field(default_factory=dict)  # collective outputs the symmetric world could not know


def microbatches_to_run(cfg: Config, layout: Layout, accum: int) -> int:
    if layout.pp == 1:
        return 1
    name, _, per_rank, _ = schedule_spec(cfg.parallel.pp_schedule)
    if name in ("GPipe", "LoopedBFS"):  # every forward before any backward: all of them count
        return accum
    want = min(accum, layout.pp * per_rank)
    while accum % want or (name in ("Interleaved1F1B", "InterleavedZeroBubble") and want % layout.pp):
        want += 1
    return want


def _gpu_config(cfg: Config) -> Config:
    """The config as the GPU job runs it, on this CPU: bf16 where run.dtype is auto, and the ParaRNN solver
    `auto` picks on a GPU (Newton). (M²RNN's sequential recurrence keeps a state per 32 steps on both, the
    Triton kernel's and the CPU's checkpointed loop alike.)"""
    dtype = "bfloat16" if cfg.run.dtype == "auto" else cfg.run.dtype
    solver = "newton" if cfg.model.solver == "auto" else cfg.model.solver  # models/recurrent.py on CUDA
    return replace(cfg, run=replace(cfg.run, device="cpu", dtype=dtype), model=replace(cfg.model, solver=solver))


def logits_bytes(cfg: Config, layout: Layout, loss_rank: bool, chunk: int, group, tokens: int, bf16: bool) -> int:
    """The loss alone (LM.loss: kernels/cross_entropy.py, chunk by chunk) at `tokens` hidden states and this
    rank's [V/tp, d] output matrix, as the step runs it: its largest moment besides its inputs and the
    weight's gradient (which the step holds as a gradient). 0 where this rank computes no loss (a
    pipeline's other stages)."""
    from unroll.kernels.cross_entropy import chunked_cross_entropy

    if not loss_rank:
        return 0
    weight = torch.zeros(
        cfg.model.vocab_size // layout.tp, cfg.model.d_model, dtype=torch.bfloat16 if bf16 else torch.float32
    )  # as FSDP gathers it
    hidden = torch.zeros(tokens, cfg.model.d_model, requires_grad=True)
    targets = torch.zeros(tokens, dtype=torch.long)
    tracker = M.Tracker()
    with tracker, torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        chunked_cross_entropy(hidden, weight, targets, chunk=chunk, group=group).backward()
    return M.snapshot_sums(tracker.get_tracker_snapshot("peak"), M.TRANSIENT)


def rehearse(
    config: str,
    overrides: list[str],
    *,
    nodes: int,
    gpus_per_node: int,
    rank: int = 0,
    steps: int = 1,
    microbatches: int = 0,
) -> Rehearsal:
    from unroll.train.checkpoint.dcp import save_view
    from unroll.train.schedule import lr_at

    cfg = _gpu_config(load_config(config, overrides))
    target_seq = load_config(config, [o for o in overrides if not o.startswith("data.seq_len=")]).data.seq_len
    world = nodes * gpus_per_node
    if cfg.parallel.engine != "torch":
        raise ConfigError(
            f"parallel.engine={cfg.parallel.engine}: unroll rehearse runs the torch engine's program only "
            f"(`unroll plan` estimates ZeRO's memory)"
        )
    if nodes < 1 or gpus_per_node < 1:
        raise ConfigError(f"--nodes {nodes} --gpus-per-node {gpus_per_node}: both must be positive")
    if not 0 <= rank < world:
        raise ConfigError(f"--rank {rank}: a job of {world} ranks has ranks 0 … {world - 1}")
    if steps < 1:
        raise ConfigError(f"--steps {steps}: must be positive")
    shape = check_layout(cfg, world)
    layout, micro, accum = shape.layout, shape.micro, shape.accum
    n_mb = microbatches or microbatches_to_run(cfg, layout, accum)
    check_pipeline(layout, cfg, n_microbatches=n_mb)
    bf16 = cfg.run.dtype == "bfloat16"
    tokens = micro * cfg.data.seq_len // layout.cp
    target_tokens = micro * target_seq // layout.cp
    seconds, losses = {}, []

    with _world(rank, world) as rank, SymmetricWorld(recv_fill=static_pipeline_vote) as sym:
        start = time.perf_counter()
        run = build_training(
            cfg,
            DistInfo(rank, world, rank % gpus_per_node, torch.device("cpu")),
            layout,
            micro,
            n_mb,
            gpu_precision=True,
        )
        parts: Sequence[nn.Module] = run.pipe.modules if run.pipe else [run.model]
        if isinstance(run.trained, DistributedDataParallel) and "WORLD_SIZE" not in os.environ:
            run.trained.register_comm_hook(run.trained.process_group, _fake_world_allreduce)
        seconds["build"] = time.perf_counter() - start
        grads = []
        hook = run.optimizer.register_step_pre_hook(lambda *_: grads.append(M.gradient_bytes(parts)))
        tracker = M.tracker_for(parts, run.optimizer)
        phase_hooks = M.mark_phases(tracker, parts)
        batches = _synthetic(cfg, cfg.train.seed)
        start = time.perf_counter()
        with tracker:
            for step in range(steps):
                sym.reset()  # the last step's traffic is what is reported
                result = train_step(
                    run, cfg, batches, 0, lr_at(step, cfg.optim.lr, cfg.train.steps, cfg.schedule), torch.device("cpu")
                )
                losses.append(result.loss_sum.item() / n_mb)
        for h in [hook, *phase_hooks]:
            h.remove()
        seconds["steps"] = time.perf_counter() - start
        gathered, activations, peak = M.dynamic_peaks(tracker)
        held = M.weight_bytes(parts), max(grads), M.optimizer_bytes(run.optimizer)
        traffic = {k: (v.calls, v.bytes) for k, v in sym.traffic.snapshot().items()}
        traffic_table, unknown = sym.traffic.table(), dict(sym.unknown)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="unroll-rehearse-") as tmp:
            dcp.save(save_view(run.owned, run.optimizer), checkpoint_id=tmp, no_dist=True)
            files = [p for p in Path(tmp).rglob("*") if p.is_file()]
            ckpt_bytes = sum(p.stat().st_size for p in files)
        seconds["checkpoint"] = time.perf_counter() - start
        # the loss alone, with the model let go first: this process then holds one or the other, not both
        loss_rank = run.pipe is None or run.pipe.last
        chunk, vocab_group = run.model.loss_chunk, run.model.vocab_group
        del run, tracker, result, hook, phase_hooks
        parts = []  # the hook's closure still names it; dropping the modules is what frees them
        gc.collect()
        start = time.perf_counter()
        logits, logits_target = (
            logits_bytes(cfg, layout, loss_rank, chunk, vocab_group, n, bf16) for n in (tokens, target_tokens)
        )
        seconds["logits"] = time.perf_counter() - start
        measured = M.Components(*held, gathered=gathered, activations=activations, logits=logits)

    # more micro-batches in flight where the schedule holds more of them (GPipe: all)
    flight = 1.0
    if layout.pp > 1:
        from unroll.train.planning.plan import in_flight

        name, _, per_rank, _ = schedule_spec(cfg.parallel.pp_schedule)
        flight = in_flight(name, layout.pp, per_rank, accum) / in_flight(name, layout.pp, per_rank, n_mb)
    # what does not grow with the tokens stays as it is: autocast's bf16 copies of fp32 weights (no FSDP)
    fixed = _fixed_activations(cfg, layout, micro) if tokens != target_tokens else 0.0
    fixed = min(fixed, measured.activations)
    at_target = replace(
        measured,
        activations=fixed + (measured.activations - fixed) * target_tokens / tokens * flight,
        logits=logits_target,
    )
    return Rehearsal(
        cfg,
        target_seq,
        rank,
        world,
        layout,
        tokens,
        target_tokens,
        n_mb,
        accum,
        measured,
        at_target,
        peak,
        traffic,
        traffic_table,
        ckpt_bytes,
        len(files),
        losses,
        seconds,
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        unknown,
    )


def _fixed_activations(cfg: Config, layout: Layout, micro: int) -> float:
    """Bytes of the activations that do not grow with the tokens, as train/planning/activation_probe.py fits them
    (fp32 weights under bf16 autocast, i.e. without FSDP, where every rank holds every block)."""
    from unroll.train.parallel.parallelize import uses_fsdp
    from unroll.train.planning.activation_probe import probe

    if cfg.run.dtype != "bfloat16" or uses_fsdp(layout, layout.pp > 1):
        return 0.0
    costs = probe(
        cfg.model,
        layout.tp,
        False,
        True,
        cfg.data.seq_len // layout.cp,
        cfg.train.activation_checkpoint,
        micro,
        ep=layout.ep,
    )
    kinds = list(zip(cfg.model.layers, cfg.model.mlp_kinds))
    return sum(costs[k].saved_fixed for k in kinds) + max(costs[k].extra_fixed for k in kinds)


@contextlib.contextmanager
def _world(rank: int, world: int):
    """The other ranks: torch's fake process group; or, under torchrun (WORLD_SIZE set), the real ones, over
    gloo (the same program on real collectives: what the fake world is checked against). Yields this
    rank's index."""
    if "WORLD_SIZE" not in os.environ:
        with fake_process_group(rank, world):
            yield rank
        return
    if int(os.environ["WORLD_SIZE"]) != world:
        raise ConfigError(f"--nodes × --gpus-per-node = {world}, but torchrun started {os.environ['WORLD_SIZE']} ranks")
    dist.init_process_group("gloo")
    try:
        yield dist.get_rank()
        dist.barrier()
    finally:
        dist.destroy_process_group()


def _fake_world_allreduce(group, bucket):
    """DDP's gradient all-reduce as its default hook sends it (the mean over the group); the fake process
    group's work carries no result for DDP to take the reduced gradients from, so the bucket itself is."""
    buffer = bucket.buffer().div_(dist.get_world_size(group))
    return dist.all_reduce(buffer, group=group, async_op=True).get_future().then(lambda _: buffer)


def _synthetic(cfg: Config, seed: int):
    """batches(start, n): n sequences of seq_len + 1 random tokens of the vocabulary."""
    gen = torch.Generator().manual_seed(seed)
    return lambda start, n: torch.randint(0, cfg.model.vocab_size, (n, cfg.data.seq_len + 1), generator=gen)


GiB = 1024**3


def _gib(b: float) -> str:
    return f"{b / GiB:9.3f}"


def format_rehearsal(name: str, r: Rehearsal, planned=None) -> str:
    """The report: memory per component (rehearsed, at the configured length, and `unroll plan`'s for the
    same layout and rank), the collectives of one step, the checkpoint, the time it took."""
    from unroll.train.planning.plan import estimate_for

    planned = planned or estimate_for(r)
    lay = r.layout.describe()
    lines = [
        f"rehearsal of {name}: rank {r.rank} of {r.world} ({lay}); {r.microbatches} of the step's "
        f"{r.config_microbatches} micro-batch(es) of {r.tokens:,} tokens on this rank, read at "
        f"{r.target_tokens:,}; losses {', '.join(f'{x:.4f}' for x in r.losses)}",
        "",
        f"  {'memory per GPU, GiB':22}{'rehearsed':>10}{'configured':>11}{'plan':>10}{'plan/meas.':>11}",
    ]
    for key, value in r.measured.as_dict().items():
        target, plan = getattr(r.at_target, key), getattr(planned.components, key)
        ratio = f"{plan / target:10.2f}" if target else f"{'-':>10}"
        lines.append(f"  {key:22}{_gib(value)} {_gib(target)} {_gib(plan)} {ratio}")
    lines.append(f"  {'sum':22}{_gib(r.measured.total)} {_gib(r.at_target.total)} {_gib(planned.components.total)}")
    lines.append(f"  {'peak (one moment)':22}{_gib(r.peak)}")
    per_token = r.measured.activations / r.tokens if r.tokens else 0
    chunk = r.config.train.loss_chunk
    lines += [
        f"  activations {per_token:,.0f} bytes per token on this rank; logits in chunks of "
        + (f"{chunk:,} tokens" if chunk else "all the tokens")
        + " (train.loss_chunk)",
        "",
        "collectives of one step (bytes this rank sends; ring model, train/planning/comm_bytes.py):",
        "  " + r.traffic_table.replace("\n", "\n  "),
        "",
        f"checkpoint: {r.checkpoint_bytes / GiB:.3f} GiB in {r.checkpoint_files} files from this rank",
        f"time: build {r.seconds.get('build', 0):.1f} s, steps {r.seconds.get('steps', 0):.1f} s, "
        f"checkpoint {r.seconds.get('checkpoint', 0):.1f} s; this process's peak memory "
        f"{r.max_rss / GiB:.2f} GiB",
    ]
    if r.unknown:
        lines.append(
            "collective outputs no symmetric world knows (zeros): "
            + ", ".join(f"{k} × {v}" for k, v in r.unknown.items())
        )
    lines.append("not shown by a rehearsal: speed, NCCL buffers, the CUDA context and allocator (leave a few GiB)")
    return "\n".join(lines)


def to_json(r: Rehearsal, planned=None) -> dict:
    from unroll.train.planning.plan import estimate_for

    planned = planned or estimate_for(r)
    return {
        "rank": r.rank,
        "world": r.world,
        "layout": {k: getattr(r.layout, k) for k in ("pp", "dp_replicate", "dp_shard", "cp", "tp", "ep")},
        "tokens": r.tokens,
        "target_tokens": r.target_tokens,
        "microbatches": r.microbatches,
        "config_microbatches": r.config_microbatches,
        "measured": r.measured.as_dict(),
        "at_target": r.at_target.as_dict(),
        "plan": planned.components.as_dict(),
        "peak": r.peak,
        "traffic": [
            {"kind": k.kind, "group_size": k.group_size, "group": k.group, "calls": c, "bytes": b}
            for k, (c, b) in r.traffic.items()
        ],
        "checkpoint_bytes": r.checkpoint_bytes,
        "checkpoint_files": r.checkpoint_files,
        "losses": r.losses,
        "seconds": r.seconds,
        "max_rss": r.max_rss,
        "unknown": r.unknown,
    }
