"""Resume on another layout: a checkpoint saved under one (dp, tp, pp, cp, ep) layout and world size resumes
under another, and the run goes on as if uninterrupted.

Each test is a chain of short segments (2 steps each) in one run directory, every segment on another layout,
so every boundary is a layout change; the whole run is compared with one uninterrupted one-process run:
every logged loss, validation loss, gradient norm and MoE balancing loss (float32 tolerance), the learning
rate and the data position (`tokens`) exactly, and each checkpoint's step and samples consumed. The data
position is global samples (train_state.json's `samples_consumed`; every rank derives its own offset from
it and its dp index), so it does not depend on the world size that saved it.

Tested here: PP 2 → FSDP 2 → 1 process → FSDP 2; TP 2 → DDP 2 → TP 2 → 1 process; CP 2 → 1 process → EP 2
→ 1 process. Elsewhere: PP 2 → 1 process with tied embeddings (test_train_pipeline.py) and dp_shard 4 × EP 2
→ 1 process (test_train_parallel.py), every figure; dp_shard 2 × EP 2 → 1 process (test_train_parallel.py),
the losses; FSDP 2 × TP 2 → 1 process (test_train_parallel.py) and FSDP 2 → 1 process (test_train_run.py),
the step count only. The optimizer's groups are recorded by index, so build_optimizer gives the MoE experts
their own group under every layout (1 process → EP 2 failed on a missing optim.param_groups.2 before).

RNG: checkpoints keep every rank's RNG state (rng_rank{r}.json); on more ranks than saved, the new ranks take
rank 0's, on fewer the extra files are ignored. A rank's RNG state therefore does not carry over a layout
change as it would in an uninterrupted run, and that is harmless because a training step draws no random
numbers: the model has no dropout, routing and Newton solves are deterministic, the data order is a pure
function of (seed, global sample index) and sampling uses its own seeded generator —
test_a_training_step_draws_no_random_numbers checks it.
(The schedule is `constant`: a cosine's shape depends on train.steps, which each segment sets
to its own end; the warmup does not.)
"""

import json
import random

import numpy as np
import pytest
import torch
from conftest import run_cli, torchrun_train, train_one_process
from test_train_parallel import assert_same_run
from test_train_pipeline import MODEL

from unroll.train.metrics import read_metrics

SEGMENT = 2  # steps per segment
SECTIONS = dict(
    model=MODEL,
    train={"steps": 4 * SEGMENT, "batch_size": 8, "micro_batch_size": 2},
    schedule={"name": "constant", "warmup_steps": 3},
    eval={"every": SEGMENT},
    checkpoint={"every": SEGMENT, "keep": 2},
)

# (name, processes, overrides, what the startup line says)
LAYOUTS = {
    "one": (1, [], "one rank"),
    "fsdp2": (2, [], "(dp_shard 2)"),
    "ddp2": (2, ["parallel.dp_replicate=2", "parallel.dp_shard=1"], "(dp_replicate 2)"),
    "tp2": (2, ["parallel.tp=2"], "(tp 2)"),
    "pp2": (2, ["parallel.pp=2"], "(pp 2)"),
    "cp2": (2, ["parallel.cp=2", "parallel.dp_shard=1"], "(cp 2)"),
    "ep2": (2, ["parallel.ep=2"], "(dp_shard 2 × ep 2)"),
}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, small_data, offline_env):
    return train_one_process(tmp_path_factory.mktemp("relayout_one"), small_data, offline_env, **SECTIONS)


def run_chain(tiny_config, env, name: str, chain: list[str]):
    """Trains SEGMENT steps under each layout of `chain` in turn, each resuming the one before's checkpoint."""
    config = tiny_config(name, **SECTIONS)
    run_dir = config.parent / name
    for i, layout in enumerate(chain):
        nproc, overrides, described = LAYOUTS[layout]
        end = (i + 1) * SEGMENT
        args = [f"train.steps={end}", *overrides]
        out = run_cli(["train", config, *args], env) if nproc == 1 else torchrun_train(nproc, config, env, *args)
        log = out.stdout + out.stderr
        assert described in log, (layout, log[-2000:])
        assert (f"resumed at step {i * SEGMENT}" in log) == (i > 0), (layout, log[-2000:])
        state = json.loads((run_dir / f"checkpoints/step_{end:08d}/train_state.json").read_text())
        assert (state["step"], state["samples_consumed"], state["world_size"]) == (end, end * 8, nproc), layout
    return run_dir


def assert_continues(base_dir, run_dir, rel: float) -> None:
    """The figures of one uninterrupted run (assert_same_run), plus the step sequence, the learning rate
    and the data position exactly."""
    assert_same_run(base_dir, run_dir, rel=rel)
    base, rows = read_metrics(base_dir), read_metrics(run_dir)
    train_rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in train_rows] == list(range(1, 4 * SEGMENT + 1))
    for ra, rb in zip(base, rows):
        if "loss" in ra:
            assert rb["lr"] == ra["lr"] and rb["tokens"] == ra["tokens"] == rb["step"] * 8 * 32, ra["step"]


def test_pipeline_to_fsdp_to_one_process_to_fsdp(uninterrupted, tiny_config, offline_env):
    """PP 2 → FSDP 2 (each stage's parameters, saved under the LM's names, gathered into shards), FSDP 2 →
    1 process, 1 process → FSDP 2."""
    run_dir = run_chain(tiny_config, offline_env, "pp_fsdp_one_fsdp", ["pp2", "fsdp2", "one", "fsdp2"])
    assert_continues(uninterrupted, run_dir, rel=2e-5)


def test_tensor_parallel_to_ddp_and_back_to_one_process(uninterrupted, tiny_config, offline_env):
    """TP 2 → DDP 2 (the fused weights saved in single-device layout), DDP 2 → TP 2, TP 2 → 1 process."""
    run_dir = run_chain(tiny_config, offline_env, "tp_ddp_tp_one", ["tp2", "ddp2", "tp2", "one"])
    assert_continues(uninterrupted, run_dir, rel=5e-5)


def test_context_and_expert_parallel_to_one_process_and_back(uninterrupted, tiny_config, offline_env):
    """CP 2 → 1 process, 1 process → EP 2 (each rank loads its half of the experts), EP 2 → 1 process."""
    run_dir = run_chain(tiny_config, offline_env, "cp_one_ep_one", ["cp2", "one", "ep2", "one"])
    assert_continues(uninterrupted, run_dir, rel=2e-5)


def test_a_training_step_draws_no_random_numbers(tiny_config, small_data):
    """Why the RNG states need not follow a layout change: forward, backward with the MoE losses and an
    optimizer step of the model above leave every global RNG where it was."""
    from unroll.models import LM
    from unroll.train.config import load_config
    from unroll.train.loss import lm_loss
    from unroll.train.optim import build_optimizer

    cfg = load_config(str(tiny_config("rng", **SECTIONS)))
    torch.manual_seed(0)
    model = LM(cfg.model)
    optimizer = build_optimizer(model, cfg)
    batch = torch.randint(0, small_data.vocab, (2, 33))
    before = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    loss = lm_loss(model, batch) + model.aux_loss()
    loss.backward()
    optimizer.step()
    assert model.aux_loss() is not None  # the MoE layers ran
    assert torch.equal(torch.get_rng_state(), before[0])
    assert random.getstate() == before[1] and np.array_equal(np.random.get_state()[1], before[2])
