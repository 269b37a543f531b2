"""The model's shape: everything needed to build an LM, nothing about how it is trained."""

from __future__ import annotations

from dataclasses import dataclass, field

# One character per layer (Megatron's hybrid pattern): G ParaGRU, L ParaLSTM, M M²RNN, A attention.
# `|` marks a pipeline-stage boundary and is ignored by the single-device model.
MIXER_CHARS = {"G": "paragru", "L": "paralstm", "M": "m2rnn", "A": "attention", "T": "tnt"}
RESERVED_CHARS: dict[str, str] = {}
# One character per layer for the MLP: D dense SwiGLU, E mixture of experts.
MLP_CHARS = {"D": "dense", "E": "moe"}
SOLVERS = ("auto", "newton", "sequential")
M2RNN_CONV_INITS = ("reference", "torch")
NEWTON_KERNELS = ("auto", "fused", "pytorch", "compiled")
NEWTON_DAMPINGS = ("none", "trust_region")  # kernels/newton_damping.py's DAMPINGS (no torch import here)
DOCUMENTS = ("isolated", "packed")
ATTENTION_KERNELS = ("auto", "sdpa", "flex")
MOE_SCORES = ("softmax", "sigmoid")


@dataclass
class M2RNNConfig:
    """The M²RNN mixer (Mishra et al., 2026): per value head a K×V matrix state."""

    k_dim: int = 64  # K: query/key width per q/k head, the state's rows
    v_dim: int = 16  # V: value width per value head, the state's columns (W is V×V)
    qk_heads: int = 1  # q/k heads, each shared by v_heads / qk_heads value heads
    v_heads: int = 0  # value heads; 0 = d_model // v_dim
    conv: int = 4  # causal depthwise convolution width on q, k, v (1 = none)
    solver: str = "auto"  # newton | sequential | auto (sequential: Triton on CUDA, PyTorch on CPU)
    conv_init: str = "reference"  # reference: N(0, init_std) as the authors' code; torch: U(±1/√conv)
    # clamp dL/dH carried back from later steps to [-c, c] at every step (sequential solver); None = off
    # (the authors train with 1; models/m2rnn.py says why it is off here)
    state_grad_clip: float | None = None


@dataclass
class TNTConfig:
    """TNT hierarchical test-time memory (Li et al., 2025); see models/tnt.py. A global memory on large chunks
    plus local memories on small chunks, reset every local_reset tokens. Plain chunkwise Titans:
    global_chunk=0, local_chunks=[C], local_reset=0, qk_project=false."""

    heads: int = 4
    head_dim: int = 0  # q/k/v width per head; 0 = d_model // heads
    layers: int = 2  # memory MLP depth: 1 (linear) or 2 (x + W2 SiLU(W1 x))
    expansion: int = 2  # 2-layer memory: hidden width = expansion * head_dim
    global_chunk: int = 64  # C_G; 0 = no global memory
    local_chunks: list[int] = field(default_factory=lambda: [8])  # C_L of each local memory
    local_reset: int = 64  # S_L: local memories reset every S_L tokens; 0 = never
    qk_project: bool = True  # local reads use the query projected onto the keys since the reset
    momentum: bool = True
    forget: bool = True
    max_step: float = 0.1  # the per-token step size is max_step * sigmoid(projection)


@dataclass
class MoEConfig:
    """Token-choice top-k MoE MLPs for the layers marked E in mlp_pattern."""

    experts: int = 8
    top_k: int = 2
    hidden: int = 256  # SwiGLU width of one routed expert
    shared_experts: int = 0  # experts every token goes through
    shared_hidden: int = 0  # their width; 0 = hidden
    score: str = "softmax"  # router score function: softmax | sigmoid
    aux_loss_coef: float = 0.0  # load-balancing auxiliary loss (Switch / DeepSeek)
    z_loss_coef: float = 0.0  # router z-loss
    bias_update_rate: float = 0.0  # auxiliary-loss-free balancing: expert-bias step per optimizer step


@dataclass
class ModelConfig:
    pattern: str = "GG"  # layer pattern string, e.g. "GGAG" or "GG|GG"
    vocab_size: int = 2048  # at least the tokenizer's vocabulary size (more rows: padding, e.g. to a multiple of 64)
    d_model: int = 256
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 64
    rnn_width: int = 0  # ParaGRU/ParaLSTM channels; 0 = d_model
    rnn_heads: int = 1  # heads of the block-diagonal input projection (1 = dense)
    # ParaGRU/ParaLSTM's own recurrent coefficients (their diagonal weights) start U(±rnn_init): small keeps the
    # recurrence contractive and Newton quick; state tracking wants larger (launch/bench/state_tracking.py)
    rnn_init: float = 0.5
    solver: str = "auto"  # recurrences: newton | sequential | auto (by device and shape)
    # Newton of ParaGRU/ParaLSTM layers: fused = the whole solve in one Triton launch and its backward in another
    # (kernels/fused_newton.py; a CUDA device); pytorch = kernels/newton.py's separate ops; compiled = those ops
    # through torch.compile, per piece (newton.py's compiled_pieces: for a CPU); auto = fused on CUDA, else pytorch.
    # Under context parallelism (kernels/seqpar_newton.py, ranks exchanging chunk summaries every iteration) there
    # is no fused kernel: fused and auto run the PyTorch ops there, compiled compiles them.
    newton_kernel: str = "auto"
    # Newton's damping (kernels/newton_damping.py): trust_region = where a step blows up, the Picard step there
    # and damped steps for that sequence (others: plain Newton, bit for bit) | none. The fused kernel takes plain
    # steps; with trust_region the sequences it leaves unsolved are solved again by the damped PyTorch Newton.
    newton_damping: str = "trust_region"
    n_heads: int = 4  # attention query heads
    n_kv_heads: int = 0  # attention key/value heads (GQA); 0 = n_heads
    head_dim: int = 0  # attention head width; 0 = d_model // n_heads
    rope: bool = True  # rotary positions; false = NoPE
    rope_theta: float = 10000.0
    window: int = 0  # sliding-window attention: each query sees this many positions; 0 = all
    # Packed rows: "isolated" = no state, memory or attention crosses a document boundary (the loader's
    # document starts reach every mixer as `resets`); "packed" = each row one stream, as before this key existed
    documents: str = "isolated"
    # isolated documents: rotary positions restart at each document (RoPE scores depend on position differences
    # only, so this changes nothing but keeps the angles of long packed rows small)
    rope_document_positions: bool = True
    # attention over isolated documents: sdpa (a dense boolean mask per row) | flex (flex_attention over a tile
    # mask: no dense mask; fused on CUDA, forward-only on CPU) | auto (flex on CUDA, sdpa elsewhere)
    attention_kernel: str = "auto"
    mlp_pattern: str = ""  # MLP kind per layer (D dense, E MoE); "" = all D, one char = every layer
    m2rnn: M2RNNConfig = field(default_factory=M2RNNConfig)
    moe: MoEConfig = field(default_factory=MoEConfig)
    tnt: TNTConfig = field(default_factory=TNTConfig)
    tie_embeddings: bool = True
    norm_eps: float = 1e-5
    init_std: float = 0.02

    @property
    def layers(self) -> list[str]:
        """The mixer character of each layer, stage marks removed."""
        return [c for c in self.pattern if c != "|"]

    @property
    def mlp_width(self) -> int:
        if self.mlp_hidden:
            return self.mlp_hidden
        return -(-(8 * self.d_model) // 3 // 64) * 64

    @property
    def rnn_dim(self) -> int:
        return self.rnn_width or self.d_model

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def attn_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.n_heads

    @property
    def m2rnn_v_heads(self) -> int:
        return self.m2rnn.v_heads or self.d_model // self.m2rnn.v_dim

    @property
    def mlp_kinds(self) -> list[str]:
        """The MLP character of each layer."""
        p = self.mlp_pattern.replace("|", "")
        if len(p) <= 1:
            return [p or "D"] * len(self.layers)
        return list(p)

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every impossible value; the config loader prefixes the section name."""
        out = []
        reserved = sorted({c for c in self.pattern if c in RESERVED_CHARS})
        bad = sorted({c for c in self.pattern if c != "|" and c not in MIXER_CHARS and c not in RESERVED_CHARS})
        if reserved:
            out.append(("pattern", ", ".join(f"{c} is reserved for {RESERVED_CHARS[c]}" for c in reserved)))
        if bad:
            out.append(
                (
                    "pattern",
                    f"unknown layer kind(s) {bad} in {self.pattern!r}; known: "
                    + ", ".join(f"{k} ({v})" for k, v in MIXER_CHARS.items())
                    + ", | (stage mark)",
                )
            )
        if not self.layers:
            out.append(("pattern", f"{self.pattern!r} has no layers"))
        for key in ("vocab_size", "d_model", "n_heads"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be positive, got {getattr(self, key)}"))
        for key in ("mlp_hidden", "rnn_width", "n_kv_heads"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0 (0 = default), got {getattr(self, key)}"))
        if self.head_dim < 0:
            out.append(("head_dim", f"must be >= 0 (0 = d_model // n_heads), got {self.head_dim}"))
        elif self.n_heads > 0 and not self.head_dim and self.d_model % self.n_heads:
            out.append(("n_heads", f"{self.n_heads} heads do not divide d_model={self.d_model} (or set head_dim)"))
        elif self.n_heads > 0 and self.rope and self.attn_head_dim % 2:
            out.append(("head_dim", f"head width {self.attn_head_dim} must be even for RoPE"))
        if self.attention_kernel not in ATTENTION_KERNELS:
            out.append(
                ("attention_kernel", f"must be one of {', '.join(ATTENTION_KERNELS)}, got {self.attention_kernel!r}")
            )
        if self.documents not in DOCUMENTS:
            out.append(("documents", f"must be one of {', '.join(DOCUMENTS)}, got {self.documents!r}"))
        if self.window < 0:
            out.append(("window", f"must be >= 0 (0 = full attention), got {self.window}"))
        if self.n_heads > 0 and self.kv_heads > 0 and self.n_heads % self.kv_heads:
            out.append(("n_kv_heads", f"{self.kv_heads} kv heads do not divide n_heads={self.n_heads}"))
        if self.rnn_heads <= 0:
            out.append(("rnn_heads", f"must be positive, got {self.rnn_heads}"))
        elif self.d_model % self.rnn_heads or self.rnn_dim % self.rnn_heads:
            out.append(
                (
                    "rnn_heads",
                    f"{self.rnn_heads} heads must divide d_model={self.d_model} and the recurrent width {self.rnn_dim}",
                )
            )
        if self.solver not in SOLVERS:
            out.append(("solver", f"must be one of {', '.join(SOLVERS)}, got {self.solver!r}"))
        if self.newton_kernel not in NEWTON_KERNELS:
            out.append(("newton_kernel", f"must be one of {', '.join(NEWTON_KERNELS)}, got {self.newton_kernel!r}"))
        if self.newton_damping not in NEWTON_DAMPINGS:
            out.append(("newton_damping", f"must be one of {', '.join(NEWTON_DAMPINGS)}, got {self.newton_damping!r}"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", f"must be positive, got {self.norm_eps}"))
        if self.init_std <= 0:
            out.append(("init_std", f"must be positive, got {self.init_std}"))
        if self.rnn_init <= 0:
            out.append(("rnn_init", f"must be positive, got {self.rnn_init}"))
        return out + self._mlp_problems() + self._m2rnn_problems() + self._tnt_problems()

    def _mlp_problems(self) -> list[tuple[str, str]]:
        out = []
        p = self.mlp_pattern.replace("|", "")
        bad = sorted({c for c in p if c not in MLP_CHARS})
        if bad:
            out.append(
                (
                    "mlp_pattern",
                    f"unknown MLP kind(s) {bad} in {self.mlp_pattern!r}; known: "
                    + ", ".join(f"{k} ({v})" for k, v in MLP_CHARS.items()),
                )
            )
        elif len(p) > 1 and len(p) != len(self.layers):
            out.append(
                (
                    "mlp_pattern",
                    f"{self.mlp_pattern!r} has {len(p)} layers, pattern {self.pattern!r} "
                    f"has {len(self.layers)} (or give one character for all)",
                )
            )
        if "E" not in p:
            return out
        m = self.moe
        for key in ("experts", "top_k", "hidden"):
            if getattr(m, key) <= 0:
                out.append((f"moe.{key}", f"must be positive, got {getattr(m, key)}"))
        if 0 < m.experts < m.top_k:
            out.append(("moe.top_k", f"{m.top_k} is more than moe.experts={m.experts}"))
        for key in ("shared_experts", "shared_hidden", "aux_loss_coef", "z_loss_coef", "bias_update_rate"):
            if getattr(m, key) < 0:
                out.append((f"moe.{key}", f"must be >= 0, got {getattr(m, key)}"))
        if m.score not in MOE_SCORES:
            out.append(("moe.score", f"must be one of {', '.join(MOE_SCORES)}, got {m.score!r}"))
        return out

    def _m2rnn_problems(self) -> list[tuple[str, str]]:
        if "M" not in self.layers:
            return []
        out, m = [], self.m2rnn
        for key in ("k_dim", "v_dim", "qk_heads", "conv"):
            if getattr(m, key) <= 0:
                out.append((f"m2rnn.{key}", f"must be positive, got {getattr(m, key)}"))
        if m.v_heads < 0:
            out.append(("m2rnn.v_heads", f"must be >= 0 (0 = d_model // v_dim), got {m.v_heads}"))
        elif m.v_dim > 0 and m.qk_heads > 0 and (self.m2rnn_v_heads <= 0 or self.m2rnn_v_heads % m.qk_heads):
            out.append(
                (
                    "m2rnn.v_heads",
                    f"{self.m2rnn_v_heads} value heads must be a positive multiple of m2rnn.qk_heads={m.qk_heads}",
                )
            )
        if m.solver not in SOLVERS:
            out.append(("m2rnn.solver", f"must be one of {', '.join(SOLVERS)}, got {m.solver!r}"))
        if m.conv_init not in M2RNN_CONV_INITS:
            out.append(("m2rnn.conv_init", f"must be one of {', '.join(M2RNN_CONV_INITS)}, got {m.conv_init!r}"))
        if m.state_grad_clip is not None and not m.state_grad_clip > 0:
            out.append(("m2rnn.state_grad_clip", f"must be positive or null, got {m.state_grad_clip}"))
        elif m.state_grad_clip is not None and m.solver == "newton":
            out.append(("m2rnn.state_grad_clip", "the Newton solver does not clip the state gradient: set null"))
        return out

    def _tnt_problems(self) -> list[tuple[str, str]]:
        if "T" not in self.layers:
            return []
        out, t = [], self.tnt
        for key in ("heads", "expansion"):
            if getattr(t, key) <= 0:
                out.append((f"tnt.{key}", f"must be positive, got {getattr(t, key)}"))
        if t.head_dim < 0:
            out.append(("tnt.head_dim", f"must be >= 0 (0 = d_model // heads), got {t.head_dim}"))
        elif t.heads > 0 and not t.head_dim and self.d_model % t.heads:
            out.append(("tnt.heads", f"{t.heads} heads do not divide d_model={self.d_model} (or set tnt.head_dim)"))
        if t.layers not in (1, 2):
            out.append(("tnt.layers", f"the memory MLP has 1 or 2 layers, got {t.layers}"))
        if t.global_chunk < 0:
            out.append(("tnt.global_chunk", f"must be >= 0 (0 = no global memory), got {t.global_chunk}"))
        if any(c <= 0 for c in t.local_chunks):
            out.append(("tnt.local_chunks", f"chunk sizes must be positive, got {list(t.local_chunks)}"))
        elif t.local_reset > 0 and any(t.local_reset % c for c in t.local_chunks):
            out.append(
                (
                    "tnt.local_chunks",
                    f"each local chunk must divide tnt.local_reset={t.local_reset}, got {list(t.local_chunks)}",
                )
            )
        if t.local_reset < 0:
            out.append(("tnt.local_reset", f"must be >= 0 (0 = never reset), got {t.local_reset}"))
        if not t.global_chunk and not t.local_chunks:
            out.append(("tnt.local_chunks", "no memory at all: give tnt.global_chunk > 0 or a local chunk"))
        if t.max_step <= 0:
            out.append(("tnt.max_step", f"must be positive, got {t.max_step}"))
        return out
