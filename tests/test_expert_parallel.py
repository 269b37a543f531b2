"""Expert parallelism (train/parallel/expert_parallel.py) on 2 and 4 gloo ranks against the single-device MoE on the
concatenation of every rank's tokens, float64 (one float32 torch._grouped_mm case): outputs, input
gradients, the experts' complete gradients, replicated gradients summed over the ranks, load counts;
softmax and sigmoid routers, with and without shared experts, a nonzero expert bias, ranks with
different numbers of tokens (and one with none), routers skewed so every assignment goes to one rank,
and a two-layer LM through apply_expert_parallel_to_model."""

import sys
from pathlib import Path

import pytest
from conftest import run_workers

sys.path.insert(0, str(Path(__file__).parent))
from ep_worker import CASES  # noqa: E402

WORKER = Path(__file__).with_name("ep_worker.py")


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"{n}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    return run_workers(WORKER, world, tmp_path_factory.mktemp(f"ep{world}"), timeout=150)


@pytest.mark.parametrize("case", list(CASES))
def test_expert_parallel_equals_one_process(ranks, case):
    for r, res in enumerate(ranks):
        c = res[case]
        for key in ("out", "x_grad", "experts", "replicated", "load"):
            assert c[key] < c["tol"], (r, key, c)


def test_balanced_cases_exercise_every_rank(ranks):
    """Not vacuous: with an unskewed router every rank's experts receive tokens and get gradients."""
    for case in ("softmax", "softmax_shared", "sigmoid", "sigmoid_shared", "batch_3d", "float32_grouped"):
        for r, res in enumerate(ranks):
            assert res[case]["received"] > 0 and res[case]["expert_grad_norm"] > 0, (case, r, res[case])


def test_skewed_router_sends_everything_to_one_rank(ranks):
    world = len(ranks)
    total = sum(res["skew_all_to_rank0"]["received"] for res in ranks)
    assert total == 2 * sum(5 + 3 * r for r in range(world))  # top-2 of every token
    for r, res in enumerate(ranks):
        first, last = res["skew_all_to_rank0"], res["skew_top1_last"]
        assert first["received"] == (total if r == 0 else 0), (r, first)
        assert (first["expert_grad_norm"] > 0) == (r == 0), (r, first)
        assert last["received"] == (sum(5 + 3 * q for q in range(world)) if r == world - 1 else 0), (r, last)


def test_lm_helper(ranks):
    for r, res in enumerate(ranks):
        c = res["lm"]
        assert c["converted"] == 2
        assert c["expert_names"] == [f"blocks.{i}.mlp.{n}" for i in (0, 1) for n in ("w_down", "w_gate_up")]
        for key in ("out", "experts", "replicated"):
            assert c[key] < c["tol"], (r, key, c)
        assert c["scaled"] == 0.0


def test_rejects_bad_sizes(ranks):
    for res in ranks:
        assert "not divisible" in res["errors"]["indivisible"]
        assert "already expert-parallel" in res["errors"]["twice"]


def test_apply_composes_the_moe_in_place():
    """apply_expert_parallel keeps the module (same object and class, the same state-dict keys) and gives
    it an expert exchange; the rank keeps its block of experts; a second application is refused."""
    import torch

    from unroll.models.moe import MoE
    from unroll.train.parallel.expert_parallel import ExpertParallel, apply_expert_parallel, expert_parameters
    from unroll.train.planning.fake_comm import fake_process_group

    with fake_process_group(1, 2) as group:
        torch.manual_seed(0)
        moe = MoE(8, n_experts=4, top_k=2, hidden=6, shared_experts=1, shared_hidden=4)
        keys, w_down = list(moe.state_dict()), moe.w_down.detach().clone()
        apply_expert_parallel(moe, group)
        assert type(moe) is MoE and list(moe.state_dict()) == keys
        assert moe.expert_exchange == ExpertParallel(group, rank=1, size=2, n_local=2, offset=2)
        assert torch.equal(moe.w_down, w_down[2:])
        assert [name for name, _ in expert_parameters(moe)] == ["w_gate_up", "w_down"]
        with pytest.raises(ValueError, match="already expert-parallel"):
            apply_expert_parallel(moe, group)
