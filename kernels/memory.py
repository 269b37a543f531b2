"""Test-time memory (Titans, TNT): an MLP M trained per token by gradient descent on ‖M(k_t) − v_t‖²,
chunkwise. Pure functions on tensors; rows N are independent sequences (batch × heads × shards).

The memory is 1 layer, M(x) = W x, or 2 layers with a residual, M(x) = x + W₂ SiLU(W₁ x) (Titans). The
per-token gradient of ℓ_t = ‖M(k_t) − v_t‖² with respect to every weight is an outer product
∂ℓ_t/∂W = δ_t u_tᵀ, written out in closed form (`mlp_grads`), batched over a chunk: no autograd inside
the inner loop, and the outer training backpropagates through these formulas with ordinary autograd.

    1 layer:   r = W k − v                  δ = 2r,                         u = k
    2 layers:  z = W₁ k, a = SiLU(z), r = k + W₂ a − v
               W₂: δ₂ = 2r, u₂ = a            W₁: δ₁ = (W₂ᵀ δ₂) ⊙ SiLU'(z), u₁ = k

The update with momentum and forgetting (Titans), with per-token step θ_t, momentum β_t, forget α_t:

    S_t = β_t S_{t−1} − θ_t ∇ℓ_t          W_t = (1 − α_t) W_{t−1} + S_t        (β = 0: no momentum)

Chunkwise (chunk size C): every gradient in a chunk is taken at the chunk-start weights P (so the
gradients of the whole chunk are one batched computation) and only chunk boundaries are sequential. The
momentum and forget recurrences inside a chunk are linear, so with γ = 1 − α, Γ[t,s] = Π_{s<j≤t} γ_j and
E[t,s] = Π_{s<j≤t} β_j (segment products, from cumulative sums of logs):

    W_t = a_t W_0 + b_t S_0 − Σ_{τ≤t} c[t,τ] δ_τ u_τᵀ,   a_t = Γ[t,0], b = Γ E[·,0], c = (Γ E) ⊙ θ_τ
    S_t = E[t,0] S_0 − Σ_{τ≤t} E[t,τ] θ_τ δ_τ u_τᵀ

Reads y_t = M_{W_t}(x_t) *after* token t's update never build the per-token weights: W_t x_t =
a_t W_0 x_t + b_t S_0 x_t − Σ_τ c[t,τ] (u_τ·x_t) δ_τ is a causal C×C product (like attention in a chunk),
layer by layer (the second layer's input is SiLU of the first layer's read). Reads at the chunk start
(read="start") use P. With C = 1 both are the per-token recurrence (`memory_step` is that recurrence).

Optionally the read input is the query projected onto the keys seen so far (TNT's local memories):
x_t = M_t q_t with M_t = M_0 + Σ_{τ≤t} k_τ k_τᵀ/‖k_τ‖², carried chunk to chunk.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

Weights = tuple[torch.Tensor, ...]  # per layer [N, out, in]


@dataclass
class MemoryCarry:
    """One memory's state between tokens, per row: the weights gradients are taken at (the current chunk's
    start), the current weights, the momentum, the query projection, and tokens seen since the last reset."""

    point: Weights
    value: Weights
    momentum: Weights | None
    proj: torch.Tensor | None  # [N, d, d]
    pos: int


def silu_grad(z: torch.Tensor) -> torch.Tensor:
    s = torch.sigmoid(z)
    return s * (1 + z * (1 - s))


def mlp_apply(w: Weights, x: torch.Tensor) -> torch.Tensor:
    """M(x) for x [N, L, d]."""
    if len(w) == 1:
        return x @ w[0].mT
    return x + F.silu(x @ w[0].mT) @ w[1].mT


def mlp_grads(w: Weights, k: torch.Tensor, v: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per token, (δ_t, u_t) for every weight: ∂‖M(k_t) − v_t‖²/∂W = δ_t u_tᵀ. k, v [N, L, d]."""
    if len(w) == 1:
        return [(2 * (k @ w[0].mT - v), k)]
    z = k @ w[0].mT
    a = F.silu(z)
    d2 = 2 * (k + a @ w[1].mT - v)
    return [((d2 @ w[1]) * silu_grad(z), k), (d2, a)]


def _decay(log_g: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """log gates [..., L] → (D [..., L, L] with D[t, s] = Π_{s<j≤t} g_j for s ≤ t, else 0; Π_{j≤t} g_j)."""
    L = log_g.shape[-1]
    cs = log_g.cumsum(-1)
    lower = torch.ones(L, L, dtype=torch.bool, device=log_g.device).tril()
    return torch.exp((cs[..., :, None] - cs[..., None, :]).masked_fill(~lower, float("-inf"))), cs.exp()


Coefficients = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def chunk_coefficients(theta: torch.Tensor, log_beta: torch.Tensor | None, log_gamma: torch.Tensor) -> Coefficients:
    """Gates [..., L] of a chunk → (a, b, c, e, e0): W_t = a_t W_0 + b_t S_0 − Σ c[t,τ] G_τ and
    S_t = e0_t S_0 − Σ e[t,τ] G_τ (b, e, e0 None without momentum)."""
    gam, a = _decay(log_gamma)
    if log_beta is None:
        return a, None, gam * theta[..., None, :], None, None
    E, e0 = _decay(log_beta)
    return a, (gam @ e0[..., None])[..., 0], (gam @ E) * theta[..., None, :], E * theta[..., None, :], e0


def _read_linear(
    w: torch.Tensor,
    s: torch.Tensor | None,
    x: torch.Tensor,
    delta: torch.Tensor,
    u: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    c: torch.Tensor,
) -> torch.Tensor:
    """x [N, L, i] through the per-token weights W_t of one layer (see the module docstring)."""
    out = a[..., None] * (x @ w.mT) - (c * (x @ u.mT)) @ delta
    if s is not None:
        assert b is not None  # b comes with the momentum s
        out = out + b[..., None] * (x @ s.mT)
    return out


def _read_after(
    W: Weights,
    S: Weights | None,
    grads: list[tuple[torch.Tensor, torch.Tensor]],
    x: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor | None,
    c: torch.Tensor,
) -> torch.Tensor:
    (d1, u1) = grads[0]
    h = _read_linear(W[0], S[0] if S else None, x, d1, u1, a, b, c)
    if len(W) == 1:
        return h
    d2, u2 = grads[1]
    return x + _read_linear(W[1], S[1] if S else None, F.silu(h), d2, u2, a, b, c)


def _pick(mask: torch.Tensor, new: Weights, old: Weights) -> Weights:
    """Per row n (mask [N]): new where mask[n], else old."""
    return tuple(torch.where(mask.view(-1, *[1] * (n.dim() - 1)), n, o) for n, o in zip(new, old))


def _at_end(t: torch.Tensor, end: torch.Tensor | None) -> torch.Tensor:
    """t [N, L, ...] at each row's last valid step: t[:, −1] (end None: the chunk is full everywhere), else
    t[n, end[n]]."""
    if end is None:
        return t[:, -1]
    return t[torch.arange(t.shape[0], device=t.device), end]


def chunk_memory(
    carry: MemoryCarry,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    log_beta: torch.Tensor | None,
    log_gamma: torch.Tensor | None,
    *,
    chunk: int,
    read: str,
    valid: torch.Tensor | None = None,
    restart: torch.Tensor | None = None,
) -> tuple[torch.Tensor, MemoryCarry]:
    """The memory over q, k, v [N, T, d] with gates θ, log β, log γ [N, T] (log β None: no momentum;
    log γ None: no forgetting), starting from `carry` at a chunk boundary (its weights are its point).
    read: "after" (y_t = M_{W_t}(x_t)) or "start" (y_t = M_P(x_t), P the chunk-start weights).
    valid [N]: tokens per row (the rest is padding, zeros with θ = 0); the returned carry is each row's
    state after its last valid token. restart [N, n chunks] bool: the rows whose chunk i begins a new sequence
    start it from `carry` again (documents laid out on chunk boundaries). Returns (y [N, T, d], carry)."""
    N, T, d = q.shape
    if T == 0:
        return q.new_zeros(N, 0, d), carry
    n = -(-T // chunk)
    pad = n * chunk - T
    zeros = torch.zeros_like(theta)
    log_gamma = zeros if log_gamma is None else log_gamma
    if pad:
        q, k, v = (F.pad(t, (0, 0, 0, pad)) for t in (q, k, v))
        theta, log_gamma = F.pad(theta, (0, pad)), F.pad(log_gamma, (0, pad))
        log_beta = None if log_beta is None else F.pad(log_beta, (0, pad))
    q, k, v = (t.view(N, n, chunk, d) for t in (q, k, v))
    a, b, c, e, e0 = chunk_coefficients(
        theta.view(N, n, chunk), None if log_beta is None else log_beta.view(N, n, chunk), log_gamma.view(N, n, chunk)
    )
    x = q
    M = carry.proj
    if M is not None:  # x_t = M_t q_t: the chunk's causal part now, the carried M_0 in the loop
        kn = F.normalize(k, dim=-1)
        x = (q @ kn.mT).tril() @ kn
        sums = kn.mT @ kn  # [N, n, d, d]
    shortest = T if valid is None else int(valid.min())  # chunks before this one are full in every row
    valid = torch.full((N,), T, device=q.device) if valid is None else valid
    W, S, P = carry.value, carry.momentum, carry.value
    restarting = restart.any(0).tolist() if restart is not None else [False] * n
    ys = []
    for i in range(n):
        if restarting[i] and i > 0:
            assert restart is not None  # restarting is all False without it
            W, P = _pick(restart[:, i], carry.value, W), _pick(restart[:, i], carry.value, P)
            S = None if S is None or carry.momentum is None else _pick(restart[:, i], carry.momentum, S)
            M = None if M is None or carry.proj is None else torch.where(restart[:, i, None, None], carry.proj, M)
        xi = x[:, i] if M is None else x[:, i] + q[:, i] @ M  # M symmetric
        grads = mlp_grads(W, k[:, i], v[:, i])
        ai, ci = a[:, i], c[:, i]
        bi = None if b is None else b[:, i]
        ys.append(mlp_apply(W, xi) if read == "start" else _read_after(W, S, grads, xi, ai, bi, ci))
        full_everywhere = (i + 1) * chunk <= shortest
        end = None  # full everywhere: the chunk's last row; no masking
        if not full_everywhere:
            left = (valid - i * chunk).clamp(0, chunk)  # this chunk's valid tokens per row
            end = left.clamp_min(1) - 1
        a_e, c_e = _at_end(ai, end), _at_end(ci, end)
        W_new: Weights = tuple(
            a_e[:, None, None] * w - torch.einsum("nl,nlo,nli->noi", c_e, dl, u) for w, (dl, u) in zip(W, grads)
        )
        S_new: Weights | None = None
        if S is not None:
            assert bi is not None and e is not None and e0 is not None  # the momentum's coefficients
            b_e, e_e, e0_e = _at_end(bi, end), _at_end(e[:, i], end), _at_end(e0[:, i], end)
            W_new = tuple(wn + b_e[:, None, None] * s for wn, s in zip(W_new, S))
            S_new = tuple(
                e0_e[:, None, None] * s - torch.einsum("nl,nlo,nli->noi", e_e, dl, u) for s, (dl, u) in zip(S, grads)
            )
        if full_everywhere:
            P, W, S = W_new, W_new, S_new
        else:
            has, full = left > 0, left == chunk
            P = _pick(has, _pick(full, W_new, W), P)
            W, S = _pick(has, W_new, W), (None if S_new is None or S is None else _pick(has, S_new, S))
        if M is not None:
            M = M + sums[:, i]  # padding keys are zero
    y = torch.cat(ys, 1).view(N, n * chunk, d)[:, :T]
    return y, MemoryCarry(P, W, S, M, carry.pos + T)


def memory_step(
    carry: MemoryCarry,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    theta: torch.Tensor,
    log_beta: torch.Tensor | None,
    log_gamma: torch.Tensor | None,
    *,
    chunk: int,
    read: str,
) -> tuple[torch.Tensor, MemoryCarry]:
    """One token (q, k, v [N, d], gates [N]): the per-token recurrence with the gradient at the chunk-start
    point, the read after (or before, read="start") the update; the point moves at chunk ends."""
    P, W, S, M = carry.point, carry.value, carry.momentum, carry.proj
    x = q
    if M is not None:
        kn = F.normalize(k, dim=-1)
        M = M + kn[:, :, None] * kn[:, None, :]
        x = (M @ q[:, :, None])[..., 0]
    grads = [(dl[:, 0, :, None] * u[:, 0, None, :]) for dl, u in mlp_grads(P, k[:, None], v[:, None])]
    th = theta[:, None, None]
    if S is not None:
        assert log_beta is not None  # a momentum comes with its gate
        S = tuple(log_beta.exp()[:, None, None] * s - th * g for s, g in zip(S, grads))
        step = S
    else:
        step = tuple(-th * g for g in grads)
    gam = 1.0 if log_gamma is None else log_gamma.exp()[:, None, None]
    W = tuple(gam * w + s for w, s in zip(W, step))
    y = mlp_apply(W if read == "after" else P, x[:, None])[:, 0]
    pos = carry.pos + 1
    return y, MemoryCarry(W if pos % chunk == 0 else P, W, S, M, pos)
