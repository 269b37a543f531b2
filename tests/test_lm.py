"""The LM: generation by steps equals the full-sequence forward; attention against an explicit reference."""

import math

import pytest
import torch

from unroll.models import LM, ModelConfig
from unroll.models.attention import Attention
from unroll.models.config import M2RNNConfig, MoEConfig


def tiny(pattern, **kw):
    cfg = ModelConfig(pattern=pattern, vocab_size=50, d_model=32, n_heads=4, **kw)
    torch.manual_seed(0)
    return LM(cfg).double().eval()


M2 = {"m2rnn": M2RNNConfig(k_dim=4, v_dim=4, qk_heads=2, v_heads=4)}
MOE = {"mlp_pattern": "E", "moe": MoEConfig(experts=4, top_k=2, hidden=16, shared_experts=1, bias_update_rate=0.1)}


@pytest.mark.parametrize(
    "pattern,kw",
    [
        ("GG", {}),
        ("LL", {"rnn_heads": 2}),
        ("AA", {}),
        ("GA|AL", {"n_kv_heads": 2}),
        ("AG", {"tie_embeddings": False, "rnn_width": 24}),
        ("MM", M2),
        ("MA", M2 | {"m2rnn": M2RNNConfig(k_dim=4, v_dim=4, qk_heads=1, v_heads=4, solver="newton")}),
        ("AA", {"window": 4}),
        ("AA", {"window": 6, "rope": False, "n_kv_heads": 2, "head_dim": 6}),
        ("MAGL", M2 | MOE | {"window": 3}),
        ("GA", {"mlp_pattern": "DE", "moe": MOE["moe"]}),
    ],
)
def test_step_by_step_equals_full_forward(pattern, kw):
    model = tiny(pattern, **kw)
    tokens = torch.randint(0, 50, (3, 13))
    full = model(tokens)
    states, stepped = None, []
    for t in range(tokens.shape[1]):
        logits, states = model.step(tokens[:, t], states)
        stepped.append(logits)
    torch.testing.assert_close(torch.stack(stepped, 1), full, rtol=1e-10, atol=1e-10)
    # prefill a prefix in one forward, then continue with a chunk and with single steps
    _, states = model(tokens[:, :5], return_states=True)
    chunk, states2 = model(tokens[:, 5:9], states, return_states=True)
    torch.testing.assert_close(chunk, full[:, 5:9], rtol=1e-10, atol=1e-10)
    logits, _ = model.step(tokens[:, 9], states2)
    torch.testing.assert_close(logits, full[:, 9], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("use_rope,window", [(True, 0), (False, 0), (True, 4), (False, 1)])
def test_attention_matches_explicit_softmax_reference(use_rope, window):
    torch.manual_seed(0)
    B, T, d, H, KV = 2, 11, 24, 6, 2
    attn = Attention(d, H, KV, rope_theta=100.0, rope=use_rope, window=window).double()
    x = torch.randn(B, T, d, dtype=torch.float64)
    y, _ = attn(x)

    hd = d // H
    q, k, v = attn.qkv(x).view(B, T, H + 2 * KV, hd).split([H, KV, KV], dim=2)

    def rope(u):  # rotate-half: dims i and i + hd/2 rotate together by t * theta^(-2i/hd)
        out = u.clone()
        for t in range(T):
            for i in range(hd // 2):
                ang = t * 100.0 ** (-2 * i / hd)
                c, s = math.cos(ang), math.sin(ang)
                out[:, t, :, i] = u[:, t, :, i] * c - u[:, t, :, i + hd // 2] * s
                out[:, t, :, i + hd // 2] = u[:, t, :, i + hd // 2] * c + u[:, t, :, i] * s
        return out

    if attn.rope:
        q, k = rope(q), rope(k)
    out = torch.zeros(B, T, H, hd, dtype=torch.float64)
    for h in range(H):
        g = h // (H // KV)  # query head h reads kv head g
        scores = q[:, :, h] @ k[:, :, g].transpose(1, 2) / math.sqrt(hd)
        hidden = torch.ones(T, T, dtype=torch.bool).triu(1)  # the future
        if window:  # and what lies `window` or more positions back
            hidden |= torch.ones(T, T, dtype=torch.bool).tril(-window)
        scores = scores.masked_fill(hidden, float("-inf"))
        out[:, :, h] = scores.softmax(-1) @ v[:, :, g]
    torch.testing.assert_close(y, attn.out_proj(out.reshape(B, T, d)), rtol=1e-10, atol=1e-12)


def test_tied_and_untied_heads():
    assert tiny("G").head is None
    untied = tiny("G", tie_embeddings=False)
    assert untied.head is not None
    assert untied.num_params() == tiny("G").num_params() + 50 * 32
