"""`unroll rehearse`: one rank of a multi-rank job run on this CPU in a fake world, against the same program on
real gloo ranks; what it reports, and what it caught (activation checkpointing with MoE balancing losses,
gradient accumulation under FSDP)."""

import json
import os

import pytest
from conftest import _torchrun

from unroll.launch.cli import main
from unroll.models import LM
from unroll.train.planning.rehearse import rehearse


def test_cli_reports_memory_collectives_and_the_checkpoint_as_json(tmp_path, capsys):
    assert (
        main(
            [
                "rehearse",
                "tiny-moe",
                "--nodes",
                "1",
                "--gpus-per-node",
                "8",
                "--json",
                "parallel.ep=4",
                "data.seq_len=64",
            ]
        )
        == 0
    )
    r = json.loads(capsys.readouterr().out)
    assert r["world"] == 8 and r["layout"]["ep"] == 4 and r["layout"]["dp_shard"] == 8
    assert all(0 < x < 20 for x in r["losses"])  # ln 2048 ≈ 7.6 at the start
    m = r["measured"]
    assert all(m[k] > 0 for k in ("weights", "gradients", "optimizer", "gathered", "activations", "logits"))
    assert m["gradients"] == m["weights"] - 4 * 8 * 4  # the MoE bias buffers (4 layers × 8 experts) hold no gradient
    kinds = {(t["kind"], t["group_size"]) for t in r["traffic"]}
    assert {("all_gather", 8), ("reduce_scatter", 8), ("all_to_all", 4)} <= kinds
    # this rank's checkpoint: its parameters and optimizer state, with DCP's framing
    assert 1.0 < r["checkpoint_bytes"] / (m["weights"] + m["optimizer"]) < 1.1
    # only the combine step of expert parallelism cannot be known in a symmetric world
    assert set(r["unknown"]) <= {"all_to_all split size"}
    assert r["at_target"]["activations"] == pytest.approx(2 * m["activations"])  # rehearsed 64 of 128 tokens


def test_cli_text_report_and_bad_layouts_named_by_key(capsys):
    assert main(["rehearse", "tiny-gru", "--nodes", "1", "--gpus-per-node", "4", "data.seq_len=32"]) == 0
    out = capsys.readouterr().out
    for line in (
        "memory per GPU",
        "gathered",
        "logits",
        "collectives of one step",
        "checkpoint:",
        "not shown by a rehearsal",
    ):
        assert line in out
    assert main(["rehearse", "tiny-moe", "--nodes", "1", "--gpus-per-node", "4", "parallel.ep=3"]) == 2
    assert "parallel.ep=3 must divide" in capsys.readouterr().err
    assert main(["rehearse", "tiny-tnt", "--nodes", "1", "--gpus-per-node", "4", "parallel.tp=2"]) == 2
    assert "parallel.tp=2 with TNT layers" in capsys.readouterr().err
    assert main(["rehearse", "tiny-gru", "--nodes", "1", "--gpus-per-node", "4", "--rank", "4"]) == 2
    assert "--rank 4" in capsys.readouterr().err


def test_activation_checkpointing_keeps_moe_activations_down():
    """The balancing losses' gradients reach each layer when the backward does, and a recomputed forward
    leaves nothing on the module: with every block recomputed a MoE model holds about half of what it holds
    without (54% measured; 90% with the recomputed graphs kept on the modules)."""
    base = ["data.seq_len=64"]
    plain = rehearse("tiny-moe", base, nodes=1, gpus_per_node=8).measured.activations
    recomputed = rehearse("tiny-moe", base + ["train.activation_checkpoint=full"], nodes=1, gpus_per_node=8)
    assert recomputed.measured.activations < 0.7 * plain


def test_checkpointed_blocks_keep_their_inputs_until_their_backward():
    """With every block recomputed, each deeper layer adds exactly its input (bf16, FSDP's parameter dtype)
    to what the step holds, none of it counted as FSDP's (its hooks view the blocks' outputs; 16 layers held
    what 2 did while they were)."""
    base = ["train.activation_checkpoint=full", "train.micro_batch_size=2"]
    two, sixteen = (
        rehearse("tiny-gru", base + [f"model.pattern={'G' * n}"], nodes=1, gpus_per_node=8) for n in (2, 16)
    )
    residual = two.config.model.d_model * 2  # bytes per token of a block's bf16 input
    assert (sixteen.measured.activations - two.measured.activations) / two.tokens == 14 * residual
    assert sixteen.measured.gathered == pytest.approx(two.measured.gathered, rel=0.2)


def test_fsdp_gradient_accumulation_keeps_gradients_sharded():
    """A second micro-batch adds nothing gathered: FSDP reduce-scatters each micro-batch's gradients
    instead of keeping every block's unsharded gradient until the last (as skipping the sync would)."""
    base = ["data.seq_len=32", "train.micro_batch_size=2"]  # 4 sequences per rank: 2 micro-batches
    one, two = (rehearse("tiny-gru", base, nodes=1, gpus_per_node=8, microbatches=n).measured for n in (1, 2))
    assert two.gathered == one.gathered and two.gradients == one.gradients


@pytest.mark.slow
def test_the_fake_world_measures_what_two_real_gloo_ranks_hold(tmp_path):
    """The same rehearsal under torchrun on 2 real gloo ranks (real collectives, real peers) and in the fake
    world: the same bytes held per component and sent per collective."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    args = ["tiny-gru", "--nodes", "1", "--gpus-per-node", "2", "--json", "data.seq_len=64", "train.micro_batch_size=4"]
    proc = _torchrun(
        ["-m", "unroll.launch.cli", "rehearse", *args, "--out", str(tmp_path / "rank{rank}.json")], 2, env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    real = json.loads((tmp_path / "rank0.json").read_text())
    fake = rehearse("tiny-gru", ["data.seq_len=64", "train.micro_batch_size=4"], nodes=1, gpus_per_node=2)
    for key in ("weights", "gradients", "optimizer", "logits"):
        assert real["measured"][key] == getattr(fake.measured, key), key
    assert real["measured"]["activations"] == pytest.approx(fake.measured.activations, rel=0.1)
    # real collectives are asynchronous: FSDP at times has one more block's all-gather in flight (a block
    # of tiny-gru in bf16 is 0.9 MB; measured 7.3-8.2 MB real, 6.4 MB fake)
    block = sum(p.numel() for p in LM(fake.config.model, seed=0).blocks[0].parameters()) * 2
    assert 0 <= real["measured"]["gathered"] - fake.measured.gathered <= 2.1 * block
    # not the same loss: the fake world's all-gathers tile this rank's shard, so the weights it computes
    # with are not the model's (the shapes, and so the bytes, are)
    real_traffic = {(t["kind"], t["group_size"]): t["bytes"] for t in real["traffic"] if t["kind"] != "barrier"}
    fake_traffic = {(k.kind, k.group_size): b for k, (_, b) in fake.traffic.items() if k.kind != "barrier"}
    assert real_traffic == fake_traffic
