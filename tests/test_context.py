"""Context parallelism of every mixer (kernels/context.py, kernels/seqpar_newton.py): the sequence split
over 2 and 3 gloo ranks gives the single-process logits and gradients in float64. ParaGRU/ParaLSTM by
sequence-parallel Newton and by the state hand-off, M²RNN by the hand-off and by Newton (its convolution
reaching across the split), attention with RoPE, GQA, NoPE and a window, a hybrid with MoE MLPs, and TNT (its global memory handed on)."""

import sys
from pathlib import Path

import pytest
from conftest import run_workers

sys.path.insert(0, str(Path(__file__).parent))
from context_worker import CASES  # noqa: E402

WORKER = Path(__file__).with_name("context_worker.py")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    return run_workers(WORKER, world, tmp_path_factory.mktemp(f"context{world}"), timeout=200)


@pytest.mark.parametrize("case", list(CASES))
def test_split_sequence_equals_one_process(ranks, case):
    for r, res in enumerate(ranks):
        assert res[case]["logits"] < 1e-10, (r, res[case])
        assert res[case]["grads"] < 1e-9, (r, res[case])
