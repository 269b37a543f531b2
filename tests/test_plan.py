"""`unroll plan` from the code's own accounting: its parameter shares are what the trainer's layout gives a
rank (checked at 7B scale on the meta device), its components agree with what `unroll rehearse` measures
running the same rank's program (tiny and 400M presets, 8 to 64 fake ranks), and the command line."""

from pathlib import Path

import pytest
import torch
import yaml
from torch.distributed.tensor import DTensor

from unroll.launch.cli import main
from unroll.train.config import load_config
from unroll.train.parallel.mesh import Layout
from unroll.train.planning.plan import GiB, candidate_layouts, estimate, plan

LAYOUTS_7B = [
    ("paragru-7b", dict(dp_shard=64)),
    ("paragru-7b", dict(dp_shard=16, tp=4)),
    ("paralstm-7b", dict(pp=2, dp_shard=8, tp=4)),
    ("m2rnn-moe-7b", dict(dp_shard=64, ep=8)),
    ("m2rnn-moe-7b", dict(dp_shard=16, tp=4)),
]


@pytest.mark.parametrize(
    "preset,layout", LAYOUTS_7B, ids=[f"{p}-{'-'.join(f'{k}{v}' for k, v in lay.items())}" for p, lay in LAYOUTS_7B]
)
def test_the_plan_holds_exactly_what_the_trainer_gives_rank_0(preset, layout):
    """The 7B model built on the meta device and sharded by the trainer's own parallelize for rank 0 of 64
    (torch's fake process group; nothing allocated): the elements it holds are the plan's."""
    from unroll.models import LM
    from unroll.train.parallel.mesh import build_mesh
    from unroll.train.parallel.parallelize import _shard
    from unroll.train.parallel.pipeline import Pipeline
    from unroll.train.planning.fake_comm import fake_process_group

    cfg = load_config(preset)
    lay = Layout(**layout)
    with fake_process_group(0, 64):
        mesh = build_mesh(lay, "cpu")
        with torch.device("meta"):
            model = LM(cfg.model)
        pipe = Pipeline(model, mesh["pp"], cfg.parallel.pp_schedule) if lay.pp > 1 else None
        _shard(
            model,
            mesh,
            lay,
            bf16=True,
            activation_checkpoint="full",
            compile=False,
            stages=pipe.modules if pipe else None,
        )
        held = sum(
            (p.to_local() if isinstance(p, DTensor) else p).numel()
            for part in (pipe.modules if pipe else [model])
            for p in part.parameters()
        )
    assert estimate(cfg, lay, budget=0).params_held == held  # budget 0: the static part only, no probes


def test_experts_are_split_by_expert_parallelism_and_the_rest_by_fsdp():
    cfg = load_config("m2rnn-moe-7b")
    one, eight = (estimate(cfg, Layout(dp_shard=64, ep=ep), budget=0) for ep in (1, 8))  # static part only
    experts = 40 * 128 * 3 * 1536 * 256
    # ep = 1: FSDP shards the experts over 64 ranks; ep = 8: each rank keeps its 16 experts whole
    assert eight.params_held - one.params_held == pytest.approx(experts / 8 - experts / 64, rel=1e-3)
    c = eight.components
    assert c.weights == pytest.approx(4 * eight.params_held, rel=1e-4) and c.optimizer == pytest.approx(
        2 * c.gradients, rel=1e-4
    )


def test_tensor_parallel_layouts_need_tp_to_divide_the_vocabulary():
    cfg = load_config("paragru-7b").model
    assert {lay["tp"] for lay in candidate_layouts(cfg, 8, 8)} > {1}
    cfg.vocab_size += 1  # odd: only tp = 1
    assert {lay["tp"] for lay in candidate_layouts(cfg, 8, 8)} == {1}


def test_a_7b_preset_fits_80gb_gpus_on_eight_nodes():
    fits = plan(load_config("paragru-7b"), nodes=8, gpus_per_node=8)  # probes 7B blocks: one preset
    assert fits and fits[0].total <= 0.9 * 80 * GiB and fits[0].layout == Layout(dp_shard=64)


@pytest.mark.parametrize("name", ["paragru-7b", "paralstm-7b", "m2rnn-moe-7b"])
def test_7b_presets_do_not_fit_one_gpu(name):
    assert not plan(load_config(name), nodes=1, gpus_per_node=1)  # 16 bytes × 7B > 80 GB


def test_plan_cli_explains_the_accounting_and_recommends(capsys):
    # tiny-gru: its probes take a second each, tiny-moe's M²RNN and expert blocks several
    assert main(["plan", "tiny-gru", "--nodes", "1", "--gpus-per-node", "8", "--gpu-gib", "1"]) == 0
    out = capsys.readouterr().out
    assert "AdamW's two moments" in out and "recommended: parallel.pp=" in out and "GiB per GPU" in out
    assert "unroll rehearse tiny-gru --nodes 1 --gpus-per-node 8" in out
    assert main(["plan", "paragru-7b", "--nodes", "1", "--gpus-per-node", "1"]) == 1
    assert "no layout on 1 GPUs fits" in capsys.readouterr().out


# --- the plan against rehearsals of the same rank -----------------------------------------------------------
TOLERANCE = 0.15
CASES = [  # preset, GPUs per node (one node), overrides
    ("tiny-gru", 8, []),
    ("tiny-gru", 8, ["train.activation_checkpoint=full", "train.micro_batch_size=2"]),
    ("tiny-lstm", 8, ["parallel.tp=2"]),
    ("tiny-m2rnn", 8, ["parallel.cp=2"]),
    ("tiny-moe", 8, ["parallel.ep=4", "train.activation_checkpoint=full"]),
    ("tiny-transformer", 8, ["parallel.pp=2", "train.micro_batch_size=2"]),
    ("tiny-tnt", 8, []),
]


def _compare(preset, nodes, gpus, overrides) -> dict:
    from unroll.train.planning.plan import estimate_for
    from unroll.train.planning.rehearse import rehearse

    r = rehearse(preset, overrides, nodes=nodes, gpus_per_node=gpus)
    planned = estimate_for(r).components
    return {k: (getattr(r.at_target, k), getattr(planned, k)) for k in r.at_target.as_dict()}


def _assert_agree(ratios: dict, case) -> None:
    for key, (measured, planned) in ratios.items():
        if measured == 0:
            assert planned == 0, (case, key)
        else:
            assert abs(planned / measured - 1) <= TOLERANCE, (case, key, measured, planned)


@pytest.mark.slow
@pytest.mark.parametrize("preset,gpus,overrides", CASES, ids=[f"{p}-{'-'.join(o) or 'fsdp'}" for p, _, o in CASES])
def test_plan_agrees_with_the_rehearsal_of_the_same_rank(preset, gpus, overrides):
    """Every component within 15% of what the rank's real program holds, at the preset's own length."""
    _assert_agree(_compare(preset, 1, gpus, overrides), (preset, overrides))


@pytest.mark.slow
def test_fp32_weights_under_autocast_add_bytes_per_block_not_per_token(tmp_path):
    """DDP (fp32 weights, bf16 autocast): autocast's bf16 copy of each block's weights does not grow with the
    tokens. Rehearsed at 1024 tokens, the plan at 1024 (its probes stop at 256 tokens and fit the fixed part)
    and the rehearsal read at the config's 128 (the fixed part kept whole) both agree with what was held."""
    from unroll.train.planning.plan import estimate_for
    from unroll.train.planning.rehearse import rehearse

    preset = yaml.safe_load((Path(__file__).parents[1] / "configs" / "tiny-gru.yaml").read_text())
    preset["model"]["d_model"] = 512  # weights large beside a block's per-token bytes
    preset["parallel"] = {"dp_replicate": 8, "dp_shard": 1}
    preset["train"]["micro_batch_size"] = 1
    config = tmp_path / "ddp.yaml"
    config.write_text(yaml.safe_dump(preset))
    r = rehearse(str(config), ["data.seq_len=1024"], nodes=1, gpus_per_node=8)
    at_1024 = estimate(r.config, r.layout, seq_len=1024).components
    _assert_agree({k: (getattr(r.measured, k), getattr(at_1024, k)) for k in r.measured.as_dict()}, "at 1024")
    at_128 = estimate_for(r).components
    _assert_agree({k: (getattr(r.at_target, k), getattr(at_128, k)) for k in r.at_target.as_dict()}, "at 128")


@pytest.mark.slow
def test_plan_agrees_with_the_rehearsal_of_the_400m_hybrid_on_64_ranks(tmp_path):
    """The 400M hybrid (M²RNN + attention, vocabulary 100352) on 8 nodes × 8 GPUs, at a sequence of 64 (its
    preset's 4096 is `unroll rehearse`'s to extrapolate; the plan and this test read the same length)."""
    preset = yaml.safe_load((Path(__file__).parents[1] / "configs" / "m2rnn-hybrid-400m.yaml").read_text())
    preset["data"]["seq_len"] = 64
    preset["train"]["micro_batch_size"] = 4  # batch 256 over 64 ranks
    config = tmp_path / "hybrid-400m-64.yaml"
    config.write_text(yaml.safe_dump(preset))
    _assert_agree(_compare(str(config), 8, 8, []), "m2rnn-hybrid-400m")
