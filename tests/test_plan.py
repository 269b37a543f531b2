"""`unroll plan`: the per-GPU memory arithmetic and the layouts it recommends for the 7B presets."""
import pytest

from unroll.launch.cli import main
from unroll.models.summary import summarize
from unroll.train.config import load_config
from unroll.train.plan import GiB, estimate, plan


def test_fsdp_shares_parameters_over_all_ranks_and_adam_costs_16_bytes_each():
    cfg = load_config("paragru-7b").model
    total = summarize(cfg)["params_total"]
    e = estimate(cfg, {"pp": 1, "dp_replicate": 1, "dp_shard": 64, "cp": 1, "tp": 1, "ep": 1},
                 seq_len=4096, micro_batch=1, checkpointing=True)
    assert e.params_gpu == pytest.approx(total / 64)
    assert e.weights + e.grads + e.optimizer == pytest.approx(16 * total / 64)
    # tensor parallel 4 × FSDP 16 holds the same share; pipeline halves it again
    tp = estimate(cfg, {"pp": 2, "dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 4, "ep": 1},
                  seq_len=4096, micro_batch=1, checkpointing=True)
    assert tp.params_gpu == pytest.approx(total / 64)


def test_tensor_parallel_layouts_need_tp_to_divide_the_vocabulary():
    from unroll.train.plan import candidate_layouts

    cfg = load_config("paragru-7b").model
    assert {lay["tp"] for lay in candidate_layouts(cfg, 8, 8)} > {1}
    cfg.vocab_size += 1  # odd: only tp = 1
    assert {lay["tp"] for lay in candidate_layouts(cfg, 8, 8)} == {1}


def test_experts_are_split_by_expert_parallelism():
    cfg = load_config("m2rnn-moe-7b").model
    base = {"pp": 1, "dp_replicate": 1, "dp_shard": 8, "cp": 1, "tp": 1}
    one, eight = (estimate(cfg, base | {"ep": ep}, seq_len=4096, micro_batch=1, checkpointing=True) for ep in (1, 8))
    experts = 40 * 128 * 3 * 1536 * 256
    assert one.params_gpu - eight.params_gpu == pytest.approx((experts / 8 - experts / 64))


@pytest.mark.parametrize("name", ["paragru-7b", "paralstm-7b", "m2rnn-moe-7b"])
def test_7b_presets_fit_80gb_h100s_on_one_and_eight_nodes(name):
    cfg = load_config(name).model
    for nodes in (1, 8):
        fits = plan(cfg, nodes=nodes, gpus_per_node=8, seq_len=4096, micro_batch=1)
        assert fits and fits[0].total <= 0.9 * 80 * GiB
    assert not plan(cfg, nodes=1, gpus_per_node=1, seq_len=4096, micro_batch=1)  # 16 bytes × 7B > 80 GB


def test_plan_cli_explains_the_formula_and_recommends(capsys):
    assert main(["plan", "m2rnn-moe-7b", "--nodes", "2", "--gpus-per-node", "8"]) == 0
    out = capsys.readouterr().out
    assert "8 · P_gpu     AdamW" in out and "recommended: parallel.pp=" in out and "GiB per GPU" in out
    assert main(["plan", "paragru-7b", "--nodes", "1", "--gpus-per-node", "1"]) == 1
    assert "no layout on 1 GPUs fits" in capsys.readouterr().out
