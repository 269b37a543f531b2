"""Tensor parallelism (train/parallel/tensor_parallel/) on 2 gloo ranks against the single-device model.

One torchrun launch (tests/tp_worker.py) runs every check and writes one JSON per rank; the tests below
read them. Cases: ParaGRU / ParaLSTM (rnn_heads 1, 2 = tp, 4; Newton and sequential), M²RNN (q/k heads 1:
replicated, 2: split; sequential and Newton), attention (with and without GQA), dense and MoE MLPs (with a
shared expert and balancing losses), tied and untied head, each with and without sequence parallelism:
float64 logits and every parameter's gradient (through the model's own chunked, vocabulary-parallel loss and
through its gathered logits), float32 losses over 3 AdamW steps; the vocabulary-parallel loss kernel alone.
Also the placements as applied, DCP checkpoints (model and optimizer) between the TP and the single-device
layout, and refusals."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from conftest import run_workers
from torch.distributed.tensor import Replicate, Shard
from torch.distributed.tensor.placement_types import _StridedShard
from tp_worker import CASES, DOCUMENT_CASES

from unroll.train.parallel.tensor_parallel.layout import Fused
from unroll.train.parallel.tensor_parallel.placement import fsdp_shard_placement

WORKER = Path(__file__).with_name("tp_worker.py")
RUNS = [f"{case}/{sp}" for case in CASES for sp in ("sp", "nosp")]
# packed documents (resets) through the sharded mixers, against the single-device model with the same resets
DOCUMENT_RUNS = [f"{case}/{sp}-documents" for case in DOCUMENT_CASES for sp in ("sp", "nosp")]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_workers(WORKER, 2, tmp_path_factory.mktemp("tp"), timeout=240)


def result(ranks: list[dict], name: str) -> list[dict]:
    for r, res in enumerate(ranks):
        assert "error" not in res[name], f"rank {r}, {name}:\n{res[name]['error']}"
    return [res[name] for res in ranks]


@pytest.mark.parametrize("run", RUNS + DOCUMENT_RUNS)
def test_logits_and_every_gradient_equal_the_single_device_model_float64(ranks, run):
    for res in result(ranks, f"f64/{run}"):
        assert res["all_dtensor"] and not res["missing_grads"], res
        assert res["logits"] <= 1e-10 and res["loss"] <= 1e-10, res
        assert res["grad"] <= 1e-10, res  # max over parameters of |grad.full_tensor() − single-device grad|
        assert res["logits_loss"] <= 1e-10 and res["logits_grad"] <= 1e-10, res  # through the gathered logits


def test_vocabulary_parallel_loss_equals_the_plain_loss_float64(ranks):
    for res in result(ranks, "vocab_parallel_loss"):
        assert len(res) == 7 and max(res.values()) <= 1e-12, res


@pytest.mark.parametrize("run", RUNS)
def test_adamw_steps_give_the_single_device_losses_float32(ranks, run):
    for res in result(ranks, f"f32/{run}"):
        assert res["tp"] == pytest.approx(res["ref"], rel=1e-5, abs=1e-6), res


def test_the_plan_as_applied(ranks):
    placements = result(ranks, "placements")[0]
    expected = {
        "embed.weight": "S(0)",
        "head.weight": "S(0)",  # vocabulary rows (the head: an untied model's)
        "norm.weight": "R",
        "blocks.0.mixer_norm.weight": "R",
        "blocks.0.mixer.in_proj.weight": "S(2)",
        "blocks.0.mixer.in_proj.bias": "S(1)",  # ParaGRU, heads 1
        "blocks.0.mixer.a": "S(1)",
        "blocks.0.mixer.out_proj.weight": "S(1)",
        "blocks.0.mlp.gate_up.weight": "_S(0, 2)",
        "blocks.0.mlp.down.weight": "S(1)",  # [gate | up] strided
        "blocks.1.mixer.in_proj.weight": "R",
        "blocks.1.mixer.conv.weight": "R",  # M²RNN q/k replicated: whole
        "blocks.1.mixer.W": "S(0)",
        "blocks.1.mixer.D": "S(0)",
        "blocks.1.mixer.A_log": "S(0)",
        "blocks.1.mixer.norm.weight": "S(0)",
        "blocks.1.mixer.out_proj.weight": "S(1)",
        "blocks.1.mlp.router.weight": "R",
        "blocks.1.mlp.w_gate_up": "_S(2, 2)",
        "blocks.1.mlp.w_down": "S(1)",
        "blocks.1.mlp.shared.gate_up.weight": "_S(0, 2)",
        "blocks.2.mixer.qkv.weight": "_S(0, 3)",
        "blocks.2.mixer.out_proj.weight": "S(1)",  # [q | k | v] strided
    }
    assert {k: placements[k] for k in expected} == expected


def test_checkpoints_keep_the_single_device_layout(ranks):
    for res in result(ranks, "dcp"):
        assert res["tp_to_single_params"] <= 1e-12 and res["tp_to_single_optim"] <= 1e-12, res
        assert res["single_to_tp_params"] == 0 and res["single_to_tp_optim"] == 0, res
        assert res["logits_after_load"] <= 1e-12, res


def test_what_is_refused(ranks):
    res = result(ranks, "errors")[0]
    assert res["m2rnn_qk3"] == "M2RNN: qk_heads=3 and tp=2: one must divide the other"
    assert res["gqa_kv1"] == "Attention: tp=2 must divide n_heads=4 and the kv heads 1"
    assert res["rnn_heads3"] == "ParaGRU: tp=2 must divide rnn_heads=3 (or rnn_heads=1)"
    assert res["mlp_width33"] == "SwiGLU: tp=2 must divide the MLP width 33"
    assert res["vocab63"] == "Embedding and LM head: tp=2 must divide the vocabulary size 63"
    assert "not supported" in res["step"]
    assert res["odd_length"] == "sequence parallelism: tp=2 must divide the sequence length 7"


def test_fused_segments_select_each_ranks_rows():
    rows = torch.arange(24)
    # M²RNN-like: q, k of one head (replicated), then v, a split over 4 ranks
    fused = Fused(0, ((4, 1), (4, 1), (8, 4), (8, 4)))
    assert fused.placement(4) == Replicate()
    assert fused.select(rows, 4, 2).tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 20, 21]
    # two q/k heads on 4 ranks: ranks 0, 1 use head 0, ranks 2, 3 head 1
    assert Fused(0, ((8, 2), (16, 4))).select(rows, 4, 3).tolist() == [4, 5, 6, 7, 20, 21, 22, 23]
    # equal segments, all split: a strided shard, whose local rows are the same selection
    gate_up = Fused(0, ((12, 2), (12, 2)))
    assert str(gate_up.placement(2)) == "_S(0, 2)"
    assert gate_up.select(rows, 2, 1).tolist() == list(range(6, 12)) + list(range(18, 24))
    assert Fused(1, ((6, 2),)).placement(2) == Shard(1)


def test_fsdp_shards_a_strided_weight_on_another_dimension():
    def param(shape, *placements):
        return SimpleNamespace(shape=torch.Size(shape), ndim=len(shape), placements=placements)

    place = fsdp_shard_placement(4)
    assert place(param((64, 16), _StridedShard(0, split_factor=2))) == Shard(1)  # gate_up [2h, d]
    assert place(param((8, 16, 64), _StridedShard(2, split_factor=2))) == Shard(0)  # MoE w_gate_up
    assert place(param((48, 1, 4), _StridedShard(0, split_factor=3))) == Shard(2)  # M²RNN conv
    assert place(param((48, 1, 2), _StridedShard(0, split_factor=3))) == Shard(2)  # halves beat one rank holding all
    assert place(param((16, 64), Shard(1))) == Shard(0) and place(param((16,), Replicate())) == Shard(0)
    assert place(param((1, 3, 8, 16), Replicate())) == Shard(2)  # a ParaRNN input projection with one head
    assert place(param((6, 16), Replicate())) == Shard(1)  # 2 of 6 rows on the largest rank, 4 of 16 columns
