"""The model's shape: everything needed to build an LM, nothing about how it is trained."""
from __future__ import annotations

from dataclasses import dataclass

# One character per layer (Megatron's hybrid pattern): G ParaGRU, L ParaLSTM, A attention. `|` marks a
# pipeline-stage boundary and is ignored by the single-device model. Later issues add M and T.
MIXER_CHARS = {"G": "paragru", "L": "paralstm", "A": "attention"}
SOLVERS = ("auto", "newton", "sequential")


@dataclass
class ModelConfig:
    pattern: str = "GG"  # layer pattern string, e.g. "GGAG" or "GG|GG"
    vocab_size: int = 2048  # must equal the tokenizer's vocabulary size
    d_model: int = 256
    mlp_hidden: int = 0  # SwiGLU hidden width; 0 = 8/3 * d_model rounded up to a multiple of 64
    rnn_width: int = 0  # ParaGRU/ParaLSTM channels; 0 = d_model
    rnn_heads: int = 1  # heads of the block-diagonal input projection (1 = dense)
    solver: str = "auto"  # recurrences: newton | sequential | auto (by device and shape)
    n_heads: int = 4  # attention query heads
    n_kv_heads: int = 0  # attention key/value heads (GQA); 0 = n_heads
    rope_theta: float = 10000.0
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
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    def problems(self) -> list[tuple[str, str]]:
        """(key, message) for every impossible value; the config loader prefixes the section name."""
        out = []
        bad = sorted({c for c in self.pattern if c != "|" and c not in MIXER_CHARS})
        if bad:
            out.append(("pattern", f"unknown layer kind(s) {bad} in {self.pattern!r}; known: "
                        + ", ".join(f"{k} ({v})" for k, v in MIXER_CHARS.items()) + ", | (stage mark)"))
        if not self.layers:
            out.append(("pattern", f"{self.pattern!r} has no layers"))
        for key in ("vocab_size", "d_model", "n_heads"):
            if getattr(self, key) <= 0:
                out.append((key, f"must be positive, got {getattr(self, key)}"))
        for key in ("mlp_hidden", "rnn_width", "n_kv_heads"):
            if getattr(self, key) < 0:
                out.append((key, f"must be >= 0 (0 = default), got {getattr(self, key)}"))
        if self.n_heads > 0 and self.d_model % self.n_heads:
            out.append(("n_heads", f"{self.n_heads} heads do not divide d_model={self.d_model}"))
        elif self.n_heads > 0 and self.head_dim % 2:
            out.append(("n_heads", f"head dim d_model/n_heads={self.head_dim} must be even for RoPE"))
        if self.n_heads > 0 and self.kv_heads > 0 and self.n_heads % self.kv_heads:
            out.append(("n_kv_heads", f"{self.kv_heads} kv heads do not divide n_heads={self.n_heads}"))
        if self.rnn_heads <= 0:
            out.append(("rnn_heads", f"must be positive, got {self.rnn_heads}"))
        elif self.d_model % self.rnn_heads or self.rnn_dim % self.rnn_heads:
            out.append(("rnn_heads", f"{self.rnn_heads} heads must divide d_model={self.d_model} "
                                     f"and the recurrent width {self.rnn_dim}"))
        if self.solver not in SOLVERS:
            out.append(("solver", f"must be one of {', '.join(SOLVERS)}, got {self.solver!r}"))
        if self.norm_eps <= 0:
            out.append(("norm_eps", f"must be positive, got {self.norm_eps}"))
        if self.init_std <= 0:
            out.append(("init_std", f"must be positive, got {self.init_std}"))
        return out
