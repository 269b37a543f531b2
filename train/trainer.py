"""The training loop: one process, or any layout of train/parallel/mesh.py under torchrun; exact resume."""

from __future__ import annotations

import contextlib
import math
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from unroll.models import LM
from unroll.models.generate import sample
from unroll.models.moe import MoE
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, resolve
from unroll.train.checkpoint.rundir import CONFIG_FILE, prepare_run_dir
from unroll.train.checkpoint.writer import CheckpointWriter
from unroll.train.config import Config, ConfigError
from unroll.train.data_setup import RunData, open_run_data
from unroll.train.metrics import Metrics
from unroll.train.parallel import distributed as D
from unroll.train.parallel.expert_parallel import average_expert_grads, expert_parameters
from unroll.train.parallel.mesh import Layout, build_mesh, data_ranks
from unroll.train.parallel.parallelize import gradient_sync, parallelize, uses_fsdp, without_context_parallel
from unroll.train.parallel.pipelined import Pipeline
from unroll.train.plot import plot_run
from unroll.train.preflight import check_layout
from unroll.train.schedule import lr_at
from unroll.train.signals import StopRequest, pause_for_signal
from unroll.train.step_guard import StepGuard, TrainingDiverged, Verdict
from unroll.train.watchdog import Watchdog


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.AdamW:
    """Weight decay on the matrices of Linear and Embedding layers and the MoE's stacked expert matrices;
    never on norms, biases, convolutions or the recurrences' own coefficients."""
    decay = {id(m.weight) for m in model.modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    decay |= {id(p) for m in model.modules() if isinstance(m, MoE) for p in (m.w_gate_up, m.w_down)}
    decay |= {id(p) for name, p in model.named_parameters() if name == "embed.weight"}  # a pipeline's tied replica
    params = [p for p in model.parameters() if p.requires_grad]
    # The experts get a group of their own: under expert parallelism they are plain tensors beside
    # DTensors, which AdamW's foreach kernels do not mix. They get it under every layout, so that the
    # groups (which checkpoints record by index) are the same whatever layout saves or resumes.
    experts = {id(p) for m in model.modules() if isinstance(m, MoE) for p in (m.w_gate_up, m.w_down)}
    groups = [
        {
            "params": [p for p in params if id(p) in decay and id(p) not in experts],
            "weight_decay": cfg.optim.weight_decay,
        },
        {"params": [p for p in params if id(p) not in decay], "weight_decay": 0.0},
    ]
    if any(id(p) in experts for p in params):
        groups.append({"params": [p for p in params if id(p) in experts], "weight_decay": cfg.optim.weight_decay})
    return torch.optim.AdamW(groups, lr=cfg.optim.lr, betas=(cfg.optim.beta1, cfg.optim.beta2), eps=cfg.optim.eps)


def apply_trainable(model: torch.nn.Module, pattern: str) -> int:
    """Freezes every parameter whose name does not match `pattern` (re.search); returns how many elements
    stay trainable. Frozen parameters are still in the model's checkpoints; the optimizer never sees them."""
    rx = re.compile(pattern)
    names = [name for name, _ in model.named_parameters()]
    for name, p in model.named_parameters():
        p.requires_grad_(rx.search(name) is not None)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if not trainable:
        raise ConfigError(
            f"train.trainable={pattern!r} matches no parameter (names look like {names[0]!r}, "
            f"{names[len(names) // 2]!r})"
        )
    return trainable


def solver_metrics(model: LM) -> dict:
    """How each recurrent layer solved its recurrence in the last forward: Newton iterations, final
    relative residual, and sequences that needed the sequential fallback (0 iterations = sequential)."""
    row = {}
    for i, block in enumerate(model.blocks):
        info = getattr(block.mixer, "last_solve", None)
        if info is not None:
            row[f"layer{i}/newton_iters"] = info.iterations
            row[f"layer{i}/newton_residual"] = info.residual
            row[f"layer{i}/newton_fallbacks"] = info.fallback_sequences
    return row


def clip_gradients(model: LM, max_norm: float) -> torch.Tensor:
    """torch's clip_grad_norm_; with expert parallelism the norm adds the experts' squares over the ep
    ranks (each holds different experts, plain tensors beside FSDP's DTensors) and each kind is scaled on
    its own (foreach kernels do not mix DTensors and tensors)."""
    experts = expert_parameters(model)
    if not experts:
        return torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    ids = {id(p) for _, p in experts}
    shared = [p for p in model.parameters() if id(p) not in ids and p.grad is not None]
    local = [p for _, p in experts if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in shared])
    norm = norm.full_tensor() if isinstance(norm, DTensor) else norm
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in local]) ** 2 if local else norm.new_zeros(())
    # the ep group holds each expert once (its replicas, identical after averaging, are not counted)
    torch.distributed.all_reduce(expert_sq, group=experts[0][1].ep_mesh["ep"].get_group())
    total = (norm**2 + expert_sq).sqrt()
    for group in (shared, local):
        torch.nn.utils.clip_grads_with_norm_(group, max_norm, total)
    return total


def update_expert_bias(model: LM, device: torch.device) -> torch.Tensor | None:
    """After an optimizer step: every MoE layer's assignment counts since the last step, summed over the
    data-parallel ranks, move its auxiliary-loss-free expert bias (identically on every rank). Returns
    the counts [MoE layers, experts] for the load metrics."""
    layers = model.moe_layers()
    if not layers:
        return None
    # under pipelining another stage's layers sit on the meta device here: they count zero, their owners
    # contribute the counts, and only the owners' biases matter
    here = [moe for _, moe in layers if moe.expert_bias.device.type != "meta"]
    counts = torch.stack(
        [
            moe.load_since_update.to(device)
            if moe in here
            else torch.zeros(moe.n_experts, dtype=torch.long, device=device)
            for _, moe in layers
        ]
    ).double()
    D.all_reduce_sum(counts)
    for (_, moe), c in zip(layers, counts):
        if moe in here:
            moe.update_bias(c)
    return counts


def load_metrics(model: LM, counts: torch.Tensor) -> dict:
    """Per MoE layer: each expert's share of the routed assignments relative to a perfectly even split
    (1.0 = balanced), as a list, and its maximum."""
    row = {}
    relative = counts * counts.shape[1] / counts.sum(dim=1, keepdim=True).clamp_min(1)
    for (i, _), load in zip(model.moe_layers(), relative.tolist()):
        row[f"layer{i}/expert_load"] = [round(x, 4) for x in load]
        row[f"layer{i}/expert_load_max"] = max(row[f"layer{i}/expert_load"])
    return row


def autocast_for(cfg: Config, device: torch.device):
    dtype = cfg.run.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


def split_batch(batch: torch.Tensor, cp_rank: int = 0, cp: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) of a batch [B, T+1] that holds the inputs and the targets shifted by one; under
    context parallelism this rank's slice of the T positions."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    if cp > 1:
        T = inputs.shape[1] // cp
        inputs, targets = inputs[:, cp_rank * T : (cp_rank + 1) * T], targets[:, cp_rank * T : (cp_rank + 1) * T]
    return inputs, targets


def lm_loss(model: torch.nn.Module, batch: torch.Tensor, cp_rank: int = 0, cp: int = 1) -> torch.Tensor:
    """Mean next-token cross-entropy over this rank's slice of the batch (the mean of the cp ranks'
    losses is the whole sequence's), computed by the model without full logits (LM.forward's targets)."""
    inputs, targets = split_batch(batch, cp_rank, cp)
    return model(inputs, targets=targets)


@torch.no_grad()
def evaluate(
    model: LM, data: RunData, cfg: Config, dist: D.DistInfo, autocast, ranks: dict, pipe: Pipeline | None = None
) -> float:
    """Mean loss over the first eval.batches × eval.batch_size validation sequences (fixed, in order),
    split over the data-parallel ranks (cp ranks share a batch, each its slice; under pipelining the
    ranks with the last stage hold the losses)."""
    model.eval()
    n = min(cfg.eval.batches * cfg.eval.batch_size, data.valid.n_samples)
    total = torch.zeros(2, dtype=torch.float64, device=dist.device)
    # every rank runs the same number of forwards: sharded, expert-parallel and pipelined forwards are
    # collectives, so a rank past the end runs the first batch again and counts it with weight 0
    stride = ranks["dp_size"] * cfg.eval.batch_size
    for first in range(0, n, stride):
        start = first + ranks["dp"] * cfg.eval.batch_size
        weight = 1.0 if start < n else 0.0
        start = start if start < n else 0
        batch = data.valid_batch(start, min(cfg.eval.batch_size, n - start)).to(dist.device)
        with autocast:
            if pipe is None:
                loss = lm_loss(model, batch, ranks["cp"], ranks["cp_size"])
            else:
                loss = pipe.forward_loss(*split_batch(batch, ranks["cp"], ranks["cp_size"]))
        if loss is not None:
            count = weight * batch.shape[0]
            total += torch.stack([loss.double() * count, torch.tensor(count, device=dist.device, dtype=torch.float64)])
    D.all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()


@dataclass
class Training:
    """What one rank trains, built by `build_training`."""

    model: LM  # the whole LM; under pipelining the other ranks' stages stay on the meta device
    trained: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    owned: torch.nn.Module  # this rank's parameters under the LM's names: what the optimizer and checkpoints see
    pipe: Pipeline | None
    optimizer: torch.optim.AdamW
    mesh: object  # the DeviceMesh, None for one process
    layout: Layout
    ranks: dict  # this rank's data coordinates (train/parallel/mesh.py data_ranks)
    autocast: object
    micro: int  # sequences per forward
    accum: int  # forwards per step
    trainable: int | None  # elements left trainable by train.trainable


def build_training(
    cfg: Config, dist: D.DistInfo, layout: Layout, micro: int, accum: int, *, gpu_precision: bool = False
) -> Training:
    """The model built on the meta device, the layout applied, only this rank's part allocated and
    initialised from train.seed (the same weights under every layout: models/init.py), the optimizer on it.
    FSDP2 gathers bf16 parameters where bf16 autocast runs on a GPU (or anywhere with gpu_precision: a
    rehearsal of a GPU job on the CPU)."""
    torch.manual_seed(cfg.train.seed)  # the global generators' state is checkpointed: start it known
    with torch.device("meta"):
        model = LM(cfg.model)
    model.loss_chunk = cfg.train.loss_chunk  # before the pipeline's stages copy it
    trainable = apply_trainable(model, cfg.train.trainable) if cfg.train.trainable else None
    autocast = autocast_for(cfg, dist.device)
    mesh = build_mesh(layout, dist.device.type)
    bf16 = (dist.device.type == "cuda" or gpu_precision) and not isinstance(autocast, contextlib.nullcontext)
    # FSDP gathers bf16 parameters: then the embedding's output, and the stream between stages, is bf16
    hidden = torch.bfloat16 if bf16 and uses_fsdp(layout, layout.pp > 1) else torch.float32
    pipe = (
        Pipeline(model, mesh["pp"], cfg.parallel.pp_schedule, seq_split=layout.tp, hidden_dtype=hidden)
        if layout.pp > 1
        else None
    )
    trained = parallelize(
        model,
        mesh,
        layout,
        device=dist.device,
        seed=cfg.train.seed,
        bf16=bf16,
        activation_checkpoint=cfg.train.activation_checkpoint,
        compile=cfg.train.compile,
        stages=pipe.modules if pipe else None,
    )
    owned = pipe.owned_view() if pipe else model
    optimizer = build_optimizer(owned, cfg)  # on the sharded parameters
    return Training(
        model,
        trained,
        owned,
        pipe,
        optimizer,
        mesh,
        layout,
        data_ranks(mesh, layout),
        autocast,
        micro,
        accum,
        trainable,
    )


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # this rank's microbatch losses summed (zero on a pipeline's non-last stages)
    aux_sum: torch.Tensor  # its MoE balancing losses summed
    grad_norm: torch.Tensor | None
    counts: torch.Tensor | None  # MoE assignments of the step, [MoE layers, experts], summed over ranks
    loss: float | None = None  # with a guard: the step's mean loss over every rank, and its MoE balancing loss
    aux: float | None = None
    grad_norm_value: float | None = None  # with a guard: the global norm, as judged
    verdict: Verdict | None = None  # with a guard: why the step was not applied; None when it was


def train_step(
    t: Training,
    cfg: Config,
    batches: Callable[[int, int], torch.Tensor],
    first: int,
    lr: float,
    device: torch.device,
    guard: StepGuard | None = None,
) -> StepResult:
    """One optimizer step on this rank's samples first ... first + micro·accum − 1; batches(start, n) gives
    n sequences of seq_len + 1 tokens from sample `start` on. With a guard the step is judged before the
    optimizer (train/step_guard.py) on the loss all-reduced over the ranks and the global gradient norm, so
    that every rank applies it, or none does."""
    model, layout, ranks, micro, accum = t.model, t.layout, t.ranks, t.micro, t.accum
    for group in t.optimizer.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    if t.pipe is not None:  # the schedule runs the accum microbatches through the stages
        inputs, targets = split_batch(batches(first, micro * accum).to(device), ranks["cp"], layout.cp)
        with t.autocast:
            loss_sum, aux = t.pipe.step(inputs, targets, accum, device)
        if aux is not None:
            aux_sum += aux
    else:
        for i in range(accum):
            batch = batches(first + i * micro, micro).to(device)
            with gradient_sync(t.trained, i == accum - 1), t.autocast:
                loss = lm_loss(t.trained, batch, ranks["cp"], layout.cp)
                aux = model.aux_loss()  # MoE balancing losses of this forward (None without MoE)
            ((loss if aux is None else loss + aux) / accum).backward()
            loss_sum += loss.detach()
            if aux is not None:
                aux_sum += aux.detach()
    if layout.ep > 1:  # sums over the ep group's tokens → FSDP's mean over the data ranks
        replicas = t.mesh["dp"].size() // layout.ep
        average_expert_grads(
            model, expert_parameters(model)[0][1].ep_mesh["edp"].get_group() if replicas > 1 else None, layout.dp
        )
    # the guard needs the norm also without clipping: an infinite bound leaves the gradients as they are
    max_norm = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else math.inf
    if cfg.optim.grad_clip <= 0 and guard is None:
        grad_norm = None
    elif t.pipe is not None:
        grad_norm = t.pipe.clip_gradients(list(t.owned.parameters()), max_norm)
    else:
        grad_norm = clip_gradients(model, max_norm)
    result = StepResult(loss_sum, aux_sum, grad_norm, None)
    if guard is not None:
        judge_step(result, layout, accum, guard)
    if result.verdict is None:
        t.optimizer.step()
        t.optimizer.zero_grad(set_to_none=True)
        result.counts = update_expert_bias(model, device)
    else:  # nothing of this step reaches the weights, the optimizer state or the experts' biases
        t.optimizer.zero_grad(set_to_none=True)
        for _, moe in model.moe_layers():
            moe.load_since_update.zero_()
    return result


def judge_step(result: StepResult, layout: Layout, accum: int, guard: StepGuard) -> None:
    """Fills result.loss, .aux and .verdict from one all-reduce: every rank adds its mean over its
    microbatches (under pipelining only the last stage holds the loss, and the stages' MoE losses add up to
    the model's) and a flag for a gradient norm that is not finite where this rank computed it."""
    norm = result.grad_norm.full_tensor() if isinstance(result.grad_norm, DTensor) else result.grad_norm
    means = torch.stack([result.loss_sum, result.aux_sum]).float() / accum
    stats = torch.cat([means, (~torch.isfinite(norm)).float().reshape(1)])
    D.all_reduce_sum(stats)
    contributors = (torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1) // layout.pp
    loss_sum, aux_sum, bad_norm, norm_value = torch.cat([stats, norm.float().reshape(1)]).tolist()
    result.loss, result.aux = loss_sum / contributors, aux_sum / contributors
    result.grad_norm_value = math.nan if bad_norm else norm_value
    result.verdict = guard.judge(result.loss, result.grad_norm_value)


def train(cfg: Config) -> dict:
    """Runs (or resumes) the configured training; returns the final figures. RUN_DIR/config.yaml is written
    once every check has passed, so a refused run leaves the directory as it was. A run whose newest
    checkpoint is already at train.steps is left alone too: one line says which train.steps to raise, and
    it ends as a success (exit 0), since nothing failed and a rerun of a finished job is not an error."""
    dist = D.init(cfg.run.device, cfg.run.collective_timeout_s)
    if cfg.run.threads and dist.device.type == "cpu":
        torch.set_num_threads(cfg.run.threads)
    shape = check_layout(cfg, dist.world)  # the launchers ran these checks (train/preflight.py) already
    layout, micro, accum = shape.layout, shape.micro, shape.accum
    data = open_run_data(cfg)  # every file checked before any work
    run_dir = Path(cfg.run.dir)
    check_same_model(run_dir, cfg)

    run = build_training(cfg, dist, layout, micro, accum)
    model, owned, optimizer, pipe, ranks, autocast = (
        run.model,
        run.owned,
        run.optimizer,
        run.pipe,
        run.ranks,
        run.autocast,
    )
    trainable = run.trainable
    if cfg.train.init_from and not resolve.complete_checkpoints(run_dir):  # a new run from other weights
        # into the sharded model (DCP reshards; a pipeline's tied replica reads embed.weight too)
        checkpoint.load_model_weights(
            resolve.checkpoint_of(cfg.train.init_from, cfg.model, setting="train.init_from").path, owned
        )
    state = checkpoint.load_latest(run_dir, owned, optimizer, rank=dist.rank, io_threads=cfg.checkpoint.io_threads)
    step = state["step"] if state else 0
    samples = state["samples_consumed"] if state else 0
    if state and step >= cfg.train.steps:  # the run directory is left as it is
        if dist.is_main:
            print(nothing_to_train(run_dir, step, cfg.train.steps), flush=True)
        D.shutdown()
        return {"step": step, "stopped": False, "finished": True}
    # every check has passed: only now is the run's config.yaml written (a refused run leaves the earlier one)
    prepare_run_dir(cfg, dist.is_main)
    D.barrier()

    metrics = Metrics(
        run_dir,
        enabled=dist.is_main,
        total_steps=cfg.train.steps,
        start_step=step,
        wandb_mode=cfg.logging.wandb,
        wandb_project=cfg.logging.wandb_project,
        config=asdict(cfg),
        progress=cfg.logging.progress,
    )
    metrics.write(
        f"model: {model.num_params():,} parameters, pattern {cfg.model.pattern!r}; "
        f"{dist.world} rank(s) ({layout.describe()}) × {accum} micro-batch(es) of {micro} × {cfg.data.seq_len} tokens"
        + (f"; {trainable:,} trainable (train.trainable={cfg.train.trainable!r})" if trainable else "")
        + (f"; weights from {cfg.train.init_from}" if cfg.train.init_from and not state else "")
        + (starting_note(state) if state else "")
        + D.restart_note()
    )
    initial_val = state.get("initial_val_loss") if state else None
    if data.valid is not None and (not state or (step == 0 and initial_val is None)):  # e.g. a grown run
        initial_val = evaluate(model, data, cfg, dist, autocast, ranks, pipe)
        metrics.log({"step": 0, "val_loss": initial_val, "val_ppl": math.exp(initial_val)})

    guard = StepGuard(
        max_bad_steps=cfg.train.max_bad_steps,
        spike_factor=cfg.train.spike_factor,
        spike_window=cfg.train.spike_window,
        spike_policy=cfg.train.spike_policy,
    )
    guard.load_state_dict(state.get("guard") if state else None)

    def train_state() -> dict:
        return {
            "samples_consumed": samples,
            "tokens_consumed": samples * cfg.data.seq_len,
            "world_size": dist.world,
            "initial_val_loss": initial_val,
            "guard": guard.state_dict(),
        }

    stop = StopRequest()
    watchdog = Watchdog(cfg.run.step_timeout_s, dist.rank)
    tokens_per_step = cfg.train.batch_size * cfg.data.seq_len
    timer, timed_steps, saved_at, val_loss = time.perf_counter(), 0, step if state else None, None
    load_window = None  # MoE assignment counts since the last logged step
    clean = False  # on an exception, skip the final barrier: the other ranks may never reach it
    writer = CheckpointWriter(
        run_dir,
        keep=cfg.checkpoint.keep,
        rank=dist.rank,
        async_save=cfg.checkpoint.async_save,
        io_threads=cfg.checkpoint.io_threads,
    )
    try:
        while step < cfg.train.steps:
            watchdog.arm(step + 1)
            lr = lr_at(step, cfg.optim.lr, cfg.train.steps, cfg.schedule)
            result = train_step(
                run, cfg, data.train_batch, samples + ranks["dp"] * micro * accum, lr, dist.device, guard
            )
            if result.counts is not None:
                load_window = result.counts if load_window is None else load_window + result.counts
            step, samples, timed_steps = step + 1, samples + cfg.train.batch_size, timed_steps + 1
            metrics.advance()
            applied = result.verdict is None
            if applied:
                guard.applied(step, result.loss)
            else:
                back = not_applied(
                    step,
                    samples,
                    result,
                    guard,
                    metrics,
                    lambda: checkpoint_to_roll_back_to(run_dir, owned, optimizer, writer, dist.rank),
                )
                if back is not None:  # rolled back: the weights of that step, the data from here on
                    step, saved_at, load_window = back, back, None
                    metrics.rewind(step)
                    continue

            if step % cfg.train.log_every == 0 or step == cfg.train.steps:
                elapsed = time.perf_counter() - timer
                row = {
                    "step": step,
                    "loss": result.loss,
                    "lr": lr,
                    "tokens_per_s": timed_steps * tokens_per_step / elapsed,
                    "tokens": samples * cfg.data.seq_len,
                    "skipped_steps": guard.skipped,
                }
                row["grad_norm"] = result.grad_norm_value  # taken by the guard: no second sync
                if load_window is not None:
                    row["moe_aux_loss"] = result.aux
                    row |= load_metrics(model, load_window)
                    load_window = None
                if applied:  # a step not applied has its event row instead
                    metrics.log(row | solver_metrics(model))
            if data.valid is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps):
                val_loss = evaluate(model, data, cfg, dist, autocast, ranks, pipe)
                metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})
            pause_for_signal(step, run_dir, stop, dist.rank)  # a test hook; nothing unless UNROLL_PAUSE_AT_STEP
            stopping = D.any_rank(stop.requested, dist.device)
            writer.poll(dist.device)  # an async save done everywhere is finished now; its failure stops every rank
            periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and applied
            if stopping or periodic or step == cfg.train.steps:
                writer.save(step, owned, optimizer, train_state())
                saved_at = step
            if stopping:
                writer.wait()
                metrics.write(
                    f"stopped by signal {stop.signum or 'on another rank'} at step {step}; "
                    f"checkpoint saved, `unroll train` with the same run.dir resumes"
                )
                clean = True
                return {"step": step, "stopped": True}
            if step % cfg.train.log_every == 0:
                timer, timed_steps = time.perf_counter(), 0
        watchdog.disarm()
        if saved_at != step:  # a new run of train.steps=0
            writer.save(step, owned, optimizer, train_state())
        writer.wait()
        if val_loss is None and data.valid is not None:  # train.steps=0: report where it stands
            val_loss = evaluate(model, data, cfg, dist, autocast, ranks, pipe)
        summary = finish(cfg, model, data, run_dir, dist, metrics, step, val_loss, initial_val, layout)
        clean = True
        return summary
    except TrainingDiverged:
        # every rank reached this verdict at the same step: the pending checkpoint (good) is finished
        watchdog.disarm()
        writer.wait()
        clean = True
        if dist.is_main:
            with contextlib.suppress(FileNotFoundError):
                plot_run(run_dir)
        raise
    finally:
        watchdog.disarm()
        writer.close(finish=clean)
        stop.restore()
        metrics.close()
        D.shutdown(clean)


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuses, in one line and before anything in it is written, a run directory whose checkpoints are all
    another model's (a run directory reused by mistake); reads only their manifests."""
    found = checkpoint.good_checkpoints(run_dir)
    if found and not checkpoint.good_checkpoints(run_dir, cfg.model):
        newest = found[-1][1]
        reason = integrity.problem(newest, cfg.model).removeprefix("saved from a different model: ")
        raise checkpoint.CheckpointError(
            f"run.dir={run_dir} holds a run of another model ({reason}; newest "
            f"checkpoint {newest}); continue it with `unroll train "
            f"{run_dir / CONFIG_FILE}`, or give this model another run.dir"
        )


def nothing_to_train(run_dir: Path, step: int, steps: int) -> str:
    return (
        f"run {run_dir} already at step {step} of train.steps={steps}: nothing to train; to continue, "
        f"raise train.steps (e.g. train.steps={max(2 * step, step + 1)})"
    )


def starting_note(state: dict) -> str:
    """How the first line names the checkpoint a run starts from: a resume, or step 0 of a grown run."""
    grown = state.get("grown_from")
    if state["step"] == 0 and grown:
        layers = grown.get("layers", ["?", "?"])
        return (
            f"; starts from a grown checkpoint ({layers[0]} → {layers[1]} layers, G_stack "
            f"×{grown.get('factor')} of {grown.get('checkpoint')}, step {grown.get('step')})"
        )
    return f"; resumed at step {state['step']}"


def not_applied(
    step: int, samples: int, result: StepResult, guard: StepGuard, metrics: Metrics, rollback: Callable[[], dict | None]
) -> int | None:
    """A step the guard did not apply: counted (TrainingDiverged at train.max_bad_steps in a row), logged as
    an event in metrics.jsonl and on the console; for a rollback, the newest good checkpoint loaded. Returns
    the step rolled back to, or None (the run goes on from here)."""
    verdict = result.verdict
    metrics.log(
        {
            "step": step,
            "event": "step_not_applied",
            "reason": verdict.reason,
            "action": verdict.action,
            "loss": result.loss,
            "grad_norm": result.grad_norm_value,
            "skipped_steps": guard.skipped + 1,
        }
    )
    guard.rejected(step, verdict)
    if verdict.action == "rollback":
        saved = rollback()
        if saved is not None:
            guard.rolled_back(saved.get("guard"))
            metrics.log(
                {
                    "step": step,
                    "event": "rollback",
                    "to_step": saved["step"],
                    "samples_skipped": [saved["samples_consumed"], samples],
                }
            )
            metrics.write(
                f"step {step} not applied ({verdict.reason}): rolled back to step {saved['step']}; "
                f"samples {saved['samples_consumed']}-{samples - 1} are not trained on again"
            )
            return saved["step"]
        metrics.write(f"step {step} not applied ({verdict.reason}): no checkpoint to roll back to yet, skipped")
        return None
    metrics.write(f"step {step} not applied ({verdict.reason}): skipped, {guard.skipped} so far")
    return None


def checkpoint_to_roll_back_to(
    run_dir: Path, owned: torch.nn.Module, optimizer: torch.optim.Optimizer, writer: CheckpointWriter, rank: int
) -> dict | None:
    """Collective: the newest good checkpoint loaded into the model and optimizer (a pending async save
    finished first: it is the newest); its train state, or None when the run has none yet."""
    writer.wait()
    return checkpoint.load_latest(run_dir, owned, optimizer, rank=rank, io_threads=writer.io_threads)


def finish(
    cfg: Config,
    model: LM,
    data: RunData,
    run_dir: Path,
    dist: D.DistInfo,
    metrics: Metrics,
    step: int,
    val_loss: float | None,
    initial_val: float | None,
    layout,
) -> dict:
    """The end of a run: loss curve, validation perplexity and a generated sample (rank 0)."""
    summary = {"step": step, "stopped": False}
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if not dist.is_main and not sharded:
        return summary
    if cfg.sample.prompt and cfg.sample.max_new_tokens and (layout.tp > 1 or layout.pp > 1):
        if dist.is_main:
            metrics.write(
                f"(no sample: generating under tensor or pipeline parallelism is not supported; "
                f"`unroll generate {run_dir}` samples from the checkpoint in one process)"
            )
    elif cfg.sample.prompt and cfg.sample.max_new_tokens:  # under FSDP2 every rank runs the forward passes
        gen = torch.Generator().manual_seed(cfg.train.seed)
        with without_context_parallel(model):
            ids = sample(
                model,
                data.tokenizer.encode(cfg.sample.prompt),
                cfg.sample.max_new_tokens,
                temperature=cfg.sample.temperature,
                top_k=cfg.sample.top_k,
                generator=gen,
            )
        summary["sample"] = cfg.sample.prompt + data.tokenizer.decode(ids)
    if not dist.is_main:
        return summary
    if val_loss is not None:
        summary.update(val_loss=val_loss, val_ppl=math.exp(val_loss))
        start = f" (initial {math.exp(initial_val):.2f})" if initial_val is not None else ""
        metrics.write(f"validation perplexity after {step} steps: {math.exp(val_loss):.2f}{start}")
    try:
        summary["plot"] = str(plot_run(run_dir))
    except FileNotFoundError:
        pass
    if "sample" in summary:
        metrics.write(f"--- sample ---\n{summary['sample']}\n--------------")
    return summary
