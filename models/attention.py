"""Causal self-attention: RoPE (rotate-half, as HF Llama) or none, grouped-query heads, optional sliding
window, SDPA, a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unroll.models.context_parallel import ContextParallel
from unroll.models.document_mask import (
    document_block_mask,
    document_dense_mask,
    flex_document_attention,
    use_flex,
)
from unroll.models.init import Rule, init_eagerly, normal


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [*positions.shape, head_dim] for rotate-half RoPE (frequency i used by dims i and
    i + hd/2), computed in at least float32 whatever the activations' dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates pairs (x_i, x_{i+hd/2}) by the position's angle (cos, sin: [T, hd], or
    [B, 1, T, hd] for positions per row)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


def document_layout(resets: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(document ids, positions), both [B, T], of tokens at stream positions past ... past + T − 1 whose
    documents begin where resets [B, T] is True: the id counts the starts up to t (0 = the document the row
    came in with, which earlier keys belong to), the position is t's offset in its document (past + t before
    the first start)."""
    t = torch.arange(resets.shape[1], device=resets.device)
    last_start = torch.where(resets, t, -1).cummax(dim=1).values
    return resets.long().cumsum(dim=1), torch.where(last_start >= 0, t - last_start, past + t)


@dataclass
class KVCache:
    k: torch.Tensor  # [B, kv_heads, S, hd], RoPE already applied; with a window only the last `window`
    v: torch.Tensor
    position: int  # tokens seen so far (the cache holds positions position − S ... position − 1)

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Attention(ContextParallel, nn.Module):
    """y = W_o · softmax(q kᵀ/√d + mask) v, with kv heads shared by n_heads / n_kv_heads query heads each.

    rope: rotate q and k by their absolute positions (False: no positional encoding, "NoPE", as in
    hybrids where the recurrent layers carry order). window > 0: sliding-window attention, query t sees
    keys t − window + 1 ... t, and the cache keeps only the last `window` keys (O(window) memory when
    generating).

    Isolated documents (resets): kernel "sdpa" masks with a boolean [B, 1, T, S]; "flex" runs
    flex_attention over a tile mask (no dense mask; fused on CUDA); "auto" picks flex on CUDA.

    Context parallelism: each rank attends from its slice to the keys and values of all slices up to its
    own (all_gather over the context group)."""

    def __init__(
        self,
        d_model: int,
        n_heads: int,
        n_kv_heads: int,
        rope_theta: float,
        init_std: float = 0.02,
        out_std: float | None = None,
        *,
        head_dim: int | None = None,
        rope: bool = True,
        window: int = 0,
        document_positions: bool = True,
        kernel: str = "auto",
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.rope_theta, self.rope, self.window = rope_theta, rope, window
        self.document_positions, self.kernel = document_positions, kernel
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        self.init_std, self.out_std = init_std, out_std or init_std
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        return {"qkv.weight": normal(self.init_std), "out_proj.weight": normal(self.out_std)}

    def _mask(self, past: int, cached: int, T: int, device: torch.device) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for T queries at positions past ... past+T−1 over `cached` cached keys
        followed by the T new ones; SDPA's own causal flag where it suffices."""
        if not self.window or past + T <= self.window:
            if cached == 0:
                return None, T > 1
            if T == 1:
                return None, False  # one new query sees the whole cache
        q_pos = torch.arange(past, past + T, device=device)[:, None]
        k_pos = torch.arange(past - cached, past + T, device=device)[None, :]
        mask = k_pos <= q_pos
        if self.window:
            mask &= k_pos > q_pos - self.window
        return mask, False

    def _project(
        self, x: torch.Tensor, past: int, positions: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, hd], k, v [B, KV, T, hd] for tokens at positions past ... past + T − 1 (rotated), or at
        `positions` [B, T] (each token's offset in its document)."""
        B, T, _ = x.shape
        hd, H, KV = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).view(B, T, H + 2 * KV, hd).transpose(1, 2).split([H, KV, KV], dim=1)
        if self.rope:
            rope_dtype = torch.promote_types(q.dtype, torch.float32)
            if positions is None:
                positions = torch.arange(past, past + T, device=x.device)
            cos, sin = rope_angles(positions, hd, self.rope_theta, rope_dtype)
            if cos.dim() == 3:  # per row: broadcast over the heads
                cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        past: int,
        cached: int,
        doc_q: torch.Tensor | None = None,
        doc_k: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Queries at past ... past + T − 1 over `cached` earlier keys and their own, projected out; with
        document ids (doc_q [B, T], doc_k [B, cached + T]) a query sees only keys of its own document."""
        H, T = q.shape[1:3]
        mask: torch.Tensor | None
        if doc_q is not None and doc_k is not None:
            if use_flex(self.kernel, q):
                block_mask = document_block_mask(doc_q, doc_k, cached, self.window)
                return self._out(flex_document_attention(q, k, v, block_mask, fused=q.is_cuda))
            # a boolean mask [B, 1, T, S]: SDPA runs its memory-efficient kernel with it (not flash)
            mask, causal = document_dense_mask(doc_q, doc_k, cached, self.window), False
        else:
            mask, causal = self._mask(past, cached, T, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != H)
        return self._out(y)

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """Heads [B, H, T, hd] joined and projected to [B, T, d]."""
        B, H, T, hd = y.shape
        out: torch.Tensor = self.out_proj(y.transpose(1, 2).reshape(B, T, H * hd))
        return out

    def forward(
        self, x: torch.Tensor, state: KVCache | None = None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, KVCache | None]:
        """x: [B, T, d] → (y [B, T, d], cache of the positions so far; the last `window` with a window).
        resets [B, T]: block-diagonal causal attention, each document seeing only itself (and the cache only
        before the row's first start), rotary positions restarting at each document (rope_document_positions).
        The cache returned keeps stream positions: generation continues one document."""
        if self.context_group is not None and state is None:
            return self._forward_context_parallel(x, resets)
        past = state.position if state is not None else 0
        cached = state.length if state is not None else 0
        doc_q = doc_k = positions = None
        if resets is not None:
            doc_q, positions = document_layout(resets, past)
            doc_k = torch.cat([doc_q.new_zeros(doc_q.shape[0], cached), doc_q], dim=1)
            positions = positions if self.document_positions else None
        q, k, v = self._project(x, past, positions)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        y = self._attend(q, k, v, past, cached, doc_q, doc_k)
        if self.window:
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        return y, KVCache(k, v, past + x.shape[1])

    def _forward_context_parallel(self, x: torch.Tensor, resets: torch.Tensor | None) -> tuple[torch.Tensor, None]:
        """This rank's slice of a sequence split over the context group: queries at positions
        r·T ... r·T + T − 1 against the gathered keys and values of the slices up to its own (the later
        ones are gathered too, the collective being one, but not attended to). Later ranks do more of
        the work: ring attention would balance it."""
        from unroll.kernels.context import gather_flags, gather_sequence

        past = torch.distributed.get_rank(self.context_group) * x.shape[1]
        end = past + x.shape[1]
        doc_q = doc_k = positions = None
        if resets is not None:  # the documents of the whole sequence: every rank's starts
            assert self.context_group is not None, "called under context parallelism"
            everywhere = gather_flags(resets, self.context_group)[:, :end]
            doc_k, stream_positions = document_layout(everywhere, 0)
            doc_q = doc_k[:, past:end]
            positions = stream_positions[:, past:end] if self.document_positions else None
        q, k, v = self._project(x, past, positions)
        k, v = (
            gather_sequence(k, self.context_group, 2)[:, :, :end],
            gather_sequence(v, self.context_group, 2)[:, :, :end],
        )
        return self._attend(q, k, v, past, past, doc_q, doc_k), None

    def step(self, x: torch.Tensor, state: KVCache | None) -> tuple[torch.Tensor, KVCache | None]:
        """One token: x [B, d] → (y [B, d], cache)."""
        y, cache = self.forward(x[:, None], state)
        return y[:, 0], cache

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"rope={self.rope}, window={self.window or 'full'}, kernel={self.kernel}"
        )
