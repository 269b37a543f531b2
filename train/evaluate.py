"""The validation loss of a run, plain or pipelined, over every data-parallel rank."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from unroll.models import LM
from unroll.train import loss as training_loss  # lm_loss looked up per call: a test hook may replace it
from unroll.train.config import Config
from unroll.train.data_setup import RunData
from unroll.train.loss import split_batch, split_resets
from unroll.train.parallel import distributed as D

if TYPE_CHECKING:
    from unroll.train.parallel.pipeline import Pipeline


@torch.no_grad()
def evaluate(
    model: LM, data: RunData, cfg: Config, dist: D.DistInfo, autocast, ranks: dict, pipe: Pipeline | None = None
) -> float:
    """Mean loss over the first eval.batches × eval.batch_size validation sequences (fixed, in order),
    split over the data-parallel ranks (cp ranks share a batch, each its slice; under pipelining the
    ranks with the last stage hold the losses)."""
    model.eval()
    assert data.valid is not None, "evaluate runs only with validation data"
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
        loss: torch.Tensor | None
        with autocast:
            if pipe is None:
                loss = training_loss.lm_loss(model, batch, ranks["cp"], ranks["cp_size"])
            else:
                inputs, targets = split_batch(batch, ranks["cp"], ranks["cp_size"])
                loss = pipe.forward_loss(inputs, targets, split_resets(batch, ranks["cp"], ranks["cp_size"]))
        if loss is not None:
            count = weight * batch.shape[0]
            total += torch.stack([loss.double() * count, torch.tensor(count, device=dist.device, dtype=torch.float64)])
    D.all_reduce_sum(total)
    model.train()
    return (total[0] / total[1]).item()
