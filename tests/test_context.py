"""Context parallelism of every mixer (kernels/context.py, kernels/seqpar_newton.py): the sequence split
over 2 and 3 gloo ranks gives the single-process logits and gradients in float64. ParaGRU/ParaLSTM by
sequence-parallel Newton and by the state hand-off, M²RNN by the hand-off and by Newton (its convolution
reaching across the split), attention with RoPE, GQA, NoPE and a window, a hybrid with MoE MLPs, and TNT (its global memory handed on)."""

import sys
from pathlib import Path

import pytest
from conftest import run_workers

sys.path.insert(0, str(Path(__file__).parent))
from context_worker import CASES, DOCUMENT_CASES  # noqa: E402

WORKER = Path(__file__).with_name("context_worker.py")


@pytest.fixture(scope="module", params=[2, 3], ids=lambda n: f"{n}ranks")
def ranks(request, tmp_path_factory) -> list[dict]:
    world = request.param
    return run_workers(WORKER, world, tmp_path_factory.mktemp(f"context{world}"), timeout=200)


@pytest.mark.parametrize("case", list(CASES) + [f"{c}_documents" for c in DOCUMENT_CASES])
def test_split_sequence_equals_one_process(ranks, case):
    """`_documents`: packed documents (resets), one starting exactly on a rank boundary, one just after it,
    one spanning the ranks."""
    for r, res in enumerate(ranks):
        assert res[case]["logits"] < 1e-10, (r, res[case])
        assert res[case]["grads"] < 1e-9, (r, res[case])
    # which sequence-parallel Newton solves ran: compiled exactly where the model asks for it
    expected = {"gru_newton": [False, False], "lstm_newton": [False], "lstm_newton_compiled": [True]}
    if case in expected:
        assert all(res[case]["compiled"] == expected[case] for res in ranks), [res[case] for res in ranks]


def test_the_hook_reaches_every_sequence_aware_part():
    """apply_context_parallel gives the group to every mixer kind and every MoE through set_context_group,
    without_context_parallel lifts it and puts it back, and a mixer without the hook is refused."""
    import torch

    from unroll.models import LM, ModelConfig
    from unroll.models.config import M2RNNConfig, MoEConfig, TNTConfig
    from unroll.models.context_parallel import ContextParallel
    from unroll.models.moe import MoE
    from unroll.train.parallel.parallelize import apply_context_parallel, without_context_parallel

    cfg = ModelConfig(
        pattern="GLMTA",
        mlp_pattern="DEDED",
        vocab_size=40,
        d_model=16,
        n_heads=2,
        m2rnn=M2RNNConfig(k_dim=4, v_dim=4, v_heads=4, qk_heads=2),
        moe=MoEConfig(experts=4, top_k=2, hidden=8),
        tnt=TNTConfig(heads=2, global_chunk=3, local_chunks=[2, 3], local_reset=6),
    )
    model = LM(cfg, seed=0)
    group = object()  # the hook only hands the group on; no collective runs here
    parts = [b.mixer for b in model.blocks] + [b.mlp for b in model.blocks if isinstance(b.mlp, MoE)]
    assert len(parts) == 7 and all(isinstance(p, ContextParallel) for p in parts)
    apply_context_parallel(model, group)
    assert all(p.context_group is group for p in parts)
    with without_context_parallel(model):
        assert all(p.context_group is None for p in parts)
    assert all(p.context_group is group for p in parts)
    model.blocks[0].mixer = torch.nn.Identity()
    with pytest.raises(TypeError, match="does not support context parallelism"):
        apply_context_parallel(model, group)
