"""Attention over isolated documents without a dense mask: the tile mask built from document ids equals
torch's own `create_block_mask` (which evaluates every pair), and flex_attention over it equals SDPA with
the dense boolean mask (float64; flex_attention's eager reference, CPU having no fused kernel)."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.flex_attention import create_block_mask

from unroll.models import LM, ModelConfig
from unroll.models.document_mask import document_block_mask, document_mask_mod, flex_document_attention

# (queries T, keys S, window, start probability): S > T puts the queries after S − T earlier keys (a cache,
# or earlier context-parallel slices); lengths off the 128 tile, documents within, across and along tiles
CASES = [
    (300, 300, 0, 0.01),
    (256, 256, 0, 0.0),
    (130, 390, 0, 0.02),
    (200, 456, 64, 0.01),
    (64, 64, 0, 0.1),
    (700, 700, 0, 0.002),
    (600, 700, 300, 0.004),
]


@pytest.fixture(autouse=True)
def _quiet_eager_flex():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "flex_attention called without torch.compile")
        yield


def documents(B, S, p, seed):
    g = torch.Generator().manual_seed(seed)
    starts = torch.rand(B, S, generator=g) < p
    starts[0, S // 2] = True  # at least one boundary
    return starts.long().cumsum(1)


def dense_mask(doc_q, doc_k, window):
    T, S = doc_q.shape[1], doc_k.shape[1]
    q_pos, k_pos = torch.arange(S - T, S)[:, None], torch.arange(S)[None]
    mask = (doc_q[:, None, :, None] == doc_k[:, None, None, :]) & (k_pos <= q_pos)
    return mask & (k_pos > q_pos - window) if window else mask


@pytest.mark.parametrize("T,S,window,p", CASES)
def test_tile_lists_equal_those_torch_finds_pair_by_pair(T, S, window, p):
    doc_k = documents(3, S, p, seed=T + S)
    doc_q = doc_k[:, S - T :]
    ours = document_block_mask(doc_q, doc_k, S - T, window)
    torchs = create_block_mask(document_mask_mod(doc_q, doc_k, S - T, window), 3, None, T, S, device="cpu")
    for name in ("kv_num_blocks", "full_kv_num_blocks"):
        assert torch.equal(getattr(ours, name), getattr(torchs, name)), name
    for name, count in (("kv_indices", "kv_num_blocks"), ("full_kv_indices", "full_kv_num_blocks")):
        n = getattr(ours, count)
        listed = torch.arange(getattr(ours, name).shape[-1]) < n[..., None]
        assert torch.equal(getattr(ours, name)[listed], getattr(torchs, name)[listed]), name
    assert torch.equal(ours.to_dense(), torchs.to_dense())


@pytest.mark.parametrize("T,S,window,p", CASES)
def test_flex_over_the_tile_mask_equals_sdpa_with_the_dense_mask(T, S, window, p):
    doc_k = documents(2, S, p, seed=T)
    doc_q = doc_k[:, S - T :]
    g = torch.Generator().manual_seed(S)
    q = torch.randn(2, 4, T, 8, generator=g, dtype=torch.float64)
    k, v = (torch.randn(2, 2, S, 8, generator=g, dtype=torch.float64) for _ in range(2))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=dense_mask(doc_q, doc_k, window), enable_gqa=True)
    got = flex_document_attention(q, k, v, document_block_mask(doc_q, doc_k, S - T, window), fused=False)
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("pattern,kw", [("AA", {"n_kv_heads": 2}), ("AA", {"window": 100}), ("GAG", {"rope": False})])
def test_the_lm_gives_the_same_logits_with_either_kernel(pattern, kw):
    T = 400
    resets = torch.zeros(2, T, dtype=torch.bool)
    resets[0, [0, 90, 128, 129, 333]] = True  # a start on a tile edge and a one-token document
    resets[1, [255, 256]] = True
    tokens = torch.randint(0, 50, (2, T), generator=torch.Generator().manual_seed(0))
    logits = {}
    for kernel in ("sdpa", "flex"):
        torch.manual_seed(0)
        cfg = ModelConfig(pattern=pattern, vocab_size=50, d_model=16, n_heads=2, attention_kernel=kernel, **kw)
        with torch.no_grad():  # flex_attention has no backward on CPU
            logits[kernel] = LM(cfg).double()(tokens, resets=resets)
    torch.testing.assert_close(logits["flex"], logits["sdpa"], rtol=1e-11, atol=1e-11)
