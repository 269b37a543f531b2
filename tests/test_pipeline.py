"""Pipeline parallelism (train/parallel/pipeline*.py): stage splits from `|` marks or balanced by parameter count, stage
modules that chain to the single-device model, and every schedule (GPipe, 1F1B, Interleaved1F1B, LoopedBFS,
InterleavedZeroBubble, ZBVZeroBubble, DualPipeV) on 2 gloo ranks giving the single-process loss (mean over
the microbatches) and gradients in float64, tied and untied embeddings."""

import sys
from pathlib import Path

import pytest
import torch
from conftest import run_workers

from unroll.models import LM, ModelConfig
from unroll.train.parallel.pipeline import Pipeline
from unroll.train.parallel.pipeline_split import (
    SCHEDULES,
    balance,
    layer_costs,
    schedule_spec,
    stage_layers,
    stage_ranks,
)
from unroll.train.parallel.pipeline_stages import build_stage_module

sys.path.insert(0, str(Path(__file__).parent))
from pp_worker import CASES  # noqa: E402

WORKER = Path(__file__).with_name("pp_worker.py")


def tiny(pattern: str, **kw) -> ModelConfig:
    return ModelConfig(**{"pattern": pattern, "vocab_size": 40, "d_model": 16, "n_heads": 2, **kw})


# --- stage splits -------------------------------------------------------------------------------------------


def test_marks_are_respected():
    assert stage_layers(tiny("GA|LG"), 2) == [[0, 1], [2, 3]]
    assert stage_layers(tiny("G|AL|G"), 3) == [[0], [1, 2], [3]]
    assert stage_layers(tiny("GA|LG|GA|LG"), 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(tiny("GAL"), 1) == [[0, 1, 2]]


def test_marks_that_disagree_with_the_stage_count():
    with pytest.raises(ValueError, match=r"1 stage mark.*2 stages.*needs 4"):
        stage_layers(tiny("GA|LG"), 4)
    with pytest.raises(ValueError, match=r"stage\(s\) \[1\] have no layers"):
        stage_layers(tiny("GA||LG"), 3)
    with pytest.raises(ValueError, match=r"stage\(s\) \[0\] have no layers"):
        stage_layers(tiny("|GALG"), 2)


def test_more_stages_than_layers():
    with pytest.raises(ValueError, match="3 pipeline stages for 2 layers"):
        stage_layers(tiny("GA"), 3)
    with pytest.raises(ValueError, match="must be positive"):
        stage_layers(tiny("GA"), 0)


def test_automatic_split_is_contiguous_and_balanced():
    cfg = tiny("GGGGGGGG", vocab_size=8)  # equal blocks, a negligible embedding and head
    assert stage_layers(cfg, 2) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert stage_layers(cfg, 4) == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert stage_layers(cfg, 8) == [[i] for i in range(8)]
    split = stage_layers(cfg, 3)
    assert sorted(len(s) for s in split) == [2, 3, 3] and sum(split, []) == list(range(8))


def test_automatic_split_counts_embedding_and_head():
    # a large vocabulary: the first and the last stage carry its matrices, so they get fewer blocks
    cfg = tiny("GGGGGGGGGG", vocab_size=2000)
    blocks, embed, head = layer_costs(cfg)
    assert embed > blocks[0] and head > blocks[0]
    split = stage_layers(cfg, 3)
    assert sum(split, []) == list(range(10))
    assert len(split[1]) > len(split[0]) and len(split[1]) > len(split[2])


def test_layer_costs_match_the_real_model():
    cfg = tiny("GAML", mlp_pattern="DEDE")
    model = LM(cfg)
    blocks, _, _ = layer_costs(cfg)
    assert blocks == [sum(p.numel() for p in b.parameters()) for b in model.blocks]


def test_balance_minimizes_the_largest_stage():
    assert balance([1, 1, 1, 10], 2) == [[0, 1, 2], [3]]
    assert balance([10, 1, 1, 1], 2) == [[0], [1, 2, 3]]
    assert balance([1, 1, 1, 1], 2, first=3) == [[0], [1, 2, 3]]
    assert balance([1, 1, 1, 1], 2, last=3) == [[0, 1, 2], [3]]
    assert balance([5, 5, 5], 3) == [[0], [1], [2]]


# --- placement and names ------------------------------------------------------------------------------------


def test_stage_placement():
    assert stage_ranks(2, 2, "loop") == [0, 1]
    assert stage_ranks(4, 2, "loop") == [0, 1, 0, 1]
    assert stage_ranks(4, 2, "v") == [0, 1, 1, 0]
    assert stage_ranks(8, 4, "v") == [0, 1, 2, 3, 3, 2, 1, 0]


def test_schedule_names():
    assert schedule_spec("gpipe")[0] == "GPipe"
    assert schedule_spec("interleaved1f1b")[2] == 2
    assert schedule_spec("ZBVZeroBubble")[3] == "v"
    with pytest.raises(ValueError, match="unknown pipeline schedule 'pipedream'; choices: GPipe, 1F1B"):
        schedule_spec("pipedream")
    with pytest.raises(ValueError, match="choices: " + ", ".join(SCHEDULES)):
        Pipeline(LM(tiny("GA|LG")), None, "nope")  # checked before any process group is used


# --- stage modules in one process ---------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [True, False])
def test_stage_modules_chain_to_the_model(tied):
    torch.manual_seed(0)
    model = LM(tiny("GA|LG|A", tie_embeddings=tied)).double()
    tokens = torch.randint(0, 40, (2, 5))
    split = stage_layers(model.cfg, 3)
    mods = [build_stage_module(model, layers, s == 0, s == 2) for s, layers in enumerate(split)]
    x = tokens
    for m in mods:
        x = m(x)
    torch.testing.assert_close(x, model(tokens), rtol=0, atol=1e-12)
    # with targets the last stage returns the loss, shape [1] (the schedules merge outputs along dim 0)
    targets = torch.randint(0, 40, (2, 5))
    x = tokens
    for m in mods[:-1]:
        x = m(x, targets=targets)  # ignored before the last stage
    loss = mods[-1](x, targets=targets)
    assert loss.shape == (1,)
    torch.testing.assert_close(loss[0], model(tokens, targets=targets), rtol=0, atol=1e-12)
    # the model's own blocks under their LM names
    assert mods[1].blocks["2"] is model.blocks[2]
    names = {n for m in mods for n, _ in m.named_parameters()}
    expected = {n for n, _ in model.named_parameters()} | ({"tied_embed_weight"} if tied else set())
    assert names == expected
    if tied:
        assert mods[2].tied_weight() is mods[2].tied_embed_weight
        assert mods[0].tied_weight() is model.embed.weight and mods[1].tied_weight() is None
        assert mods[2].tied_embed_weight is not model.embed.weight
    else:
        assert all(m.tied_weight() is None for m in mods)
    one = build_stage_module(model, list(range(5)), True, True)  # a single stage uses the tie itself
    assert one.tied_embed_weight is None and one.tied_weight() is None
    torch.testing.assert_close(one(tokens), model(tokens), rtol=0, atol=0)


# --- every schedule on 2 ranks ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_workers(WORKER, 2, tmp_path_factory.mktemp("pipeline"), timeout=180)


@pytest.mark.parametrize("case", list(CASES))
def test_pipeline_equals_one_process(ranks, case):
    losses = [res[case]["loss"] for res in ranks if res[case]["loss"] is not None]
    assert len(losses) == 1, [res[case]["loss"] for res in ranks]  # exactly one rank has the last stage
    assert losses[0] < 1e-10, losses
    for r, res in enumerate(ranks):
        assert res[case]["grads"] < 1e-10, (r, res[case]["grads"], res[case]["worst"])
    assert all(res[case]["copy"] == 0.0 for res in ranks), [res[case]["copy"] for res in ranks]
    held = set().union(*(res[case]["names"] for res in ranks))
    assert held == set(ranks[0][case]["all_names"])  # every parameter is on some rank
    # each block's parameters on exactly one rank; the (tied) embedding may be on two
    for name in held - {"embed.weight"}:
        assert sum(name in res[case]["names"] for res in ranks) == 1, name
