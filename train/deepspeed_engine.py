"""DeepSpeed's ZeRO as a second data-parallel engine (`parallel.engine=deepspeed`), on the same model, data,
loss, schedule, clipping, guard, metrics and checkpoints as the torch engine.

What runs: the LM built and initialised as in one process (models/init.py: the same weights), then handed to
`deepspeed.initialize` with unroll's AdamW (train/optim.py: the same parameter groups and weight decay) as
its client optimizer, under ZeRO stage `deepspeed.zero_stage` (1: AdamW's state partitioned over the data
ranks; 2: the gradients too; 3: the parameters too), optionally with the optimizer (fp32 master weights and
moments: ZeRO-Offload) and, at stage 3, the parameters (ZeRO-Infinity) on the CPU or an NVMe directory.
DeepSpeed averages the gradients over the data ranks, divides them by the micro-batches (its
gradient_accumulation_steps), clips them to optim.grad_clip (set explicitly: DeepSpeed's own default is 1.0,
off here is 0) and steps. The learning rate is unroll's schedule, written into the optimizer's groups before
each step, as the torch engine does.

Why torch's AdamW also under CPU offload: it computes the same update as the torch engine, element for element
(DeepSpeedCPUAdam, `deepspeed.cpu_adam=true`, is a faster C++ AdamW whose float32 rounding differs slightly
and which is JIT-compiled on first use; `zero_force_ds_cpu_optimizer` is turned off so DeepSpeed accepts
torch's).

The step guard (train/step_guard.py) judges the step before it is applied, as with the torch engine: the loss
is all-reduced after the backwards, and ZeRO's global gradient norm is judged inside ZeRO's step, where it is
computed (the one method that computes it is wrapped on the instance: `_judge_norm`). A refused step hands
ZeRO an infinite norm, which ZeRO treats as an overflow: nothing is applied, the gradients are dropped.

Checkpoints are unroll's own (train/checkpoint/: the same DCP layout, checksums and manifest, in the
single-device layout), so the torch engine resumes a DeepSpeed run and the other way round, and export,
grow and generate read them. A save gathers each parameter's fp32 master weight and AdamW moments in full
through DeepSpeed's fragment API (`safe_get_full_fp32_param`, `safe_get_full_optimizer_state`) into a plain
single-device copy of the model and a torch AdamW (`Shadow`), which train/checkpoint/dcp.py saves as it saves
a DDP run (every rank holds the same values; each item is written once). A load reads the checkpoint into
such a copy and writes it back with `safe_set_full_*` and AdamW's step count. Cost: the copy is the whole
model and its moments in CPU memory on every rank during a save or load (16 bytes per parameter with the
gathering buffers: ~112 GB per rank at 7B), and one all-reduce or all-gather per parameter and state.

Not with this engine (refused by key before any work, train/preflight.py): parallel.tp, pp, cp, ep,
dp_replicate (DeepSpeed's engine does not compose with DTensor tensor parallelism or torch's pipelining),
train.trainable, train.compile and train.spike_policy=rollback.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from unroll.models import LM
from unroll.train import loss as training_loss
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import resolve
from unroll.train.config import Config, ConfigError
from unroll.train.loss import TokenBatch, micro_batch_objective
from unroll.train.optim import build_optimizer
from unroll.train.parallel import distributed as D
from unroll.train.parallel.mesh import Layout
from unroll.train.parallel.parallelize import parallelize
from unroll.train.preflight import check_engine
from unroll.train.step_guard import StepGuard

INSTALL_HINT = "pip install 'unroll[deepspeed]'"
# elements of ZeRO's gradient-reduction and all-gather buckets (DeepSpeed's default, 5e8, is 2 GB of fp32 per
# bucket whatever the model); `unroll plan` counts the same
BUCKET = 2**25


def import_deepspeed() -> Any:
    """deepspeed, quiet; a ConfigError saying how to install it when it is missing."""
    try:
        import deepspeed
    except ImportError as e:
        raise ConfigError(
            f"parallel.engine=deepspeed needs DeepSpeed, which is not installed ({e}): {INSTALL_HINT}"
        ) from None
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


def ds_config(cfg: Config, micro: int, accum: int, world: int, device: torch.device) -> dict:
    """The DeepSpeed config of this run: its batch, clipping and ZeRO settings from unroll's keys."""
    ds = cfg.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "overlap_comm": False, "contiguous_gradients": True}
    zero |= {"reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
    pin = device.type == "cuda"
    if ds.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": ds.offload_optimizer, "pin_memory": pin}
        if ds.offload_optimizer == "nvme":
            zero["offload_optimizer"]["nvme_path"] = ds.nvme_path
    if ds.offload_params != "none":
        zero["offload_param"] = {"device": ds.offload_params, "pin_memory": pin}
        if ds.offload_params == "nvme":
            zero["offload_param"]["nvme_path"] = ds.nvme_path
    if ds.zero_stage == 3:  # every parameter is gathered when its module runs, none kept whole between steps
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": micro * accum * world,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": cfg.optim.grad_clip,  # explicit: DeepSpeed's default is 1.0
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "zero_force_ds_cpu_optimizer": False,  # torch's AdamW under offload: the torch engine's update
        "steps_per_print": 2**62,
        "wall_clock_breakdown": False,
    }


def _client_optimizer(model: LM, cfg: Config) -> torch.optim.Optimizer:
    """unroll's AdamW groups; with deepspeed.cpu_adam, the same groups in DeepSpeedCPUAdam."""
    adamw = build_optimizer(model, cfg)
    if not cfg.deepspeed.cpu_adam:
        return adamw
    from deepspeed.ops.adam import DeepSpeedCPUAdam

    groups = [{k: v for k, v in g.items() if k in ("params", "weight_decay")} for g in adamw.param_groups]
    o = cfg.optim
    return DeepSpeedCPUAdam(groups, lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps, adamw_mode=True)


@dataclass
class DeepSpeedRun:
    """The DeepSpeed engine of one rank, and how unroll's checkpoints go in and out of it."""

    engine: Any  # deepspeed.DeepSpeedEngine
    model: LM  # the engine's module (under ZeRO-3 its parameters are this rank's partitions)
    cfg: Config
    params: int  # the model's parameters, whole

    @property
    def zero(self) -> Any:
        """The ZeRO optimizer DeepSpeed wrapped around the client AdamW."""
        return self.engine.optimizer

    @property
    def stage(self) -> int:
        return self.cfg.deepspeed.zero_stage

    def describe(self) -> str:
        """As the trainer's first line names the layout: "DeepSpeed ZeRO-3 over 2 ranks, optimizer on cpu"."""
        ds = self.cfg.deepspeed
        where = [
            f"{what} on {place}"
            for what, place in (("optimizer", ds.offload_optimizer), ("parameters", ds.offload_params))
            if place != "none"
        ]
        ranks = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
        return f"DeepSpeed ZeRO-{ds.zero_stage} over {ranks} rank(s)" + "".join(f", {w}" for w in where)

    def _gathered(self, params: list[torch.nn.Parameter], modifier: int | None = None):
        """ZeRO-3's parameters whole within the context (collective); the others are whole anyway."""
        if self.stage != 3:
            return contextlib.nullcontext()
        from deepspeed.runtime.zero.partition_parameters import GatheredParameters

        return GatheredParameters(params, modifier_rank=modifier)

    def _flat_partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions, one per parameter group (ZeRO-3: per sub-group), which the client
        optimizer steps (ZeRO-3 points the optimizer's groups at one sub-group at a time)."""
        if self.stage == 3:
            return list(self.zero.fp32_partitioned_groups_flat)
        return list(self.zero.single_partition_of_fp32_groups)

    def _inner_states(self) -> list[dict]:
        """The client optimizer's state per flat partition (none where it has stepped no time yet)."""
        inner = self.zero.optimizer
        return [inner.state[p] for p in self._flat_partitions() if p in inner.state]

    def optimizer_steps(self) -> int | None:
        """AdamW's step count (the same in every partition), None before its first step."""
        for state in self._inner_states():
            if "step" in state:
                return int(float(state["step"]))
        return None

    # -- checkpoints --------------------------------------------------------------------------------------

    def shadow(self) -> tuple[LM, torch.optim.AdamW]:
        """A single-device CPU copy of the model (uninitialised) with its buffers and unroll's AdamW over it."""
        with torch.device("meta"):
            copy = LM(self.cfg.model)
        copy.to_empty(device="cpu")
        for name, buf in self.model.named_buffers():
            copy.get_buffer(name).copy_(buf.detach().cpu())
        return copy, build_optimizer(copy, self.cfg)

    def pull(self) -> tuple[LM, torch.optim.AdamW]:
        """Collective: the shadow filled from the engine: fp32 weights, AdamW moments and step count."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        copy, adamw = self.shadow()
        steps = self.optimizer_steps()
        if steps is not None:
            self._link_moments()
        mine = dict(copy.named_parameters())
        for name, p in self.model.named_parameters():
            full = safe_get_full_fp32_param(p) if p.requires_grad else None
            if full is None:
                with self._gathered([p]):
                    full = p.detach().clone()
            mine[name].data.copy_(full.reshape(mine[name].shape).cpu())
            if steps is not None and p.requires_grad:
                adamw.state[mine[name]] = {
                    key: safe_get_full_optimizer_state(p, key).reshape(mine[name].shape).cpu()
                    for key in ("exp_avg", "exp_avg_sq")
                }
                adamw.state[mine[name]]["step"] = torch.tensor(float(steps))
        return copy, adamw

    def push(self, copy: LM, adamw: torch.optim.Optimizer | None) -> None:
        """Collective: the engine set from a shadow: weights (master and model copies), buffers and, given
        `adamw`, its moments and step count (the torch engine's AdamW state, as a checkpoint holds it)."""
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        theirs = dict(copy.named_parameters())
        params = list(self.model.named_parameters())
        device = next(iter(self.model.buffers()), params[0][1]).device
        for name, buf in self.model.named_buffers():
            buf.copy_(copy.get_buffer(name).to(buf.device))
        with self._gathered([p for _, p in params], modifier=0):  # the model's (low-precision) copy
            for name, p in params:
                p.data.copy_(theirs[name].data.to(p.device))
        for name, p in params:  # the fp32 master copy the optimizer steps
            if p.requires_grad:
                safe_set_full_fp32_param(p, theirs[name].data.to(device))
        if adamw is None:
            return
        saved = [adamw.state.get(theirs[name], {}) for name, _ in params]
        steps = next((int(float(s["step"])) for s in saved if "step" in s), None)
        if steps is None:
            return
        self._make_states(steps)
        for (_, p), state in zip(params, saved):
            if p.requires_grad:
                for key in ("exp_avg", "exp_avg_sq"):
                    safe_set_full_optimizer_state(p, state[key].to(device), key)

    def _make_states(self, steps: int) -> None:
        """The client optimizer's state at `steps` on every flat partition (zeros where it has none yet), so that
        the fragment API has moments to write into; ZeRO-1/2 link their per-parameter views to them."""
        inner = self.zero.optimizer
        for flat in self._flat_partitions():
            state = inner.state[flat]
            if "exp_avg" not in state:
                state["exp_avg"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(flat, memory_format=torch.preserve_format)
            if isinstance(state.get("step"), torch.Tensor):
                state["step"].fill_(float(steps))
            else:
                state["step"] = torch.tensor(float(steps)) if not self.cfg.deepspeed.cpu_adam else steps
        self._link_moments()
        if self.cfg.deepspeed.cpu_adam:  # DeepSpeedCPUAdam keeps its own step count per group
            for group in inner.param_groups:
                group["step"] = steps

    def _link_moments(self) -> None:
        """ZeRO-1/2: each parameter's views of the moments in its flat partition's state, which the fragment API
        reads. DeepSpeed links them once, at its first step, before a lazily initialised optimizer (torch's
        AdamW) has any state to link to; here they are linked to the state there is."""
        if self.stage == 3:  # ZeRO-3 reads the optimizer's state by the partition's offsets
            return
        from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

        zero = self.zero
        for lp_group, flat in zip(zero.bit16_groups, zero.single_partition_of_fp32_groups):
            lazy_init_hp_params_optimizer_state(lp_group, flat, zero.optimizer.state)
        zero._hp_optimizer_states_linked = True

    def load_latest(self, run_dir: Path, rank: int, io_threads: int) -> dict | None:
        """Collective: the newest good checkpoint (train/checkpoint/dcp.py load_latest, whatever engine saved
        it) into the engine; its train state, or None when there is none."""
        if not resolve.checkpoint_dirs(run_dir):  # a new run: no single-device copy to build
            return None
        copy, adamw = self.shadow()
        state = checkpoint.load_latest(run_dir, copy, adamw, rank=rank, io_threads=io_threads)
        if state is not None:
            self.push(copy, adamw)
        return state

    def load_model_weights(self, path: Path) -> None:
        """Collective: only the weights of a checkpoint (train.init_from)."""
        copy, _ = self.shadow()
        checkpoint.load_model_weights(path, copy)
        self.push(copy, None)

    # -- the step -----------------------------------------------------------------------------------------

    def install_judge(self) -> None:
        """Wraps the one ZeRO method that computes the global gradient norm, so that the pending step is
        judged where the norm is known (see `step`)."""
        self.judge: Callable[[torch.Tensor], torch.Tensor] | None = None
        self.norm: float | None = None
        zero = self.zero
        if self.stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            norm_groups = zero._get_norm_groups
            zero._get_norm_groups = lambda: [self._judge_norm(combine_grad_norm_groups(norm_groups()))]
        else:
            scaled = zero.scaled_global_norm
            zero.scaled_global_norm = lambda *a, **k: self._judge_norm(scaled(*a, **k))

    def _judge_norm(self, norm: torch.Tensor) -> torch.Tensor:
        """The global gradient norm as ZeRO computed it, with the judge's verdict: an infinite norm when the
        step is refused (ZeRO then skips it as an overflow)."""
        value = float(norm)
        self.norm = math.nan if value < 0 or not math.isfinite(value) else value
        if self.judge is None:
            return norm
        return self.judge(norm)


def build_deepspeed_training(cfg: Config, dist: D.DistInfo, layout: Layout, micro: int, accum: int):
    """The Training of train/build.py under parallel.engine=deepspeed: the whole model initialised as in one
    process, then partitioned by deepspeed.initialize."""
    from unroll.train.build import Training, autocast_for

    if dist.device.type == "cpu":  # run.device=cpu also where a GPU is present: DeepSpeed's CPU accelerator
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    deepspeed = import_deepspeed()
    check_engine(cfg, layout)
    torch.manual_seed(cfg.train.seed)
    with torch.device("meta"):
        model = LM(cfg.model)
    model.loss_chunk = cfg.train.loss_chunk
    # one process's model: no mesh, so the weights are those of every other layout (models/init.py)
    parallelize(
        model,
        None,
        Layout(),
        device=dist.device,
        seed=cfg.train.seed,
        bf16=False,
        activation_checkpoint=cfg.train.activation_checkpoint,
    )
    params = model.num_params()  # before ZeRO-3 partitions them
    optimizer = _client_optimizer(model, cfg)
    config = ds_config(cfg, micro, accum, dist.world, dist.device)
    engine, zero, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config, dist_init_required=False)
    run = DeepSpeedRun(engine, model, cfg, params)
    run.install_judge()
    ranks = {"dp": dist.rank, "dp_size": dist.world, "cp": 0, "cp_size": 1}
    return Training(
        model, engine, model, None, zero, None, layout, ranks, autocast_for(cfg, dist.device), micro, accum, None, run
    )


def deepspeed_step(
    t: Any,
    cfg: Config,
    batches: Callable[[int, int], torch.Tensor | TokenBatch],
    reads: list[tuple[int, int]],
    lr: float,
    device: torch.device,
    guard: StepGuard | None,
):
    """train/step.py train_step under DeepSpeed: the micro-batches' forwards and backwards through the engine,
    the loss all-reduced, and ZeRO's step, in which the guard judges the loss and the global gradient norm
    before anything is applied."""
    from unroll.train.step import StepResult, update_expert_bias

    run: DeepSpeedRun = t.engine
    engine, model = run.engine, t.model
    for group in run.zero.param_groups:
        group["lr"] = lr
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    for i, read in enumerate(reads):
        batch = batches(*read).to(device)
        with t.autocast:
            loss = training_loss.lm_loss(engine, batch)
            aux = model.aux_loss()
        engine.backward(micro_batch_objective(loss, aux))  # divided by the micro-batches (its accumulation)
        loss_sum += loss.detach()
        if aux is not None:
            aux_sum += aux.detach()
        if i < len(reads) - 1:
            engine.step()  # between micro-batches DeepSpeed only counts them
    result = StepResult(loss_sum, aux_sum, None, None)
    means = torch.stack([loss_sum, aux_sum]).float() / len(reads)
    D.all_reduce_sum(means)
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    result.loss, result.aux = (means / world).tolist()

    def judge(norm: torch.Tensor) -> torch.Tensor:
        assert run.norm is not None and result.loss is not None
        result.grad_norm_value = run.norm
        if guard is not None:
            result.verdict = guard.judge(result.loss, run.norm)
        return norm if result.verdict is None else torch.full_like(norm, math.inf)

    run.judge, run.norm = judge, None
    try:
        engine.step()  # the accumulation boundary: ZeRO's norm (judged), clipping and AdamW
    finally:
        run.judge = None
    if result.grad_norm_value is None:  # ZeRO computed no norm (cannot happen with compute_grad_norm)
        result.grad_norm_value = math.nan
    result.grad_norm = torch.tensor(result.grad_norm_value)
    if result.verdict is None:
        result.counts = update_expert_bias(model, device)
    else:
        for _, moe in model.moe_layers():
            moe.load_since_update.zero_()
    return result
