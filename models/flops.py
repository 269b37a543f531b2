"""Training FLOPs per token of a model config, layer by layer: what `unroll info` prints, what the per-step
`tflops_per_gpu` and `mfu` come from (train/mfu.py), and what `unroll bench throughput` reports beside tokens/s.

The convention is Megatron-LM's and PaLM's for MFU, made exact for these layers:

- A matmul of m×k by k×n costs 2·m·k·n forward, and its backward twice that (gradients of both operands):
  training = 3 × forward. So a weight a token goes through once, as a multiply-add, costs 6 FLOPs per
  token: `mixer_weights` and `mlp_weights` = 6 × the weights of the layer's linear maps (and M²RNN's depthwise convolution), of an
  MoE the router and the top_k routed experts a token is sent to (plus any shared ones), and of the LM head
  (a tied embedding counted once, as the head: the input lookup is no matmul). Biases, norm gains and the
  recurrences' own coefficients are not weights of a matmul; TNT's learned initial memories neither.
- Attention scores and values: 4·heads·head_dim forward per query and key it sees (q·k and p·v), so
  12·heads·head_dim·T_eff per token, with causal halving: T_eff is the mean number of keys a query sees,
  (T + 1)/2 for full attention over T tokens, fewer with a window. A row's documents are not counted apart.
- Elementwise work (norms, activations, rotary, softmax, residuals, gates) is not counted, except inside
  the recurrences, where it is the work: there each arithmetic operation, sigmoid or tanh counts 1.
  Products of two activations (M²RNN's k vᵀ and qᵀH, TNT's memory reads and updates) are matmuls.
- Recomputation (activation checkpointing, the chunked loss's logits) is not counted: model FLOPs, as MFU
  defines them.

Recurrences (ParaGRU, ParaLSTM, M²RNN) per token, with E one cell evaluation, J the extra work of its
Jacobian, S one step of the linear scan h = a·h + b at its sequential cost, N the state elements (`CellCost`,
counted as the cells in models/ compute them), as kernels/newton.py runs them:

    backward (the adjoint, either solver):  4E + J + S    the cell applied once more for autograd (E), its
                                                          Jacobians (E + J), the reverse scan (S), the VJP (2E)
    sequential loop:                        E + backward
    Newton, n iterations:                   E + (n + 1)·(E + J + 5N) + n·(S + 2N) + backward
        the first guess, then a pass per iteration and one to find it converged (value with Jacobian, the
        residual |f − h| / (1 + |f|)), and per iteration the scan and the update (f − h, h + δ).

M²RNN's sequential kernel is differentiated through its loop instead: 3E. The iterations are the ones each
layer's last solve reports (SolveInfo.iterations, where 0 means the sequential loop), so a run's figure
follows its solver; before a run the sequential figure and Newton's cost per iteration are given. The
sequences a Newton solve redoes sequentially (SolveInfo.fallback) and the sequence-parallel solver's extra
work are not counted.

TNT memories (kernels/memory.py, chunk C, per head of width d, hidden width h = expansion·d): per token the
per-token gradients at the chunk-start weights, the read (at the chunk start, or after the update: a causal
C×C product per layer), the chunk-end weight and momentum updates, the momentum's C×C decay coefficients and
the local memories' query projection — all matmuls, written out in `memory_forward`, ×3 for training (the
decay's ×2 without forgetting, its other factor then being a constant).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from unroll.models.config import MIXER_CHARS, MLP_CHARS, ModelConfig


@dataclass(frozen=True)
class CellCost:
    """One recurrence unit's work per token, in FLOPs: a cell evaluation, the extra work when its Jacobian comes
    with the value, one step of the linear scan (at its sequential cost), and the unit's state elements."""

    evaluate: int
    jacobian: int
    scan: int
    state: int


# Per channel, as models/paragru.py computes them. Cell: z, r 3 each (a·h + u, σ), c 4, h + z(c − h) 3.
# Jacobian: z', r' 3 each, c' 6, 1 − z + z'(c − h) + z c' 6. Scan: a·h + b.
PARAGRU = CellCost(evaluate=13, jacobian=18, scan=2, state=1)
# Per channel, state (c, h), as models/paralstm.py computes them. Cell: f 5, c̃ 3, c 4, o 5, o·tanh(c) 2.
# Jacobian: f(1 − f) 2, ∂c/∂c₋ 4, ∂c/∂h₋ 9, o(1 − o) 2, o(1 − tanh²c) 3, ∂h/∂c₋ 5, ∂h/∂h₋ 6. Scan: a 2×2 block.
PARALSTM = CellCost(evaluate=19, jacobian=31, scan=8, state=2)


def m2rnn_row_cost(v: int) -> CellCost:
    """Per row of a head's K×V state (the Newton layout's unit, models/m2rnn.py M2RNNCell): the cell is the row
    times W (2V²), + k vᵀ's row, tanh, f·h + (1 − f)·c (5V + 1); the Jacobian f·I + (1 − f)(1 − c²)·Wᵀ as
    the cell builds it, dense (3V² + 3V + 1); the scan a V×V block."""
    return CellCost(evaluate=2 * v * v + 5 * v + 1, jacobian=3 * v * v + 3 * v + 1, scan=2 * v * v, state=v)


@dataclass(frozen=True)
class RecurrenceFlops:
    """Training FLOPs per token of one layer's recurrence, by how it was solved (see the module docstring)."""

    sequential: float
    newton_base: float  # Newton with no iteration taken (its first guess checked and kept)
    per_iteration: float

    def at(self, iterations: int) -> float:
        """At SolveInfo.iterations: 0 is the sequential loop (as the solvers report it)."""
        return self.sequential if iterations == 0 else self.newton_base + iterations * self.per_iteration


def adjoint_recurrence(cell: CellCost, units: int) -> RecurrenceFlops:
    """`units` independent cells (channels, or M²RNN rows) solved by kernels/newton.py with its adjoint backward."""
    E, J, S, N = (units * x for x in (cell.evaluate, cell.jacobian, cell.scan, cell.state))
    backward = 4 * E + J + S
    newton_pass = E + J + 5 * N
    return RecurrenceFlops(
        sequential=E + backward,
        newton_base=E + newton_pass + backward,
        per_iteration=newton_pass + S + 2 * N,
    )


@dataclass(frozen=True)
class LayerFlops:
    """One block's training FLOPs per token, by part."""

    layer: int
    mixer: str  # the pattern character
    mlp: str  # the MLP character
    mixer_weights: float  # 6 × the mixer's matmul weights
    mlp_weights: float  # 6 × the MLP's weights a token goes through
    mixing: float  # attention scores and values, TNT memories, M²RNN's k vᵀ and qᵀH
    recurrence: RecurrenceFlops | None = None

    def total(self, iterations: int = 0) -> float:
        solve = self.recurrence.at(iterations) if self.recurrence is not None else 0.0
        return self.mixer_weights + self.mlp_weights + self.mixing + solve


@dataclass(frozen=True)
class ModelFlops:
    """A model's training FLOPs per token at sequence length `seq_len`."""

    seq_len: int
    head: float  # 6 × the LM head's weights
    layers: list[LayerFlops] = field(default_factory=list)

    def per_token(self, iterations: Mapping[int, int] | None = None) -> float:
        """With each recurrent layer at its Newton iterations (`iterations[layer]`, 0 = the sequential loop);
        a layer missing from `iterations` (one a pipeline stage elsewhere ran) counts at the mean of the given
        layers of its kind, or, with none given, at the sequential loop."""
        return self.head + sum(layer.total(n) for layer, n in zip(self.layers, self._filled(iterations or {})))

    def by_kind(self, iterations: Mapping[int, int] | None = None) -> dict[str, float]:
        """Per token by layer kind: each mixer kind (its weights, mixing and recurrence), each MLP kind, the head."""
        out: dict[str, float] = {}
        for layer, n in zip(self.layers, self._filled(iterations or {})):
            mixer, mlp = MIXER_CHARS[layer.mixer], f"{MLP_CHARS[layer.mlp]} mlp"
            out[mixer] = out.get(mixer, 0.0) + layer.total(n) - layer.mlp_weights
            out[mlp] = out.get(mlp, 0.0) + layer.mlp_weights
        return out | {"lm head": self.head}

    def _filled(self, iterations: Mapping[int, int]) -> list[int]:
        seen: dict[str, list[int]] = {}
        for i, n in iterations.items():
            seen.setdefault(self.layers[i].mixer, []).append(n)
        mean = {kind: round(sum(ns) / len(ns)) for kind, ns in seen.items()}
        return [iterations.get(i, mean.get(layer.mixer, 0)) for i, layer in enumerate(self.layers)]

    def as_dict(self) -> dict[str, Any]:
        newton = {i: 1 for i, layer in enumerate(self.layers) if layer.recurrence is not None}
        return {
            "seq_len": self.seq_len,
            "per_token": self.per_token(),  # the recurrences solved sequentially
            "per_token_newton_base": self.per_token(newton) - self.per_newton_iteration(),
            "per_newton_iteration": self.per_newton_iteration(),
            "by_kind": self.by_kind(),
            "head": self.head,
            "layers": [
                {
                    "layer": layer.layer,
                    "mixer": MIXER_CHARS[layer.mixer],
                    "mlp": MLP_CHARS[layer.mlp],
                    "mixer_weights": layer.mixer_weights,
                    "mlp_weights": layer.mlp_weights,
                    "mixing": layer.mixing,
                    "recurrence": None if layer.recurrence is None else vars(layer.recurrence),
                }
                for layer in self.layers
            ],
        }

    def per_newton_iteration(self) -> float:
        """What one more Newton iteration of every recurrent layer adds per token."""
        return sum(layer.recurrence.per_iteration for layer in self.layers if layer.recurrence is not None)


def attention_context(seq_len: int, window: int = 0) -> float:
    """T_eff: the mean number of keys a causal query sees in a row of seq_len tokens (window 0: all before it)."""
    if seq_len <= 0:
        return 0.0
    w = window or seq_len
    w = min(w, seq_len)
    # queries 0 .. w−1 see 1 .. w keys, the rest w each
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def memory_forward(d: int, depth: int, expansion: int, chunk: int, *, read: str, momentum: bool, project: bool) -> int:
    """Forward FLOPs per token and head of one TNT memory (kernels/memory.py chunk_memory), all matmuls."""
    h = expansion * d
    shapes = [(d, d)] if depth == 1 else [(h, d), (d, h)]  # (out, in) per layer
    mlp = sum(2 * o * i for o, i in shapes)
    grads = mlp + (2 * d * h if depth == 2 else 0)  # the MLP at the keys, and back through W₂ to W₁
    twice = 2 if momentum else 1  # the momentum's matmuls beside the weights'
    if read == "start":
        reading = mlp
    else:  # after the update: x W_tᵀ from the chunk-start weights (and momentum) + the causal C×C correction
        reading = sum(2 * twice * o * i + 2 * chunk * (i + o) for o, i in shapes)
    update = sum(2 * twice * o * i for o, i in shapes)  # Σ c δ uᵀ at the chunk's end (and the momentum's)
    decay = momentum_decay(chunk) if momentum else 0
    projection = 4 * chunk * d + 4 * d * d if project else 0  # (q knᵀ) kn in the chunk, q M, Σ knᵀ kn
    return grads + reading + update + decay + projection


def momentum_decay(chunk: int) -> int:
    """Forward FLOPs per token and head of the momentum's decay coefficients Γ·E and Γ·e₀ (C×C per chunk)."""
    return 2 * chunk * chunk + 2 * chunk


def _mixer(kind: str, cfg: ModelConfig, seq_len: int) -> tuple[int, float, RecurrenceFlops | None]:
    """(matmul weights, mixing FLOPs, recurrence) of one mixer per token."""
    d = cfg.d_model
    if kind in ("G", "L"):
        width = cfg.rnn_dim
        weights = 3 * width * d // cfg.rnn_heads + width * d  # block-diagonal in_proj, out_proj
        return weights, 0.0, adjoint_recurrence(PARAGRU if kind == "G" else PARALSTM, width)
    if kind == "M":
        m, H = cfg.m2rnn, cfg.m2rnn_v_heads
        K, V, G = m.k_dim, m.v_dim, m.qk_heads
        conv = 2 * G * K + H * V
        weights = d * (conv + H + H * V) + conv * m.conv + H * V * d  # in_proj, depthwise conv, out_proj
        recurrence = adjoint_recurrence(m2rnn_row_cost(V), H * K)
        if m.solver != "newton":  # sequential (auto too): autograd through the loop
            recurrence = replace(recurrence, sequential=3 * H * K * m2rnn_row_cost(V).evaluate)
        return weights, 3 * H * (2 * K * V + 2 * K * V), recurrence  # k vᵀ and qᵀH per value head
    if kind == "T":
        t = cfg.tnt
        hd = t.head_dim or d // t.heads
        gates = t.heads * (1 + t.momentum + t.forget)
        n_memories = len(t.local_chunks) + (1 if t.global_chunk else 0)
        weights = d * 4 * t.heads * hd + d * n_memories * gates + t.heads * hd * d  # in_proj, gates, out_proj
        memories = [(t.global_chunk, "start", False)] if t.global_chunk else []
        memories += [(c, "after", t.qk_project) for c in t.local_chunks]
        per_head = sum(
            3 * memory_forward(hd, t.layers, t.expansion, c, read=r, momentum=t.momentum, project=p)
            # without forgetting Γ is a constant: its products get one gradient, not two
            - (momentum_decay(c) if t.momentum and not t.forget else 0)
            for c, r, p in memories
        )
        return weights, t.heads * per_head, None
    if kind == "A":
        hd, H = cfg.attn_head_dim, cfg.n_heads
        weights = d * (H + 2 * cfg.kv_heads) * hd + H * hd * d
        return weights, 12 * H * hd * attention_context(seq_len, cfg.window), None
    raise ValueError(f"unknown layer kind {kind!r}")


def _mlp_weights(kind: str, cfg: ModelConfig) -> int:
    d = cfg.d_model
    if kind == "E":
        m = cfg.moe
        shared = m.shared_experts * (m.shared_hidden or m.hidden)
        return d * m.experts + m.top_k * 3 * d * m.hidden + 3 * d * shared  # router, routed, shared experts
    return 3 * d * cfg.mlp_width


def model_flops(cfg: ModelConfig, seq_len: int) -> ModelFlops:
    """Training FLOPs per token of `cfg` on rows of seq_len tokens (attention's context depends on it)."""
    layers = []
    for i, (kind, mlp) in enumerate(zip(cfg.layers, cfg.mlp_kinds)):
        weights, mixing, recurrence = _mixer(kind, cfg, seq_len)
        layers.append(LayerFlops(i, kind, mlp, 6.0 * weights, 6.0 * _mlp_weights(mlp, cfg), mixing, recurrence))
    return ModelFlops(seq_len, 6.0 * cfg.d_model * cfg.vocab_size, layers)


def _g(x: float) -> str:
    return f"{x / 1e9:,.3f} GFLOP" if x >= 1e8 else f"{x / 1e6:,.3f} MFLOP"


def format_flops(f: ModelFlops) -> str:
    """The `unroll info` lines: the total, Newton's cost per iteration, and each kind's share."""
    counts: dict[str, int] = {}
    for layer in f.layers:
        for kind in (MIXER_CHARS[layer.mixer], f"{MLP_CHARS[layer.mlp]} mlp"):
            counts[kind] = counts.get(kind, 0) + 1
    total = f.per_token()
    lines = [f"  training FLOPs per token (forward + backward, sequence {f.seq_len}; models/flops.py): {_g(total)}"]
    if f.per_newton_iteration():
        d = f.as_dict()
        lines.append(
            f"    recurrences at the sequential loop; Newton: {_g(d['per_token_newton_base'])} + "
            f"{_g(d['per_newton_iteration'])} per iteration (a run logs the iterations it takes)"
        )
    for kind, flops in f.by_kind().items():
        layers = f"{counts[kind]:3d} layer(s)" if kind in counts else ""
        lines.append(f"    {kind:12} {layers:12} {_g(flops):>16}  {100 * flops / total:5.1f}%")
    return "\n".join(lines)
