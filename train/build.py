"""What one rank trains: the model built on the meta device, the layout applied, this rank's part allocated and
initialised, and the optimizer on it (`build_training`)."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch.distributed.device_mesh import DeviceMesh

from unroll.models import LM
from unroll.train.config import Config
from unroll.train.optim import apply_trainable, build_optimizer
from unroll.train.parallel import distributed as D
from unroll.train.parallel.mesh import Layout, build_mesh, data_ranks
from unroll.train.parallel.parallelize import parallelize, uses_fsdp

if TYPE_CHECKING:  # torch.distributed.pipelining imports torch._dynamo: a second per rank, only for pp > 1
    from unroll.train.deepspeed_engine import DeepSpeedRun
    from unroll.train.parallel.pipeline import Pipeline


def autocast_for(cfg: Config, device: torch.device) -> contextlib.AbstractContextManager:
    """The forwards' autocast for run.dtype: bf16 (auto: on a GPU), or none (float32)."""
    dtype = cfg.run.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    if dtype == "float32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@dataclass
class Training:
    """What one rank trains, built by `build_training`."""

    model: LM  # the whole LM; under pipelining the other ranks' stages stay on the meta device
    trained: torch.nn.Module  # what the step calls: the model, or its DDP wrapper
    owned: torch.nn.Module  # this rank's parameters under the LM's names: what the optimizer and checkpoints see
    pipe: Pipeline | None
    optimizer: torch.optim.AdamW
    mesh: DeviceMesh | None  # None for one process
    layout: Layout
    ranks: dict  # this rank's data coordinates (train/parallel/mesh.py data_ranks)
    autocast: contextlib.AbstractContextManager
    micro: int  # sequences per forward
    accum: int  # forwards per step
    trainable: int | None  # elements left trainable by train.trainable
    engine: DeepSpeedRun | None = None  # parallel.engine=deepspeed: its engine (train/deepspeed_engine.py)


def build_training(
    cfg: Config, dist: D.DistInfo, layout: Layout, micro: int, accum: int, *, gpu_precision: bool = False
) -> Training:
    """The model built on the meta device, the layout applied, only this rank's part allocated and
    initialised from train.seed (the same weights under every layout: models/init.py), the optimizer on it.
    FSDP2 gathers bf16 parameters where bf16 autocast runs on a GPU (or anywhere with gpu_precision: a
    rehearsal of a GPU job on the CPU)."""
    if cfg.parallel.engine == "deepspeed":
        from unroll.train.deepspeed_engine import build_deepspeed_training

        return build_deepspeed_training(cfg, dist, layout, micro, accum)
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
    pipe = None
    if layout.pp > 1:
        from unroll.train.parallel.pipeline import Pipeline

        assert mesh is not None, "pp > 1 runs on a mesh"
        pipe = Pipeline(model, mesh["pp"], cfg.parallel.pp_schedule, seq_split=layout.tp, hidden_dtype=hidden)
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
