"""Parallel layouts from `parallel.*`: the mesh is checked against the world size and the model, and
data-parallel training (DDP, FSDP2, HSDP) and context parallelism (alone and under FSDP2) under
torchrun on gloo match one process. (FSDP2 over two
ranks, the default layout, is tested with its resume in test_train_run.py.)"""

import pytest
from conftest import run_cli, torchrun_train

from unroll.models import ModelConfig
from unroll.train.config import ParallelConfig
from unroll.train.metrics import read_metrics
from unroll.train.parallel.mesh import LayoutError, check_model, resolve_layout


def test_layout_fills_dp_shard_and_names_bad_keys():
    layout = resolve_layout(ParallelConfig(tp=2, pp=2), 16)
    assert (layout.pp, layout.dp_replicate, layout.dp_shard, layout.cp, layout.tp) == (2, 1, 4, 1, 2)
    assert layout.dp == 4 and layout.world == 16
    with pytest.raises(LayoutError, match="world size 6 is not divisible by pp × dp_replicate × cp × tp = 4"):
        resolve_layout(ParallelConfig(tp=2, cp=2), 6)
    with pytest.raises(LayoutError, match=r"= 8 ranks, but the world size is 4"):
        resolve_layout(ParallelConfig(dp_shard=4, tp=2), 4)
    with pytest.raises(LayoutError, match="parallel.tp: must be positive"):
        resolve_layout(ParallelConfig(tp=0), 4)
    with pytest.raises(LayoutError, match="parallel.ep=4 must divide dp_shard × cp = 2"):
        resolve_layout(ParallelConfig(ep=4), 2)


def test_layout_is_checked_against_the_model():
    with pytest.raises(LayoutError, match="parallel.tp=4 must divide model.n_heads=6"):
        check_model(resolve_layout(ParallelConfig(tp=4), 4), ModelConfig(pattern="AG", d_model=48, n_heads=6))
    with pytest.raises(LayoutError, match="parallel.ep=2 needs MoE layers"):
        check_model(resolve_layout(ParallelConfig(ep=2), 2), ModelConfig(pattern="G"))
    with pytest.raises(LayoutError, match="parallel.pp=3 stages for 2 layers"):
        check_model(resolve_layout(ParallelConfig(pp=3), 3), ModelConfig(pattern="GG"))
    with pytest.raises(LayoutError, match="parallel.tp=2 must divide model.vocab_size=2049"):
        check_model(resolve_layout(ParallelConfig(tp=2), 2), ModelConfig(pattern="G", vocab_size=2049))


def assert_same_run(base_dir, run_dir, rel: float = 2e-5, up_to: int | None = None) -> None:
    """Every logged step of run_dir has the loss, validation loss, grad norm and MoE loss of base_dir's
    (float32 reduction order differs, hence `rel`); base_dir's steps after `up_to` are not compared."""
    base, rows = read_metrics(base_dir), read_metrics(run_dir)
    base = [r for r in base if up_to is None or r["step"] <= up_to]
    assert [r["step"] for r in rows] == [r["step"] for r in base]
    for ra, rb in zip(base, rows):
        for key in ("loss", "val_loss", "grad_norm", "moe_aux_loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], rel=rel), (run_dir.name, ra["step"], key)


def test_ddp_hsdp_and_fsdp_with_cp_match_one_process(tiny_config, offline_env):
    sections = dict(
        model={"pattern": "GA", "mlp_pattern": "DE", "moe": {"experts": 4, "top_k": 2, "hidden": 16}},
        train={"steps": 5, "batch_size": 8},
    )
    one = tiny_config("one", **sections)
    run_cli(["train", one], offline_env)
    ddp = tiny_config("ddp", **sections)
    torchrun_train(2, ddp, offline_env, "parallel.dp_replicate=2", "parallel.dp_shard=1")
    hsdp = tiny_config("hsdp", **sections)
    out = torchrun_train(4, hsdp, offline_env, "parallel.dp_replicate=2")
    assert "dp_replicate 2 × dp_shard 2" in out.stdout + out.stderr
    fsdp_cp = tiny_config("fsdp_cp", **sections)  # FSDP over dp_shard × cp, the sequence split in two
    out = torchrun_train(4, fsdp_cp, offline_env, "parallel.cp=2")
    assert "dp_shard 2 × cp 2" in out.stdout + out.stderr
    for name in ("ddp", "hsdp", "fsdp_cp"):
        assert_same_run(one.parent / "one", one.parent / name)


def test_pipeline_layouts_are_checked_by_key():
    from unroll.train.config import Config
    from unroll.train.parallel.mesh import Layout
    from unroll.train.parallel.pipeline import check_pipeline

    cfg = Config()
    cfg.model = ModelConfig(pattern="GGGG", d_model=16)
    cfg.parallel.pp_schedule = "pipedream"
    with pytest.raises(LayoutError, match="parallel.pp_schedule: unknown pipeline schedule 'pipedream'"):
        check_pipeline(Layout(pp=2), cfg, n_microbatches=4)
    cfg.parallel.pp_schedule = "1F1B"
    with pytest.raises(LayoutError, match="1F1B needs at least as many microbatches as stages.*train.micro_batch_size"):
        check_pipeline(Layout(pp=2), cfg, n_microbatches=1)
    cfg.parallel.pp_schedule = "Interleaved1F1B"
    cfg.model = ModelConfig(pattern="GG|GG", d_model=16)
    with pytest.raises(LayoutError, match=r"\(4 stages\), model.pattern: pattern 'GG\|GG' has 1 stage mark"):
        check_pipeline(Layout(pp=2), cfg, n_microbatches=4)
    cfg.parallel.pp_schedule, cfg.model = "ZBVZeroBubble", ModelConfig(pattern="GGGG", d_model=16, tie_embeddings=True)
    with pytest.raises(LayoutError, match="ZBVZeroBubble places the first and last stage on one rank"):
        check_pipeline(Layout(pp=2), cfg, n_microbatches=4)


CP_MODEL = {"pattern": "GAML", "n_heads": 2, "m2rnn": {"k_dim": 8, "v_dim": 4, "v_heads": 4}}


@pytest.mark.parametrize(
    "solvers",
    [{"solver": "newton", "m2rnn": {"solver": "sequential"}}, {"solver": "sequential", "m2rnn": {"solver": "newton"}}],
)
def test_context_parallel_matches_one_process(tiny_config, offline_env, solvers):
    """The sequence split over 2 ranks: recurrences by sequence-parallel Newton or by the state hand-off,
    the M²RNN convolution across the split, attention over gathered keys and values."""
    model = CP_MODEL | solvers | {"m2rnn": CP_MODEL["m2rnn"] | solvers["m2rnn"]}
    sections = dict(model=model, train={"steps": 4, "batch_size": 4}, eval={"every": 2})
    one = tiny_config("one", **sections)
    run_cli(["train", one], offline_env)
    cp = tiny_config("cp", **sections)
    out = torchrun_train(2, cp, offline_env, "parallel.cp=2")
    assert "cp 2" in out.stdout + out.stderr
    assert_same_run(one.parent / "one", one.parent / "cp")


def test_tensor_parallel_alone_and_under_fsdp_match_one_process(tiny_config, offline_env):
    """tp 2 (2 processes) and dp_shard 2 × tp 2 (4 processes), every mixer kind and a MoE MLP, the loss
    vocabulary-parallel in chunks of 40 tokens (not dividing the 128 or 64 a rank has); then the tp checkpoint
    resumes in one process (its fused and vocabulary-split weights saved in the single-device layout)."""
    model = CP_MODEL | {"mlp_pattern": "DEDD", "moe": {"experts": 4, "top_k": 2, "hidden": 16}}
    sections = dict(model=model, train={"steps": 4, "batch_size": 4, "loss_chunk": 40}, eval={"every": 2})
    one = tiny_config("one", **sections)
    run_cli(["train", one], offline_env)
    tp = tiny_config("tp", **sections, sample={"prompt": "ROMEO.", "max_new_tokens": 4})
    out = torchrun_train(2, tp, offline_env, "parallel.tp=2")
    assert (
        "tp 2" in out.stdout + out.stderr and "no sample: generating under tensor or pipeline parallelism" in out.stdout
    )
    fsdp_tp = tiny_config("fsdp_tp", **sections)
    out = torchrun_train(4, fsdp_tp, offline_env, "parallel.tp=2")
    assert "dp_shard 2 × tp 2" in out.stdout + out.stderr
    for name in ("tp", "fsdp_tp"):
        assert_same_run(one.parent / "one", one.parent / name, rel=5e-5)
    run_cli(["train", fsdp_tp, "train.steps=6"], offline_env)  # 4 ranks (dp 2 × tp 2) → 1 process
    assert len([r for r in read_metrics(one.parent / "fsdp_tp") if "loss" in r]) == 6


def test_expert_parallel_under_fsdp_matches_one_process_and_resumes_in_one(tiny_config, offline_env):
    """ep 2 = dp_shard 2: each rank keeps half the experts (FSDP ignores them), tokens travel by all_to_all;
    then the 2-rank checkpoint, its experts saved as one tensor sharded over the ranks, resumes in one process."""
    model = {
        "pattern": "GA",
        "mlp_pattern": "E",
        "n_heads": 2,
        "moe": {"experts": 4, "top_k": 2, "hidden": 16, "shared_experts": 1},
    }
    sections = dict(model=model, train={"steps": 4, "batch_size": 8}, eval={"every": 2})
    one = tiny_config("one", **sections)
    run_cli(["train", one], offline_env)
    ep = tiny_config("ep", **sections)
    out = torchrun_train(2, ep, offline_env, "parallel.ep=2")
    assert "dp_shard 2 × ep 2" in out.stdout + out.stderr
    assert_same_run(one.parent / "one", one.parent / "ep")
    run_cli(["train", one, "train.steps=6"], offline_env)
    run_cli(["train", ep, "train.steps=6"], offline_env)  # 2 ranks with ep → 1 process
    a, b = read_metrics(one.parent / "one"), read_metrics(one.parent / "ep")
    assert [r["loss"] for r in b if r["step"] > 4 and "loss" in r] == pytest.approx(
        [r["loss"] for r in a if r["step"] > 4 and "loss" in r], rel=2e-5
    )


def test_not_yet_names_the_keys_and_plan_skips_those_layouts():
    from unroll.train.config import load_config
    from unroll.train.parallel.mesh import Layout, check_supported, not_yet
    from unroll.train.planning.plan import candidate_layouts

    assert not_yet(Layout(pp=2, dp_shard=2, cp=2)) == not_yet(Layout(tp=2, cp=2)) == not_yet(Layout(pp=2, tp=2)) == []
    assert not_yet(Layout(tp=2, dp_replicate=2)) == []
    assert not_yet(Layout(dp_shard=4, ep=2)) == not_yet(Layout(dp_replicate=2, dp_shard=2, ep=2)) == []
    with pytest.raises(
        LayoutError, match=r"parallel.ep=2: only ep dividing dp_shard, without cp.*\(got dp_shard 2 × cp 2 × ep 2\)"
    ):
        check_supported(Layout(dp_shard=2, cp=2, ep=2))
    with pytest.raises(
        LayoutError, match=r"parallel.ep=2: only ep dividing dp_shard.*\(got pp 2 × dp_shard 2 × ep 2\)"
    ):
        check_supported(Layout(pp=2, dp_shard=2, ep=2))
    model = load_config("m2rnn-moe-7b").model
    layouts = list(candidate_layouts(model, 64, 8))
    assert layouts and all(not not_yet(Layout(**x)) for x in layouts)
    assert any(x["ep"] > 1 for x in layouts) and any(x["cp"] > 1 for x in layouts)
    assert all(x["cp"] == x["tp"] == x["pp"] == 1 and x["dp_shard"] % x["ep"] == 0 for x in layouts if x["ep"] > 1)


def test_tensor_and_context_parallel_combinations_with_recompute_match_one_process(tiny_config, offline_env):
    """On 4 processes: tp 2 × cp 2 (the heads and the sequence split at once; FSDP over the cp ranks),
    tp 2 × dp_replicate 2 with every block recomputed in the backward, and cp 4 with every block recomputed
    (the recomputed state hand-offs, gathers and sequence-parallel Newton solves run again, in the same
    order on every cp rank)."""
    from test_train_pipeline import SECTIONS

    one = tiny_config("one", **SECTIONS)
    run_cli(["train", one], offline_env)
    layouts = {
        "tp_cp": ["parallel.tp=2", "parallel.cp=2"],
        "tp_hsdp_ac": ["parallel.tp=2", "parallel.dp_replicate=2", "train.activation_checkpoint=full"],
        "cp_ac": ["parallel.cp=4", "train.activation_checkpoint=full", "model.solver=newton"],
    }
    for name, overrides in layouts.items():
        run = tiny_config(name, **SECTIONS)
        out = torchrun_train(4, run, offline_env, "parallel.dp_shard=1", *overrides)
        assert overrides[0].replace("parallel.", "").replace("=", " ") in out.stdout + out.stderr
        assert_same_run(one.parent / "one", one.parent / name, rel=5e-5)


def test_ranks_without_a_validation_batch_still_join_the_sharded_forward(tiny_config, offline_env):
    """4 FSDP ranks, one validation batch of 4: ranks 1-3 have none of their own and run it with weight 0
    (skipping it left rank 0 waiting in FSDP's all-gather until the collective timeout)."""
    sections = dict(train={"steps": 2, "batch_size": 8}, eval={"every": 1, "batches": 1, "batch_size": 4})
    one = tiny_config("one", **sections)
    run_cli(["train", one], offline_env)
    fsdp = tiny_config("fsdp", **sections)
    torchrun_train(4, fsdp, offline_env, "run.collective_timeout_s=60", timeout=200)
    assert_same_run(one.parent / "one", one.parent / "fsdp")


def test_expert_parallel_groups_smaller_than_the_data_ranks_match_one_process(tiny_config, offline_env):
    """ep 2 on 4 data ranks, FSDP (dp_shard 4) and HSDP (dp_replicate 2 × dp_shard 2): two groups of 2 split
    the experts and replicate each other's, expert gradients summed over the groups; the FSDP run's
    checkpoint (experts sharded over ep, replicated over the groups) then resumes in one process."""
    model = {
        "pattern": "GA",
        "mlp_pattern": "E",
        "n_heads": 2,
        "moe": {"experts": 4, "top_k": 2, "hidden": 16, "aux_loss_coef": 0.01, "bias_update_rate": 0.01},
    }
    # micro-batches of 2 everywhere: the balancing loss is a function of the micro-batch
    sections = dict(model=model, train={"steps": 4, "batch_size": 8, "micro_batch_size": 2}, eval={"every": 2})
    one = tiny_config("one", **sections)
    run_cli(["train", one, "train.steps=6"], offline_env)
    for name, overrides in {"ep_fsdp": [], "ep_hsdp": ["parallel.dp_replicate=2"]}.items():
        run = tiny_config(name, **sections)
        out = torchrun_train(4, run, offline_env, "parallel.ep=2", *overrides)
        assert "ep 2" in out.stdout + out.stderr
    assert_same_run(one.parent / "one", one.parent / "ep_hsdp", up_to=4)
    run_cli(["train", one.parent / "ep_fsdp.yaml", "train.steps=6"], offline_env)  # 4 ranks → 1 process
    assert_same_run(one.parent / "one", one.parent / "ep_fsdp")
