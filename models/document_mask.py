"""Block-diagonal causal attention without a dense [T, S] mask: flex_attention over a BlockMask built
straight from the documents' ids, one entry per 128 × 128 tile (O(B · T/128 · S/128) memory, where SDPA
with a boolean mask holds B · T · S). Tiles no query of which sees any key are skipped; tiles whose
queries all see all keys (inside one document, below the diagonal, within the window, no padding) run
without the mask; only the tiles on a document's edge evaluate it.

The tile lists are computed here rather than by `create_block_mask`, which evaluates the mask at every
(query, key) pair to find them: that is the dense [B, T, S] tensor this path exists to avoid."""

from __future__ import annotations

from collections.abc import Callable
from functools import cache

import torch
from torch.nn.attention.flex_attention import BlockMask, flex_attention

TILE = 128  # flex_attention's default block size


def _per_tile(ids: torch.Tensor, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last) id of each TILE-long tile of ids [B, N] (non-decreasing), the last tile padded with the
    row's last id."""
    pad = tiles * TILE - ids.shape[1]
    padded = torch.cat([ids, ids[:, -1:].expand(-1, pad)], dim=1).view(ids.shape[0], tiles, TILE)
    return padded[..., 0], padded[..., -1]


def _ordered(tiles: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's form of a [B, Q, K] bool tile map: (count [B, 1, Q], indices [B, 1, Q, K] with the
    chosen key tiles first, in order)."""
    count = tiles.sum(-1, dtype=torch.int32)
    order = torch.argsort(tiles.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return count[:, None], order[:, None]


def document_block_mask(doc_q: torch.Tensor, doc_k: torch.Tensor, offset: int, window: int = 0) -> BlockMask:
    """The mask "query i sees key j iff both are in the same document, j ≤ offset + i and (with a window)
    j > offset + i − window" for document ids doc_q [B, T], doc_k [B, S], both non-decreasing along the
    row (ids count document starts); query i sits at key position offset + i (offset = S − T: the keys
    before the queries are cached or other ranks' slices)."""
    B, T = doc_q.shape
    S = doc_k.shape[1]
    nq, nk = -(-T // TILE), -(-S // TILE)
    q_first, q_last = _per_tile(doc_q, nq)
    k_first, k_last = _per_tile(doc_k, nk)
    tile = torch.arange(max(nq, nk), device=doc_q.device)
    q_lo = (offset + tile[:nq] * TILE)[:, None]  # key positions of the first and last query of each tile
    q_hi = (offset + torch.clamp((tile[:nq] + 1) * TILE, max=T) - 1)[:, None]
    k_lo, k_hi = (tile[:nk] * TILE)[None, :], torch.clamp((tile[:nk] + 1) * TILE, max=S)[None, :] - 1
    shares = (k_first[:, None, :] <= q_last[:, :, None]) & (q_first[:, :, None] <= k_last[:, None, :])
    some = shares & (k_lo <= q_hi)
    one_document = (q_first == q_last)[:, :, None] & (k_first == k_last)[:, None, :]
    one_document &= q_first[:, :, None] == k_first[:, None, :]
    whole = ((tile[:nq] + 1) * TILE <= T)[:, None] & ((tile[:nk] + 1) * TILE <= S)[None, :]
    every = one_document & (k_hi <= q_lo) & whole  # a tile holding padding always evaluates the mask
    if window:
        some &= k_hi > q_lo - window
        every &= k_lo > q_hi - window
    partial = some & ~every
    count, order = _ordered(partial)
    full_count, full_order = _ordered(every)
    return BlockMask.from_kv_blocks(
        count,
        order,
        full_count,
        full_order,
        BLOCK_SIZE=TILE,
        mask_mod=document_mask_mod(doc_q, doc_k, offset, window),
        seq_lengths=(T, S),
    )


def document_dense_mask(doc_q: torch.Tensor, doc_k: torch.Tensor, offset: int, window: int = 0) -> torch.Tensor:
    """The rule of `document_block_mask` as SDPA's boolean mask [B, 1, T, S] (B · T · S bytes)."""
    i = torch.arange(doc_q.shape[1], device=doc_q.device)[:, None]
    j = torch.arange(doc_k.shape[1], device=doc_q.device)[None, :]
    seen = (doc_q[:, None, :, None] == doc_k[:, None, None, :]) & (j <= offset + i)
    return seen & (j > offset + i - window) if window else seen


def document_mask_mod(
    doc_q: torch.Tensor, doc_k: torch.Tensor, offset: int, window: int
) -> Callable[..., torch.Tensor]:
    """The element-wise rule of `document_block_mask`, as flex_attention's mask_mod. Indices past the
    row's end (in a last, partly filled tile) are clamped: the kernel discards those scores anyway."""
    T, S = doc_q.shape[1], doc_k.shape[1]

    def mask_mod(b: torch.Tensor, h: torch.Tensor, i: torch.Tensor, j: torch.Tensor) -> torch.Tensor:
        i, j = i.clamp(max=T - 1), j.clamp(max=S - 1)
        seen = (doc_q[b, i] == doc_k[b, j]) & (j <= offset + i)
        if window:
            seen &= j > offset + i - window
        return seen

    return mask_mod


@cache
def _compiled() -> Callable[..., torch.Tensor]:
    # flex_attention's fused kernel exists only compiled; eager it materializes the full scores
    fused: Callable[..., torch.Tensor] = torch.compile(flex_attention, dynamic=False)
    return fused


def flex_document_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_mask: BlockMask, *, fused: bool
) -> torch.Tensor:
    """softmax(q kᵀ/√d) v over the block mask's pairs; kv heads shared by groups of query heads. fused:
    the compiled kernel (CUDA, or CPU without backward); else flex_attention's eager reference (which
    materializes the scores, and on CPU has no backward either)."""
    gqa = k.shape[1] != q.shape[1]
    if fused:
        return _compiled()(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    out: torch.Tensor = flex_attention(q, k, v, block_mask=block_mask, enable_gqa=gqa)
    return out


def use_flex(kernel: str, q: torch.Tensor) -> bool:
    """Whether document-masked attention goes through flex_attention: kernel "flex" always, "auto" on CUDA
    for the dtypes its fused kernel has (not float64, which SDPA computes exactly as the references do)."""
    if kernel == "auto":
        return q.is_cuda and q.dtype in (torch.float32, torch.bfloat16, torch.float16)
    return kernel == "flex"
