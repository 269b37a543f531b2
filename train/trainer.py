"""The training loop: one process, or any layout of train/parallel/mesh.py under torchrun; exact resume.

`train` reads as the loop itself: a `TrainingRun` is set up (process group, checks, model, optimizer, the
newest checkpoint), then each iteration trains a step (train/step.py), logs it, evaluates
(train/evaluate.py) and saves when due, until train.steps or a stop signal.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import asdict
from pathlib import Path

import torch

from unroll.data.prefetch import Prefetcher
from unroll.models.flops import model_flops
from unroll.train.build import build_training
from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity, resolve
from unroll.train.checkpoint.rundir import CONFIG_FILE, prepare_run_dir
from unroll.train.checkpoint.writer import CheckpointWriter
from unroll.train.config import Config
from unroll.train.data_order import STATE_KEY as DATA_ORDER_KEY
from unroll.train.data_order import resolved_order, with_run_order
from unroll.train.data_setup import open_run_data
from unroll.train.evaluate import evaluate
from unroll.train.final_report import final_report
from unroll.train.layer_metrics import load_metrics, solve_iterations, solver_metrics
from unroll.train.loss import TokenBatch
from unroll.train.metrics import Metrics
from unroll.train.mfu import peak_flops, utilisation
from unroll.train.parallel import distributed as D
from unroll.train.plot import plot_run
from unroll.train.preflight import check_layout
from unroll.train.rollback import checkpoint_to_roll_back_to, not_applied
from unroll.train.schedule import lr_at
from unroll.train.signals import StopRequest, pause_for_signal
from unroll.train.step import StepResult, step_reads, train_step
from unroll.train.step_guard import StepGuard, TrainingDiverged
from unroll.train.watchdog import Watchdog


def train(cfg: Config) -> dict:
    """Runs (or resumes) the configured training; returns the final figures. RUN_DIR/config.yaml is written
    once every check has passed, so a refused run leaves the directory as it was. A run whose newest
    checkpoint is already at train.steps is left alone too: one line says which train.steps to raise, and
    it ends as a success (exit 0), since nothing failed and a rerun of a finished job is not an error."""
    run = TrainingRun(cfg)
    if run.finished_already():
        return run.leave_as_it_is()
    run.start()
    clean = False  # on an exception, skip the final barrier: the other ranks may never reach it
    try:
        while run.step < cfg.train.steps:
            result = run.train_step()
            if result is None:  # rolled back: the weights of that step, the data from here on
                continue
            run.log_step(result)
            run.evaluate_if_due()
            if run.save_if_due(applied=result.verdict is None):  # stopped by a signal, checkpoint saved
                clean = True
                return {"step": run.step, "stopped": True}
            run.restart_timer_if_logged()
        summary = run.finish()
        clean = True
        return summary
    except TrainingDiverged:
        run.diverged()  # every rank reached this verdict at the same step
        clean = True
        raise
    finally:
        run.close(clean)


class TrainingRun:
    """One rank's training run: what it trains, where it stands (step, samples) and what it writes."""

    def __init__(self, cfg: Config):
        """The process group, every check (layout, data files, the run directory's model), this rank's
        model and optimizer, and the newest checkpoint (or train.init_from's weights) loaded."""
        self.cfg = cfg
        self.dist = dist = D.init(cfg.run.device, cfg.run.collective_timeout_s)
        if cfg.run.threads and dist.device.type == "cpu":
            torch.set_num_threads(cfg.run.threads)
        shape = check_layout(cfg, dist.world)  # the launchers ran these checks (train/preflight.py) already
        self.layout, self.micro, self.accum = shape.layout, shape.micro, shape.accum
        self.cfg = cfg = with_run_order(cfg)  # data.order: a resumed run's own (train/data_order.py)
        self.data = open_run_data(cfg)  # every file checked before any work
        self.run_dir = Path(cfg.run.dir)
        check_same_model(self.run_dir, cfg)

        self.t = build_training(cfg, dist, self.layout, self.micro, self.accum)
        if cfg.train.init_from and not resolve.complete_checkpoints(self.run_dir):  # a new run from other weights
            # into the sharded model (DCP reshards; a pipeline's tied replica reads embed.weight too)
            source = resolve.checkpoint_of(cfg.train.init_from, cfg.model, setting="train.init_from").path
            if self.t.engine is not None:  # parallel.engine=deepspeed: through a single-device copy
                self.t.engine.load_model_weights(source)
            else:
                checkpoint.load_model_weights(source, self.t.owned)
        if self.t.engine is not None:  # the same checkpoints, through a single-device copy
            self.state = self.t.engine.load_latest(self.run_dir, dist.rank, cfg.checkpoint.io_threads)
        else:
            self.state = checkpoint.load_latest(
                self.run_dir, self.t.owned, self.t.optimizer, rank=dist.rank, io_threads=cfg.checkpoint.io_threads
            )
        if self.state:  # an older checkpoint than the one data.order was resolved with, if the newest failed to load
            resolved_order(cfg.data.order, self.state, f"checkpoint step {self.state['step']}")
        self.step = self.state["step"] if self.state else 0
        self.samples = self.state["samples_consumed"] if self.state else 0

    def finished_already(self) -> bool:
        """Whether the newest checkpoint is already at train.steps."""
        return bool(self.state) and self.step >= self.cfg.train.steps

    def leave_as_it_is(self) -> dict:
        """A finished run: one line on what to raise; the run directory is left as it is."""
        if self.dist.is_main:
            print(nothing_to_train(self.run_dir, self.step, self.cfg.train.steps), flush=True)
        D.shutdown()
        return {"step": self.step, "stopped": False, "finished": True}

    def start(self) -> None:
        """The run's config.yaml, its metrics and first line, the validation loss it starts from, the
        guard, the stop signals, the watchdog and the checkpoint writer."""
        cfg, dist, state, t = self.cfg, self.dist, self.state, self.t
        # every check has passed: only now is the run's config.yaml written (a refused run leaves the earlier one)
        prepare_run_dir(cfg, dist.is_main, self.data.tokenizer)
        D.barrier()
        self.metrics = Metrics(
            self.run_dir,
            enabled=dist.is_main,
            total_steps=cfg.train.steps,
            start_step=self.step,
            wandb_mode=cfg.logging.wandb,
            wandb_project=cfg.logging.wandb_project,
            config=asdict(cfg),
            progress=cfg.logging.progress,
        )
        self.metrics.write(
            f"model: {t.engine.params if t.engine else t.model.num_params():,} parameters, pattern {cfg.model.pattern!r}; "
            f"{dist.world} rank(s) ({t.engine.describe() if t.engine else self.layout.describe()}) × {self.accum} micro-batch(es) of {self.micro} × "
            f"{cfg.data.seq_len} tokens"
            + (f"; {t.trainable:,} trainable (train.trainable={cfg.train.trainable!r})" if t.trainable else "")
            + (f"; weights from {cfg.train.init_from}" if cfg.train.init_from and not state else "")
            + (starting_note(state) if state else "")
            + D.restart_note()
        )
        self.initial_val = state.get("initial_val_loss") if state else None
        if self.data.valid is not None and (not state or (self.step == 0 and self.initial_val is None)):  # grown
            self.initial_val = self.evaluate()
            self.metrics.log({"step": 0, "val_loss": self.initial_val, "val_ppl": math.exp(self.initial_val)})
        self.guard = StepGuard(
            max_bad_steps=cfg.train.max_bad_steps,
            spike_factor=cfg.train.spike_factor,
            spike_window=cfg.train.spike_window,
            spike_policy=cfg.train.spike_policy,
        )
        self.guard.load_state_dict(state.get("guard") if state else None)
        self.stop = StopRequest()
        self.watchdog = Watchdog(cfg.run.step_timeout_s, dist.rank)
        self.timer, self.timed_steps = time.perf_counter(), 0
        self.flops = model_flops(cfg.model, cfg.data.seq_len)
        # autocast's dtype is the matmuls' (bf16 on a GPU by default); without autocast they run in float32
        self.peak = peak_flops(dist.device, getattr(t.autocast, "fast_dtype", torch.float32), cfg.train.peak_tflops)
        self.saved_at: int | None = self.step if state else None
        self.val_loss: float | None = None
        self.load_window: torch.Tensor | None = None  # MoE assignment counts since the last logged step
        self.writer = CheckpointWriter(
            self.run_dir,
            keep=cfg.checkpoint.keep,
            rank=dist.rank,
            async_save=cfg.checkpoint.async_save,
            io_threads=cfg.checkpoint.io_threads,
        )
        self.reader = self.read_ahead()

    def read_ahead(self) -> Prefetcher[TokenBatch]:
        """This rank's training batches from the current step to train.steps, read data.prefetch ahead in a
        thread; the batch of each read is the same as without it (data/prefetch.py)."""
        cfg, t = self.cfg, self.t
        micro, accum, pipelined, batch_size = self.micro, self.accum, t.pipe is not None, cfg.train.batch_size
        first_samples = range(self.samples, self.samples + (cfg.train.steps - self.step) * batch_size, batch_size)
        planned = (read for s in first_samples for read in step_reads(self.first(s), micro, accum, pipelined))
        pin = self.dist.device.type == "cuda" and torch.cuda.is_available()
        return self.data.train_reader(planned, cfg.data.prefetch, pin)

    def first(self, samples: int) -> int:
        """This rank's first sample of the step that starts at global sample `samples`."""
        return samples + self.t.ranks["dp"] * self.micro * self.accum

    def train_step(self) -> StepResult | None:
        """One optimizer step on the next samples, judged by the guard. Returns its result, or None when the
        guard rolled the run back to a checkpoint (its step and the samples after this one)."""
        cfg, t = self.cfg, self.t
        self.watchdog.arm(self.step + 1)
        self.lr = lr_at(self.step, cfg.optim.lr, cfg.train.steps, cfg.schedule)
        result = train_step(t, cfg, self.reader, self.first(self.samples), self.lr, self.dist.device, self.guard)
        if result.counts is not None:
            self.load_window = result.counts if self.load_window is None else self.load_window + result.counts
        self.step, self.samples, self.timed_steps = (
            self.step + 1,
            self.samples + cfg.train.batch_size,
            self.timed_steps + 1,
        )
        self.metrics.advance()
        if result.verdict is None:
            assert result.loss is not None, "a guarded step has its loss"
            self.guard.applied(self.step, result.loss)
            return result
        back = not_applied(
            self.step,
            self.samples,
            result,
            self.guard,
            self.metrics,
            lambda: checkpoint_to_roll_back_to(self.run_dir, t.owned, t.optimizer, self.writer, self.dist.rank),
        )
        if back is None:
            return result
        self.step, self.saved_at, self.load_window = back, back, None
        self.metrics.rewind(self.step)
        self.reader.close()  # its plan ends at train.steps counted from before the rollback
        self.reader = self.read_ahead()
        return None

    def log_step(self, result: StepResult) -> None:
        """Every train.log_every steps and at the last: loss, learning rate, throughput (tokens/s, model TFLOP/s
        per rank with the Newton iterations the last forward took, MFU where the peak is known), gradient norm,
        the MoE loads and the solvers' figures (a step not applied has its event row instead)."""
        cfg, step = self.cfg, self.step
        if step % cfg.train.log_every != 0 and step != cfg.train.steps:
            return
        elapsed = time.perf_counter() - self.timer
        tokens_per_s = self.timed_steps * cfg.train.batch_size * cfg.data.seq_len / elapsed
        row = {
            "step": step,
            "loss": result.loss,
            "lr": self.lr,
            "tokens_per_s": tokens_per_s,
            "tokens": self.samples * cfg.data.seq_len,
            "skipped_steps": self.guard.skipped,
        }
        flops_per_token = self.flops.per_token(solve_iterations(self.t.model))
        row |= utilisation(tokens_per_s, flops_per_token, self.dist.world, self.peak)
        row["grad_norm"] = result.grad_norm_value  # taken by the guard: no second sync
        if self.load_window is not None:
            row["moe_aux_loss"] = result.aux
            row |= load_metrics(self.t.model, self.load_window)
            self.load_window = None
        if result.verdict is None:
            self.metrics.log(row | solver_metrics(self.t.model))

    def evaluate(self) -> float:
        return evaluate(self.t.model, self.data, self.cfg, self.dist, self.t.autocast, self.t.ranks, self.t.pipe)

    def evaluate_if_due(self) -> None:
        """Every eval.every steps and at the last, when the run has validation data."""
        cfg, step = self.cfg, self.step
        if self.data.valid is not None and ((cfg.eval.every and step % cfg.eval.every == 0) or step == cfg.train.steps):
            self.val_loss = val_loss = self.evaluate()
            self.metrics.log({"step": step, "val_loss": val_loss, "val_ppl": math.exp(val_loss)})

    def save_if_due(self, applied: bool) -> bool:
        """A checkpoint every checkpoint.every applied steps, at the last, and when any rank was asked to
        stop; returns whether the run stops here (its checkpoint written)."""
        cfg, step = self.cfg, self.step
        pause_for_signal(
            step, self.run_dir, self.stop, self.dist.rank
        )  # a test hook; nothing unless UNROLL_PAUSE_AT_STEP
        stopping = D.any_rank(self.stop.requested, self.dist.device)
        self.writer.poll(
            self.dist.device
        )  # an async save done everywhere is finished now; its failure stops every rank
        periodic = cfg.checkpoint.every and step % cfg.checkpoint.every == 0 and applied
        if stopping or periodic or step == cfg.train.steps:
            self.save()
        if stopping:
            self.writer.wait()
            self.metrics.write(
                f"stopped by signal {self.stop.signum or 'on another rank'} at step {step}; "
                f"checkpoint saved, `unroll train` with the same run.dir resumes"
            )
        return bool(stopping)

    def save(self) -> None:
        # parallel.engine=deepspeed: a single-device copy gathered from ZeRO's partitions, saved as one process's
        owned, optimizer = self.t.engine.pull() if self.t.engine is not None else (self.t.owned, self.t.optimizer)
        self.writer.save(self.step, owned, optimizer, self.train_state())
        self.saved_at = self.step

    def train_state(self) -> dict:
        """What a checkpoint records of the run beside the weights and the optimizer."""
        return {
            "samples_consumed": self.samples,
            "tokens_consumed": self.samples * self.cfg.data.seq_len,
            "world_size": self.dist.world,
            "initial_val_loss": self.initial_val,
            "guard": self.guard.state_dict(),
            DATA_ORDER_KEY: self.cfg.data.order,
        }

    def restart_timer_if_logged(self) -> None:
        """The throughput of the next logged row counts from here (this step's evaluation and save excluded)."""
        if self.step % self.cfg.train.log_every == 0:
            self.timer, self.timed_steps = time.perf_counter(), 0

    def finish(self) -> dict:
        """train.steps reached: the last checkpoint finished, the final validation loss, plot and sample."""
        self.watchdog.disarm()
        if self.saved_at != self.step:  # a new run of train.steps=0
            self.save()
        self.writer.wait()
        if self.val_loss is None and self.data.valid is not None:  # train.steps=0: report where it stands
            self.val_loss = self.evaluate()
        return final_report(
            self.cfg,
            self.t.model,
            self.data,
            self.run_dir,
            self.dist,
            self.metrics,
            self.step,
            self.val_loss,
            self.initial_val,
            self.layout,
        )

    def diverged(self) -> None:
        """TrainingDiverged: the pending checkpoint (a good one) finished, the loss curve plotted."""
        self.watchdog.disarm()
        self.writer.wait()
        if self.dist.is_main:
            with contextlib.suppress(FileNotFoundError):
                plot_run(self.run_dir)

    def close(self, clean: bool) -> None:
        self.reader.close()
        self.watchdog.disarm()
        self.writer.close(finish=clean)
        self.stop.restore()
        self.metrics.close()
        D.shutdown(clean)


def check_same_model(run_dir: Path, cfg: Config) -> None:
    """Refuses, in one line and before anything in it is written, a run directory whose checkpoints are all
    another model's (a run directory reused by mistake); reads only their manifests."""
    found = resolve.good_checkpoints(run_dir)
    if found and not resolve.good_checkpoints(run_dir, cfg.model):
        newest = found[-1][1]
        reason = (integrity.problem(newest, cfg.model) or "").removeprefix("saved from a different model: ")
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
