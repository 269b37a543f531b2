"""The end of a run: its validation perplexity, loss curve and a generated sample, as the summary `train`
returns and the lines it prints (rank 0)."""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch.distributed.tensor import DTensor

from unroll.models import LM
from unroll.models.generate import sample
from unroll.train.config import Config
from unroll.train.data_setup import RunData
from unroll.train.metrics import Metrics
from unroll.train.parallel import distributed as D
from unroll.train.parallel.mesh import Layout
from unroll.train.parallel.parallelize import without_context_parallel
from unroll.train.plot import plot_run


def final_report(
    cfg: Config,
    model: LM,
    data: RunData,
    run_dir: Path,
    dist: D.DistInfo,
    metrics: Metrics,
    step: int,
    val_loss: float | None,
    initial_val: float | None,
    layout: Layout,
) -> dict:
    """The end of a run: loss curve, validation perplexity and a generated sample (rank 0)."""
    summary: dict[str, object] = {"step": step, "stopped": False}
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if not dist.is_main and not sharded:
        return summary
    zero3 = cfg.parallel.engine == "deepspeed" and cfg.deepspeed.zero_stage == 3  # parameters partitioned
    if cfg.sample.prompt and cfg.sample.max_new_tokens and (layout.tp > 1 or layout.pp > 1 or zero3):
        if dist.is_main:
            metrics.write(
                f"(no sample: generating under tensor or pipeline parallelism or ZeRO-3 is not supported; "
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
