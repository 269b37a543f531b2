"""Packed documents: for every mixer, a packed row with resets gives, document by document, the outputs and
gradients of each document run alone from a fresh state (float64, random weights)."""

import pytest
import torch

from unroll.models import LM, ModelConfig
from unroll.models.attention import document_layout
from unroll.models.config import M2RNNConfig, MoEConfig, TNTConfig

M2 = {"m2rnn": M2RNNConfig(k_dim=4, v_dim=4, qk_heads=2, v_heads=4)}
M2_NEWTON = {"m2rnn": M2RNNConfig(k_dim=4, v_dim=4, qk_heads=2, v_heads=4, solver="newton")}
MOE = {"mlp_pattern": "E", "moe": MoEConfig(experts=4, top_k=2, hidden=16, shared_experts=1)}
TNT = {"tnt": TNTConfig(heads=2, global_chunk=4, local_chunks=[2], local_reset=4)}
TNT_UNRESET = {"tnt": TNTConfig(heads=2, global_chunk=4, local_chunks=[2, 3], local_reset=0)}  # lanes align on 12
CASES = {
    "G-newton": ("GG", {"solver": "newton"}),
    "G-sequential": ("GG", {"solver": "sequential"}),
    "L-newton": ("LL", {"solver": "newton", "rnn_heads": 2}),
    "L-sequential": ("LL", {"solver": "sequential"}),
    "M-sequential": ("MM", M2),
    "M-newton": ("MM", M2_NEWTON),
    "A": ("AA", {"n_kv_heads": 2}),
    "A-window": ("AA", {"window": 3}),
    "A-nope": ("AA", {"rope": False}),
    "T": ("TT", TNT),
    "T-locals-never-reset": ("TT", TNT_UNRESET),
    "hybrid-moe": ("GAMLT", M2 | MOE | TNT | {"window": 5}),
}
# two rows: documents of lengths 5, 1, 10 and 7, 9 (T = 16); the second row's first document runs on from
# an earlier one (no start at t = 0), which a fresh state must also give
DOCS = [[(0, 5), (5, 6), (6, 16)], [(0, 7), (7, 16)]]


def build(pattern, kw, **extra):
    cfg = ModelConfig(pattern=pattern, vocab_size=50, d_model=16, n_heads=2, **kw, **extra)
    torch.manual_seed(0)
    return LM(cfg).double()


def packed_resets(T=16):
    resets = torch.zeros(len(DOCS), T, dtype=torch.bool)
    for b, docs in enumerate(DOCS):
        for start, _ in docs[1:]:
            resets[b, start] = True
    resets[0, 0] = True
    return resets


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("case", list(CASES))
def test_a_packed_row_equals_its_documents_run_alone(case):
    pattern, kw = CASES[case]
    model = build(pattern, kw)
    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 50, (2, 16), generator=g)
    weights = torch.randn(2, 16, 50, generator=g, dtype=torch.float64)  # a loss reading every logit

    packed = model(tokens, resets=packed_resets())
    (packed * weights).sum().backward()
    packed_grads = grads(model)
    model.zero_grad()

    alone = torch.zeros_like(packed)
    for b, docs in enumerate(DOCS):
        for start, end in docs:
            logits = model(tokens[b : b + 1, start:end])
            (logits * weights[b : b + 1, start:end]).sum().backward()
            alone[b, start:end] = logits[0].detach()
    torch.testing.assert_close(packed.detach(), alone, rtol=1e-10, atol=1e-10)
    alone_grads = grads(model)
    assert packed_grads.keys() == alone_grads.keys()
    for name in packed_grads:
        torch.testing.assert_close(packed_grads[name], alone_grads[name], rtol=1e-9, atol=1e-10, msg=name)


@pytest.mark.parametrize("case", ["G-newton", "M-sequential", "A", "hybrid-moe"])
def test_without_resets_the_row_is_one_stream_and_isolation_changes_it(case):
    pattern, kw = CASES[case]
    model = build(pattern, kw).eval()
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(2))
    stream = model(tokens)
    torch.testing.assert_close(model(tokens, resets=torch.zeros(2, 16, dtype=torch.bool)), stream)
    assert not torch.allclose(model(tokens, resets=packed_resets()), stream)


@pytest.mark.parametrize("case", ["G-sequential", "L-newton", "M-newton", "A"])
def test_a_reset_at_the_first_token_drops_the_incoming_state(case):
    pattern, kw = CASES[case]
    model = build(pattern, kw).eval()
    tokens = torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(3))
    _, states = model(tokens[:, :5], return_states=True)
    first = torch.zeros(2, 7, dtype=torch.bool)
    first[:, 0] = True
    fresh = model(tokens[:, 5:])
    torch.testing.assert_close(model(tokens[:, 5:], states=states, resets=first), fresh, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("recompute", ["full", "mlp"])
def test_activation_checkpointing_carries_the_resets(recompute):
    pattern, kw = CASES["hybrid-moe"]
    model = build(pattern, kw)
    tokens = torch.randint(0, 50, (2, 16), generator=torch.Generator().manual_seed(4))
    plain = model(tokens, resets=packed_resets())
    plain.square().sum().backward()
    expected = grads(model)
    model.zero_grad()
    for block in model.blocks:
        block.recompute = recompute
    again = model(tokens, resets=packed_resets())
    again.square().sum().backward()
    torch.testing.assert_close(again, plain)
    for name, grad in grads(model).items():
        torch.testing.assert_close(grad, expected[name], msg=name)


def test_document_ids_and_positions_restart_at_each_start():
    resets = torch.tensor([[False, False, True, False, False, True], [True, False, False, False, True, False]])
    ids, positions = document_layout(resets, past=10)
    assert ids.tolist() == [[0, 0, 1, 1, 1, 2], [1, 1, 1, 1, 2, 2]]
    assert positions.tolist() == [[10, 11, 0, 1, 2, 0], [0, 1, 2, 3, 0, 1]]


def test_rotary_positions_per_document_or_per_stream_agree_within_a_document():
    """RoPE's scores depend on position differences only: restarting the positions at each document
    (rope_document_positions, which keeps the angles of long packed rows small) changes nothing else."""
    tokens = torch.randint(0, 50, (1, 12), generator=torch.Generator().manual_seed(5))
    resets = torch.zeros(1, 12, dtype=torch.bool)
    resets[0, 6] = True
    second_alone = build("AA", {}).eval()(tokens[:, 6:])
    for per_document in (True, False):
        model = build("AA", {}, rope_document_positions=per_document).eval()
        torch.testing.assert_close(model(tokens, resets=resets)[:, 6:], second_alone, rtol=1e-10, atol=1e-10)
