"""Pipeline parallelism in the trainer (`parallel.pp`, `parallel.pp_schedule`) under torchrun on gloo:
losses, validation losses and gradient norms over several steps match one process, for the schedules
with one and two stages per rank, MoE balancing losses included, alone and combined with FSDP, HSDP,
context and tensor parallelism; a pipelined checkpoint resumes in one process."""

import pytest
from conftest import run_cli, torchrun_train, train_one_process
from test_train_parallel import assert_same_run

MOE = {"experts": 4, "top_k": 2, "hidden": 16, "aux_loss_coef": 0.01, "z_loss_coef": 0.001}
MODEL = {
    "pattern": "GAML",
    "mlp_pattern": "DEDE",
    "n_heads": 2,
    "tie_embeddings": False,
    "moe": MOE,
    "m2rnn": {"k_dim": 8, "v_dim": 4, "v_heads": 4},
}
# 4 microbatches of 2 per rank: enough for 1F1B over 2 stages and the looped schedules over 4; the last stage's
# loss in chunks of 24 of a microbatch's 64 tokens (recomputed in the backward, inside the schedules)
SECTIONS = dict(
    model=MODEL, train={"steps": 4, "batch_size": 8, "micro_batch_size": 2, "loss_chunk": 24}, eval={"every": 2}
)


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, small_data, offline_env):
    return train_one_process(tmp_path_factory.mktemp("pp_one"), small_data, offline_env, **SECTIONS)


@pytest.mark.parametrize("schedule", ["1F1B", "Interleaved1F1B", "ZBVZeroBubble"])
def test_pipeline_schedules_match_one_process(one_process, tiny_config, offline_env, schedule):
    run = tiny_config(schedule, **SECTIONS)
    out = torchrun_train(2, run, offline_env, "parallel.pp=2", f"parallel.pp_schedule={schedule}")
    assert "pp 2" in out.stdout + out.stderr
    assert_same_run(one_process, run.parent / schedule)


def test_pipeline_with_fsdp_hsdp_context_and_tensor_parallel_matches_one_process(one_process, tiny_config, offline_env):
    """2-D layouts on 4 processes: pp 2 × dp_shard 2 (each stage an FSDP root), pp 2 × dp_replicate 2
    (HSDP with shards of one), pp 2 × cp 2 (the sequence split inside every stage) and pp 2 × tp 2 (each
    stage's blocks sharded, sequence-parallel hidden states between the stages)."""
    layouts = {
        "pp_fsdp": ["parallel.dp_shard=2"],
        "pp_hsdp": ["parallel.dp_replicate=2", "parallel.dp_shard=1"],
        "pp_cp": ["parallel.cp=2", "parallel.dp_shard=1"],
        "pp_tp": ["parallel.tp=2", "parallel.dp_shard=1"],
    }
    for name, overrides in layouts.items():
        run = tiny_config(name, **SECTIONS)
        out = torchrun_train(4, run, offline_env, "parallel.pp=2", *overrides)
        assert "pp 2 × " in out.stdout + out.stderr
        assert_same_run(one_process, run.parent / name)


def test_tied_pipeline_checkpoint_resumes_in_one_process(tiny_config, offline_env):
    """GPipe with tied embeddings over pp 2 × tp 2 (the last stage's replica of the embedding, its gradient
    summed with the first stage's, saved under `embed.weight` once): 4 pipelined steps, then one process
    resumes the checkpoint for 2 more, as if uninterrupted."""
    sections = dict(SECTIONS, model=MODEL | {"tie_embeddings": True})
    one = tiny_config("one", **sections)
    run_cli(["train", one, "train.steps=6"], offline_env)
    pp = tiny_config("pp", **sections, sample={"prompt": "ROMEO.", "max_new_tokens": 4})
    out = torchrun_train(4, pp, offline_env, "parallel.pp=2", "parallel.tp=2", "parallel.pp_schedule=GPipe")
    assert "no sample: generating under tensor or pipeline parallelism" in out.stdout
    run_cli(["train", pp, "train.steps=6"], offline_env)  # pp 2 → one process
    assert_same_run(one.parent / "one", one.parent / "pp", rel=5e-5)


def test_three_dimensional_layout_on_eight_processes(one_process, tiny_config, offline_env):
    """pp 2 × dp_shard 2 × cp 2: the stages FSDP-sharded over dp × cp and the sequence split inside each."""
    run = tiny_config("pp_dp_cp", **SECTIONS)
    out = torchrun_train(8, run, offline_env, "parallel.pp=2", "parallel.dp_shard=2", "parallel.cp=2")
    assert "pp 2 × dp_shard 2 × cp 2" in out.stdout + out.stderr
    assert_same_run(one_process, run.parent / "pp_dp_cp")
