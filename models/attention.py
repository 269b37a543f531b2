"""Causal self-attention: RoPE (rotate-half, as HF Llama) or none, grouped-query heads, optional sliding
window, SDPA, a KV cache."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from unroll.models.context_parallel import ContextParallel
from unroll.models.init import Rule, init_eagerly, normal


def rope_angles(
    positions: torch.Tensor, head_dim: int, theta: float, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
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
    ):
        super().__init__()
        self.n_heads, self.n_kv_heads = n_heads, n_kv_heads
        self.head_dim = head_dim or d_model // n_heads
        self.rope_theta, self.rope, self.window = rope_theta, rope, window
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

    def _project(self, x: torch.Tensor, past: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """q [B, H, T, hd], k, v [B, KV, T, hd] for tokens at positions past ... past + T − 1 (rotated)."""
        B, T, _ = x.shape
        hd, H, KV = self.head_dim, self.n_heads, self.n_kv_heads
        q, k, v = self.qkv(x).view(B, T, H + 2 * KV, hd).transpose(1, 2).split([H, KV, KV], dim=1)
        if self.rope:
            rope_dtype = torch.promote_types(q.dtype, torch.float32)
            cos, sin = rope_angles(torch.arange(past, past + T, device=x.device), hd, self.rope_theta, rope_dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        return q, k, v

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past: int, cached: int) -> torch.Tensor:
        """Queries at past ... past + T − 1 over `cached` earlier keys and their own, projected out."""
        B, H, T, hd = q.shape
        mask, causal = self._mask(past, cached, T, q.device)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=self.n_kv_heads != H)
        out: torch.Tensor = self.out_proj(y.transpose(1, 2).reshape(B, T, H * hd))
        return out

    def forward(self, x: torch.Tensor, state: KVCache | None = None) -> tuple[torch.Tensor, KVCache | None]:
        """x: [B, T, d] → (y [B, T, d], cache of the positions so far; the last `window` with a window)."""
        if self.context_group is not None and state is None:
            return self._forward_context_parallel(x)
        past = state.position if state is not None else 0
        q, k, v = self._project(x, past)
        cached = state.length if state is not None else 0
        if state is not None:
            k, v = torch.cat([state.k, k], dim=2), torch.cat([state.v, v], dim=2)
        y = self._attend(q, k, v, past, cached)
        if self.window:
            k, v = k[:, :, -self.window :], v[:, :, -self.window :]
        return y, KVCache(k, v, past + x.shape[1])

    def _forward_context_parallel(self, x: torch.Tensor) -> tuple[torch.Tensor, None]:
        """This rank's slice of a sequence split over the context group: queries at positions
        r·T ... r·T + T − 1 against the gathered keys and values of the slices up to its own (the later
        ones are gathered too, the collective being one, but not attended to). Later ranks do more of
        the work: ring attention would balance it."""
        from unroll.kernels.context import gather_sequence

        past = torch.distributed.get_rank(self.context_group) * x.shape[1]
        q, k, v = self._project(x, past)
        end = past + x.shape[1]
        k, v = (
            gather_sequence(k, self.context_group, 2)[:, :, :end],
            gather_sequence(v, self.context_group, 2)[:, :, :end],
        )
        return self._attend(q, k, v, past, past), None

    def step(self, x: torch.Tensor, state: KVCache | None) -> tuple[torch.Tensor, KVCache | None]:
        """One token: x [B, d] → (y [B, d], cache)."""
        y, cache = self.forward(x[:, None], state)
        return y[:, 0], cache

    def extra_repr(self) -> str:
        return (
            f"heads={self.n_heads}, kv_heads={self.n_kv_heads}, head_dim={self.head_dim}, "
            f"rope={self.rope}, window={self.window or 'full'}"
        )
