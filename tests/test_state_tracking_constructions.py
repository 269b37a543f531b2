"""Hand-set weights with which the recurrences track groups exactly, at any length, from a zero state: issue 20's
question of what blocks `unroll bench state-tracking` on S3, the recurrences' expressivity or learning.

1. A ParaGRU channel counts mod 3 (Z3, the part of S3 a parity flip-flop cannot do). A 1-D map needs a stable
   3-cycle, which a monotone map has none of; ParaGRU's is not monotone where its reset gate r = σ(a_r h + u_r)
   makes r·h hump-shaped. With the update gate shut (u_z = −20: f(h) = h) on a 0 and open (u_z = +20:
   f(h) = tanh(a_c r h + u_c)) on a 1, a = (0, −5.53, −9.90) and u_r = 3.22, u_c = 1.56 cycle h through three
   separated intervals (the orbit −0.86 → 1.00 → 0.59, superstable: tanh saturates). Such cycles need recurrent
   coefficients of |a| ≈ 5–10, against the initial [−0.5, 0.5]: of uniform draws of (a_r, u_r, a_c, u_c) in
   [−s, s]⁴, none in 2·10⁶ at s = 2 has a stable 3-cycle, 5·10⁻⁵ at s = 5, 2·10⁻³ at s = 10 (measured once, for
   the issue note). S3 = Z3 ⋊ Z2 then follows by a cascade (a parity channel for the sign; two such counters in
   a later layer for the rotations of +1 and of −1 given the sign, which the block's MLP can form from the sign
   and the token; a readout of the two counts), which this file does not build.
2. The M²RNN recurrence tracks S3 itself. One value head, K = 1, V = 37, forget gate f = 0, so
   H_t = tanh(H_{t−1} W + k v(x_t)ᵀ), saturated:

  - 36 "pair" units (g, σ), g the state (a permutation of range(3)) and σ the last token; exactly one is +1,
    the others −1. W can not depend on the token, so the pair unit carries it: W[(g, σ), (g', σ')] = α when
    g' = COMPOSE[g, σ'] (the unit (g', σ') is what (g, σ) becomes if the next token is σ'). Each (g', σ') has
    six such sources (one g per σ), so the pre-activation of (g', σ') is −6α + 2α·[it follows the active unit]
    + v(x)_(g', σ'), and v(x) = 5α on the units with σ' = x picks the one that follows the active unit and x.
  - a "started" unit s: from the zero state the first step has no active unit, so v(x) also carries +2α on the
    units (g, g) (after the first token x the state is x itself) and −6α everywhere; s turns on at the first
    step and stays on (W[s, s] = 2α, v_s = α), and W[s, ·] cancels those two terms from then on.
With α = 10, tanh(α) = 1 − 4e−9: the state stays at the corners, so the tracking does not degrade with length.
What this does not show: that training finds it (the bench's finding), or that the default head (V = 16, a
width this construction exceeds) can. The layer around the recurrence can supply these inputs: k, v are a
linear map of the token's embedding after a convolution (a delta) and SiLU (k large and v ≥ −0.28 give any
k·v); f → 0 as softplus(a + dt_bias) grows; the readout q_tᵀH_t with q = 1 is H_t itself.
"""

import itertools

import pytest
import torch

from unroll.kernels import sequential_solve
from unroll.kernels.m2rnn_scan import m2rnn_sequential
from unroll.launch.bench.state_tracking import S3_COMPOSE, s3_batch
from unroll.models.paragru import ParaGRUCell

ALPHA = 10.0
PAIRS = list(itertools.product(range(6), range(6)))  # (g, σ), unit index 6·g + σ
START = len(PAIRS)  # the started unit


def construction(compose: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(W [1, 37, 37], v per token [6, 37]) for the group given by compose[a, b] (a first, then b)."""
    V = START + 1
    W = torch.zeros(V, V, dtype=torch.float64)
    for g, sigma in PAIRS:
        for g2, sigma2 in PAIRS:
            if g2 == compose[g, sigma2]:
                W[6 * g + sigma, 6 * g2 + sigma2] = ALPHA
    v = torch.zeros(6, V, dtype=torch.float64)
    for x in range(6):
        for g2, sigma2 in PAIRS:
            first = 2 * ALPHA * (g2 == sigma2) - 6 * ALPHA  # the first step's terms, cancelled by s after it
            v[x, 6 * g2 + sigma2] = 5 * ALPHA * (sigma2 == x) + first
            W[START, 6 * g2 + sigma2] = -first
        v[x, START] = ALPHA
    W[START, START] = 2 * ALPHA
    return W.unsqueeze(0).to(dtype), v.to(dtype)


def track(tokens: torch.Tensor, W: torch.Tensor, v_table: torch.Tensor) -> torch.Tensor:
    """The recurrence over the tokens [B, T], and the state each step decodes to [B, T]."""
    B, T = tokens.shape
    dtype = W.dtype
    ones = torch.ones(B, T, 1, 1, dtype=dtype)
    v = v_table[tokens].unsqueeze(2)  # [B, T, H = 1, V]
    f = torch.zeros(B, T, 1, dtype=dtype)
    y, _ = m2rnn_sequential(ones, ones, v, f, W)  # q = k = 1, h0 = 0
    pairs = y[:, :, 0, :START].unflatten(-1, (6, 6))  # [B, T, g, σ]
    return pairs.sum(-1).argmax(-1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_the_m2rnn_recurrence_tracks_s3_exactly_at_any_length(dtype):
    x, y = s3_batch(32, 1024, torch.Generator().manual_seed(0))
    W, v = construction(S3_COMPOSE, dtype)
    assert torch.equal(track(x, W, v), y)  # every position of 32 words of 1024 tokens (32× the bench's length)


def test_the_construction_follows_the_order_of_composition():
    # S3 is not abelian: composing in the other order (b first, then a) is a different task, which this
    # construction tracks instead; the two agree on a word only by chance
    x, y = s3_batch(32, 64, torch.Generator().manual_seed(1))
    W, v = construction(S3_COMPOSE.T, torch.float64)
    assert (track(x, W, v) == y).float().mean() < 0.5


def test_one_paragru_channel_counts_mod_3_at_any_length():
    bits = torch.randint(0, 2, (64, 2000), generator=torch.Generator().manual_seed(0)).double()
    u = torch.stack([20 * (2 * bits - 1), torch.full_like(bits, 3.22), torch.full_like(bits, 1.56)], -1)
    a = torch.tensor([[0.0], [-5.53], [-9.90]], dtype=torch.float64)  # (a_z, a_r, a_c), one channel
    h, _ = sequential_solve(ParaGRUCell(a), u.unsqueeze(-1), torch.zeros(64, 1, dtype=torch.float64))
    h = h[..., 0]
    count = bits.cumsum(1) % 3
    # each count keeps to its own interval (measured: [−0.87, 0], [0.92, 1.00], [0.31, 0.58]), 0.1 apart at least
    decoded = torch.where(h < 0.15, 0, torch.where(h > 0.75, 1, 2))
    assert torch.equal(decoded, count.long())
    assert bool((h[count == 1] > 0.85).all() and (h[count == 2] < 0.65).all() and (h[count == 2] > 0.25).all())
