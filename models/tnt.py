"""TNT (Li et al., 2025, "TNT: Improving Chunkwise Training for Test-Time Memorization"): a hierarchy of
test-time memories, each an MLP trained per token on ‖M(k) − v‖² (kernels/memory.py has the update and
its chunkwise form). Per head (q, k L2-normalised, v, all width d) and per token t:

    global memory V, chunk C_G:      gradients at V's chunk-start value, read at the chunk start
    local memories W⁽ⁱ⁾, chunks C_L⁽ⁱ⁾: gradients at W⁽ⁱ⁾'s chunk-start value, read after token t's update,
                                      reset to a learned W_init⁽ⁱ⁾ every S_L tokens (t ≡ 0 mod S_L)
    o_t = V_{ξ(t,C_G)}(q_t) + Σ_i W⁽ⁱ⁾_t(M_t q_t),   M_t = Σ_{τ=ξ(t,S_L)}^{t} k_τ k_τᵀ/‖k_τ‖²
    out = W_o · (RMSNorm(o) ⊙ SiLU(W_g x))

ξ(t, C) = C·⌊t/C⌋ is the start of t's chunk. Our reading of the paper, precisely:
  - "read at the chunk start" (global): o_t uses V after every token *before* t's chunk, none of the
    chunk's own tokens (with C_G = 1: V_{t−1}, read before the update).
  - "read after the update" (local): W_t = W_{ξ} − Σ_{τ=ξ..t} (momentum/forget-weighted) θ_τ ∇ℓ_τ(W_{ξ}),
    i.e. the chunk's tokens up to and including t, every gradient at the chunk-start weights W_{ξ}
    (with C_L = 1: the plain per-token recurrence, read after writing).
  - chunks of a local memory restart at each reset (C_L must divide S_L); M_t includes k_t.
  - the memories share q, k, v; each has its own per-token step θ = max_step·σ(·), momentum β = σ(·)
    and forget α = σ(·) (projections of x), and its own learned initial weights.
With no global memory (global_chunk = 0), one local memory of chunk C, no reset and no projection, this is
plain chunkwise Titans (a test checks it against an independent implementation).

Training runs the chunkwise kernel: the local memories' shards are independent after a reset, so all
shards of all sequences run as one batch, and only S_L / C_L chunk steps are sequential; the global
memory takes T / C_G steps. `step` (and a forward from a state that is not at every memory's chunk and
shard boundary) runs the per-token recurrence.

Context parallelism: rank r holds tokens [r·T/R, (r+1)·T/R); S_L and C_G must divide T/R, so every
rank's slice starts with fresh local memories (nothing exchanged) and at a global chunk boundary; the
global memory's state (weights and momentum) is handed rank to rank (kernels/context.py). Each rank runs
its local memories first, so only the global pass waits on the previous rank. With isolated documents a
rank gathers the slices and runs the documents that reach into its own whole (TNT._documents).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import overload

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed import ProcessGroup

from unroll.kernels.context import gather_flags, gather_sequence, receive_state, send_state
from unroll.kernels.memory import MemoryCarry, chunk_memory, memory_step
from unroll.models.context_parallel import ContextParallel
from unroll.models.document_lanes import document_lanes
from unroll.models.init import Rule, constant, init_eagerly, normal


@dataclass
class TNTState:
    memories: list[MemoryCarry]  # the global memory first (if any), then the local ones; rows = batch × heads


@dataclass(frozen=True)
class MemorySpec:
    name: str  # "global" or "local{i}"
    chunk: int
    reset: int  # S_L; 0 = never
    read: str  # "start" | "after"
    project: bool
    local: int = -1  # index among the local memories; -1 = the global memory


# One memory's per-token gates [B·H, T]: θ (step), log β (momentum; None without), log γ (forget; None without)
Gates = tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]


def _shards(t: torch.Tensor, size: int, n: int) -> torch.Tensor:
    """[N, T, ...] → [N·n, size, ...]: the sequence cut into n shards (the last one padded with zeros)."""
    pad = n * size - t.shape[1]
    return torch.unflatten(F.pad(t, (0, 0) * (t.dim() - 2) + (0, pad)), 1, (n, size)).flatten(0, 1)


@overload
def _last_shard(t: torch.Tensor, n: int) -> torch.Tensor: ...
@overload
def _last_shard(t: tuple[torch.Tensor, ...], n: int) -> tuple[torch.Tensor, ...]: ...
@overload
def _last_shard(t: None, n: int) -> None: ...
def _last_shard(
    t: torch.Tensor | tuple[torch.Tensor, ...] | None, n: int
) -> torch.Tensor | tuple[torch.Tensor, ...] | None:
    """Rows [N·n, ...] (or a tuple of them) → the last shard's rows [N, ...]."""
    if t is None or isinstance(t, tuple):
        return None if t is None else tuple(_last_shard(x, n) for x in t)
    return torch.unflatten(t, 0, (-1, n))[:, -1]


class TNT(ContextParallel, nn.Module):
    """Context parallelism: see the module docstring (the global memory's state is handed rank to rank)."""

    def __init__(
        self,
        d_model: int,
        *,
        heads: int = 4,
        head_dim: int = 0,
        layers: int = 2,
        expansion: int = 2,
        global_chunk: int = 64,
        local_chunks: tuple[int, ...] = (8,),
        local_reset: int = 64,
        qk_project: bool = True,
        momentum: bool = True,
        forget: bool = True,
        max_step: float = 0.1,
        norm_eps: float = 1e-5,
        init_std: float = 0.02,
        out_std: float | None = None,
    ):
        super().__init__()
        d = head_dim or d_model // heads
        self.heads, self.head_dim, self.depth = heads, d, layers
        self.momentum, self.forget, self.max_step = momentum, forget, max_step
        self.specs = ([MemorySpec("global", global_chunk, 0, "start", False)] if global_chunk else []) + [
            MemorySpec(f"local{i}", c, local_reset, "after", qk_project, i) for i, c in enumerate(local_chunks)
        ]
        if not self.specs:
            raise ValueError("TNT needs a global memory (global_chunk > 0) or at least one local memory")
        for s in self.specs:
            if s.reset and s.reset % s.chunk:
                raise ValueError(f"local chunk {s.chunk} does not divide the reset period {s.reset}")
        # isolated documents start on multiples of every chunk and reset period (see _documents)
        self.align = math.lcm(*(s.reset or s.chunk for s in self.specs))
        self.n_gates = 1 + momentum + forget
        width = heads * d
        self.in_proj = nn.Linear(d_model, 4 * width, bias=False)  # q k v | output gate
        n_local = len(local_chunks)
        self.global_gates = nn.Linear(d_model, heads * self.n_gates) if global_chunk else None
        self.local_gates = nn.Linear(d_model, n_local * heads * self.n_gates) if n_local else None
        shapes = [(d, d)] if layers == 1 else [(expansion * d, d), (d, expansion * d)]
        self.global_init = (
            nn.ParameterList(nn.Parameter(torch.empty(heads, *s)) for s in shapes) if global_chunk else None
        )
        self.local_init = nn.ParameterList(nn.Parameter(torch.empty(heads, *s)) for _ in range(n_local) for s in shapes)
        self.norm = nn.RMSNorm(width, eps=norm_eps)
        self.out_proj = nn.Linear(width, d_model, bias=False)
        self.init_std, self.out_std = init_std, out_std or init_std
        init_eagerly(self)

    def init_rules(self) -> dict[str, Rule]:
        """Initial memories: 1 layer W = 0 (an empty linear memory); 2 layers W₁ ~ N(0, 1/d), W₂ ~ N(0, 0.1²/h)
        (near the identity through the residual). Gate projections start at zero weight; biases give
        θ = max_step/2, β = 1/2 and α = σ(−4) ≈ 0.018 (the forget gate is the last of each head's gates)."""
        rules = {"in_proj.weight": normal(self.init_std), "out_proj.weight": normal(self.out_std)}
        for prefix, params in (("global_init", self.global_init), ("local_init", self.local_init)):
            for j, p in enumerate(params or ()):
                std = (1.0 if j % 2 == 0 else 0.1) / math.sqrt(p.shape[-1])
                rules[f"{prefix}.{j}"] = constant(0.0) if self.depth == 1 else normal(std)
        n_gates, forget = self.n_gates, self.forget
        bias = Rule(lambda d: torch.where((d.coordinate(0) % n_gates == n_gates - 1) & forget, -4.0, 0.0))
        for name in ("global_gates", "local_gates"):
            if getattr(self, name) is not None:
                rules |= {f"{name}.weight": constant(0.0), f"{name}.bias": bias}
        return rules

    def state_elements(self) -> int:
        """Per sequence, what generation carries: each memory's chunk-start and current weights, momentum
        and (local memories) the d×d query projection, for every head."""
        d = self.head_dim
        per: int = sum(p[0].numel() for p in (self.global_init or self.local_init)[: self.depth])
        return self.heads * sum((2 + self.momentum) * per + (d * d if s.project else 0) for s in self.specs)

    # ------------------------------------------------------------------------------------------------
    def initial_weights(self, i: int) -> list[torch.Tensor]:
        """The learned initial weights of memory i (self.specs[i]), one [heads, ...] tensor per MLP layer."""
        j = self.specs[i].local * self.depth
        if j < 0:
            assert self.global_init is not None  # a global memory spec exists only with its weights
            return list(self.global_init)
        return list(self.local_init[j : j + self.depth])

    def _fresh(self, i: int, B: int, dtype: torch.dtype, shards: int = 1) -> MemoryCarry:
        """The initial carry for rows (batch, head, shard)."""
        w = tuple(
            p.to(dtype)[None, :, None].expand(B, -1, shards, -1, -1).flatten(0, 2) for p in self.initial_weights(i)
        )
        S = tuple(torch.zeros_like(t) for t in w) if self.momentum else None
        d = self.head_dim
        M = w[0].new_zeros(w[0].shape[0], d, d) if self.specs[i].project else None
        return MemoryCarry(w, w, S, M, 0)

    def _inputs(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[Gates]]:
        """x [B, T, d_model] → q, k, v [B·H, T, d], output gate g [B, T, H·d], per memory (θ, log β, log γ)
        [B·H, T] each, in at least float32 (the memory's updates compound over time)."""
        B, T, _ = x.shape
        H, d = self.heads, self.head_dim
        dtype = torch.promote_types(x.dtype, torch.float32)
        q, k, v, g = self.in_proj(x).to(dtype).split(H * d, dim=-1)

        def fold(t: torch.Tensor) -> torch.Tensor:  # [B, T, H·...] -> [B·H, T, ...]
            return torch.unflatten(t, -1, (H, -1)).transpose(1, 2).flatten(0, 1)

        q, k, v = F.normalize(fold(q), dim=-1), F.normalize(fold(k), dim=-1), fold(v)
        raw = [self.global_gates(x)] if self.global_gates is not None else []
        if self.local_gates is not None:
            raw += list(self.local_gates(x).chunk(len(self.specs) - len(raw), dim=-1))
        gates: list[Gates] = []
        for r in raw:
            r = fold(r.to(dtype))  # [B·H, T, gates]
            theta = self.max_step * torch.sigmoid(r[..., 0])
            log_beta = F.logsigmoid(r[..., 1]) if self.momentum else None
            log_gamma = F.logsigmoid(-r[..., -1]) if self.forget else None
            gates.append((theta, log_beta, log_gamma))
        return q, k, v, g, gates

    def _aligned(self, state: TNTState) -> bool:
        """Whether every memory of `state` stands at a chunk boundary (local ones with resets: at a shard's
        start or end), so that the chunkwise kernel can go on from it."""
        return all(c.pos % (s.reset or s.chunk) == 0 for s, c in zip(self.specs, state.memories))

    def _run_local(
        self,
        i: int,
        carry: MemoryCarry | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: Gates,
        B: int,
        restart: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, MemoryCarry]:
        """A local memory over the whole slice: with resets, every shard of every sequence as one batch."""
        spec, (N, T, _) = self.specs[i], q.shape
        if not spec.reset:
            carry = carry or self._fresh(i, B, q.dtype)
            return chunk_memory(carry, q, k, v, *gates, chunk=spec.chunk, read=spec.read, restart=restart)
        S_L = spec.reset
        n = -(-T // S_L)
        theta, log_beta, log_gamma = (None if g is None else _shards(g, S_L, n) for g in gates)
        assert theta is not None  # the step size is a gate of every memory
        valid = (T - torch.arange(n, device=q.device) * S_L).clamp(max=S_L).repeat(N)
        y, c = chunk_memory(
            self._fresh(i, B, q.dtype, n),
            _shards(q, S_L, n),
            _shards(k, S_L, n),
            _shards(v, S_L, n),
            theta,
            log_beta,
            log_gamma,
            chunk=spec.chunk,
            read=spec.read,
            valid=valid,
        )
        last = MemoryCarry(
            _last_shard(c.point, n),
            _last_shard(c.value, n),
            _last_shard(c.momentum, n),
            _last_shard(c.proj, n),
            T - (n - 1) * S_L,
        )
        return torch.unflatten(y, 0, (N, n)).flatten(1, 2)[:, :T], last

    def _run_global(
        self,
        i: int,
        carry: MemoryCarry | None,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        gates: Gates,
        B: int,
        group: ProcessGroup | None,
        restart: torch.Tensor | None = None,
    ) -> tuple[tuple[torch.Tensor, MemoryCarry], torch.Tensor | None]:
        """The global memory over the slice; under context parallelism (`group`), from the state the previous
        rank hands on, and handing its own on."""
        spec = self.specs[i]
        carry = carry or self._fresh(i, B, q.dtype)
        if group is None:
            return chunk_memory(carry, q, k, v, *gates, chunk=spec.chunk, read=spec.read, restart=restart), None
        # the previous rank's final weights and momentum in (rank 0: the initial ones); ours go out after
        parts = carry.value + (carry.momentum or ())
        packed = receive_state(torch.cat([p.flatten(1) for p in parts], 1), group)
        parts = tuple(t.view_as(p) for t, p in zip(torch.split(packed, [p[0].numel() for p in parts], 1), parts))
        w, s = parts[: self.depth], parts[self.depth :] or None
        y, carry = chunk_memory(
            MemoryCarry(w, w, s, None, carry.pos), q, k, v, *gates, chunk=spec.chunk, read=spec.read
        )
        out_parts = carry.value + (carry.momentum or ())
        return (y, carry), send_state(torch.cat([p.flatten(1) for p in out_parts], 1), group)

    def _check_context(self, T: int, state: TNTState | None) -> None:
        for s in self.specs:
            if s.name == "global" and T % s.chunk:
                raise ValueError(
                    f"TNT under context parallelism: the global chunk {s.chunk} must divide the "
                    f"per-rank sequence length {T}"
                )
            if s.name != "global" and (not s.reset or T % s.reset):
                raise ValueError(
                    f"TNT under context parallelism: the local reset period {s.reset} must be "
                    f"positive and divide the per-rank sequence length {T}"
                )
        if state is not None:
            raise ValueError("TNT under context parallelism starts from the initial state only")

    @overload
    def forward(self, x: torch.Tensor, state: TNTState | None = None) -> tuple[torch.Tensor, TNTState]: ...

    @overload
    def forward(
        self, x: torch.Tensor, state: TNTState | None, resets: torch.Tensor
    ) -> tuple[torch.Tensor, TNTState | None]: ...

    def forward(
        self, x: torch.Tensor, state: TNTState | None = None, resets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, TNTState | None]:
        """x: [B, T, d_model] → (y [B, T, d_model], state after the last token). resets [B, T]: every memory,
        local and global, restarts from its initial weights at a document's first token (see _documents);
        the state after a packed row is then not returned (None)."""
        if resets is not None:
            return self._documents(x, state, resets), None
        return self._run(x, state)

    def _run(
        self, x: torch.Tensor, state: TNTState | None, starts: torch.Tensor | None = None, whole: bool = False
    ) -> tuple[torch.Tensor, TNTState]:
        """forward without resets; starts [B, T] (documents laid out in lanes, each on a multiple of
        self.align): the memories restart there. whole: the rows hold whole documents, also under context
        parallelism (nothing is handed between ranks)."""
        B, T, _ = x.shape
        q, k, v, g, gates = self._inputs(x)
        if state is not None and not self._aligned(state):
            return self._tokens(x, q, k, v, g, gates, state)
        group = None if whole else self.context_group
        if group is not None:
            self._check_context(T, state)
        carries: list[MemoryCarry | None] = [*state.memories] if state is not None else [None] * len(self.specs)
        o: torch.Tensor | None = None
        new: dict[int, MemoryCarry] = {}
        handoff = None
        order = [i for i, s in enumerate(self.specs) if s.name != "global"] + [
            i for i, s in enumerate(self.specs) if s.name == "global"
        ]  # locals first: no waiting on other ranks
        for i in order:
            if self.specs[i].name == "global":
                restart = self._restarts(i, starts)
                (y, new[i]), handoff = self._run_global(i, carries[i], q, k, v, gates[i], B, group, restart)
            else:
                y, new[i] = self._run_local(i, carries[i], q, k, v, gates[i], B, self._restarts(i, starts))
            o = y if o is None else o + y
        assert o is not None  # __init__ requires at least one memory
        out = self._output(o, g, B)
        if handoff is not None:
            out = out + handoff  # the backward receives the global state's gradient from the next rank
        return out, TNTState([new[i] for i in range(len(self.specs))])

    def _restarts(self, i: int, starts: torch.Tensor | None) -> torch.Tensor | None:
        """Memory i's restart per (row, head) and chunk where documents start (None for a memory with a
        periodic reset: its shards begin at every document already, self.align being their multiple)."""
        spec = self.specs[i]
        if starts is None or spec.reset:
            return None
        return starts[:, :: spec.chunk].repeat_interleave(self.heads, dim=0)

    def _documents(self, x: torch.Tensor, state: TNTState | None, resets: torch.Tensor) -> torch.Tensor:
        """The output for rows of packed documents, each document run alone from the initial memories, its
        chunks and local resets counted from its own first token: the documents are laid out in lanes, each
        starting on a multiple of every chunk and reset period (models/document_lanes.py), run with the
        memories restarting at each document's first chunk, and scattered back.

        Under context parallelism a document may begin on an earlier rank, and its memories' state where this
        rank's slice begins is mid-chunk and mid-period. So each rank gathers every rank's slice and runs the
        documents with a token in its own slice, each from its own first token (the part on earlier ranks
        again), and keeps its slice of the output; the gather's backward sums the inputs' gradients back to
        their ranks. The cost: each rank also runs the earlier part of its first document of each row (all
        of the rows before it when one document fills them) and holds the gathered input."""
        if self.context_group is not None:
            if state is not None:
                raise ValueError("TNT under context parallelism starts from the initial state only")
            return self._documents_over_context(x, resets, self.context_group)
        if x.shape[1] == 0:
            return self._run(x, None)[0]
        if state is not None and not bool(resets[:, 0].all()):
            raise NotImplementedError("TNT with document resets continues no state: reset every row at t = 0")
        lanes = document_lanes(resets, self.align)
        return lanes.scatter(self._run(lanes.gather(x), None, lanes.starts)[0])

    def _documents_over_context(self, x: torch.Tensor, resets: torch.Tensor, group: ProcessGroup) -> torch.Tensor:
        """_documents of this rank's slice [B, T] of rows split over `group` (its docstring says how)."""
        lo = torch.distributed.get_rank(group) * x.shape[1]
        hi = lo + x.shape[1]
        lanes = document_lanes(gather_flags(resets, group), self.align, (lo, hi))
        y = self._run(lanes.gather(gather_sequence(x, group, 1)), None, lanes.starts, whole=True)[0]
        return lanes.scatter(y)[:, lo:hi]

    def _output(self, o: torch.Tensor, g: torch.Tensor, B: int) -> torch.Tensor:
        o = torch.unflatten(o, 0, (B, self.heads)).transpose(1, 2).flatten(2)  # [B, T, H·d]
        out: torch.Tensor = self.out_proj((self.norm(o) * F.silu(g)).to(self.out_proj.weight.dtype))
        return out

    def _tokens(
        self,
        x: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        g: torch.Tensor,
        gates: list[Gates],
        state: TNTState | None,
    ) -> tuple[torch.Tensor, TNTState]:
        """The per-token recurrence over the slice, from `state` (None: the initial memories)."""
        B, T = x.shape[:2]
        carries = (
            list(state.memories) if state is not None else [self._fresh(i, B, q.dtype) for i in range(len(self.specs))]
        )
        outs: list[torch.Tensor] = []
        for t in range(T):
            o: torch.Tensor | None = None
            for i, spec in enumerate(self.specs):
                if spec.reset and carries[i].pos == spec.reset:
                    carries[i] = self._fresh(i, B, q.dtype)
                th, lb, lg = (None if z is None else z[:, t] for z in gates[i])
                assert th is not None  # the step size is a gate of every memory
                y, carries[i] = memory_step(
                    carries[i], q[:, t], k[:, t], v[:, t], th, lb, lg, chunk=spec.chunk, read=spec.read
                )
                o = y if o is None else o + y
            assert o is not None  # __init__ requires at least one memory
            outs.append(o)
        whole = torch.stack(outs, 1) if outs else q.new_zeros(q.shape)
        return self._output(whole, g, B), TNTState(carries)

    def step(self, x: torch.Tensor, state: TNTState | None) -> tuple[torch.Tensor, TNTState]:
        """One token by the per-token recurrence: x [B, d_model] → (y [B, d_model], state)."""
        x = x[:, None]
        q, k, v, g, gates = self._inputs(x)
        y, state = self._tokens(x, q, k, v, g, gates, state)
        return y[:, 0], state

    def extra_repr(self) -> str:
        mems = ", ".join(
            f"{s.name}(C={s.chunk}"
            + (f", reset={s.reset}" if s.reset else "")
            + (", qk-proj" if s.project else "")
            + ")"
            for s in self.specs
        )
        return (
            f"heads={self.heads}, head_dim={self.head_dim}, layers={self.depth}, momentum={self.momentum}, "
            f"forget={self.forget}, memories=[{mems}]"
        )
