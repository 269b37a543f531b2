"""Causal self-attention: RoPE (rotate-half, as HF Llama), grouped-query heads, SDPA, a KV cache."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


def rope_angles(positions: torch.Tensor, head_dim: int, theta: float,
                dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape [T, head_dim] for rotate-half RoPE (frequency i used by dims i and i + hd/2),
    computed in at least float32 whatever the activations' dtype."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device, dtype=dtype) / head_dim)
    angles = positions.to(dtype)[:, None] * inv_freq[None, :]
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, hd]; rotates pairs (x_i, x_{i+hd/2}) by the position's angle."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat([-x2, x1], dim=-1)
    return (x.to(cos.dtype) * cos + rotated.to(cos.dtype) * sin).to(x.dtype)


@dataclass
class KVCache:
    k: torch.Tensor  # [B, kv_heads, S, hd], RoPE already applied
    v: torch.Tensor

    @property
    def length(self) -> int:
        return self.k.shape[2]


class Attention(nn.Module):
    """y = W_o · softmax(q kᵀ/√d + causal mask) v, with q/k rotated by RoPE and kv heads shared by
    n_heads / n_kv_heads query heads each."""

    def __init__(self, d_model: int, n_heads: int, n_kv_heads: int, rope_theta: float,
                 init_std: float = 0.02, out_std: float | None = None):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = d_model // n_heads
        self.rope_theta = rope_theta
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * self.head_dim, bias=False)
        self.out_proj = nn.Linear(n_heads * self.head_dim, d_model, bias=False)
        nn.init.normal_(self.qkv.weight, std=init_std)
        nn.init.normal_(self.out_proj.weight, std=out_std or init_std)

    def forward(self, x: torch.Tensor, state: KVCache | None = None):
        """x: [B, T, d] → (y [B, T, d], cache holding every position so far)."""
        B, T, _ = x.shape
        hd, H, KV = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).view(B, T, H + 2 * KV, hd).transpose(1, 2).split([H, KV, KV], dim=1)
        past = state.length if state is not None else 0
        rope_dtype = torch.promote_types(q.dtype, torch.float32)
        cos, sin = rope_angles(torch.arange(past, past + T, device=x.device), hd, self.rope_theta, rope_dtype)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        if past == 0:
            mask, causal = None, T > 1
        elif T == 1:
            mask, causal = None, False  # one new query sees the whole cache
        else:  # a chunk after a cache: query i sits at position past + i
            mask = torch.ones(T, past + T, dtype=torch.bool, device=x.device).tril(diagonal=past)
            causal = False
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=KV != H)
        return self.out_proj(y.transpose(1, 2).reshape(B, T, H * hd)), KVCache(k, v)

    def step(self, x: torch.Tensor, state: KVCache | None):
        """One token: x [B, d] → (y [B, d], cache)."""
        y, cache = self.forward(x[:, None], state)
        return y[:, 0], cache
