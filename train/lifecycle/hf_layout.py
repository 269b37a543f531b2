"""unroll's attention models in HuggingFace transformers' layouts, both ways, without importing transformers.

Which layout, by the model's shape (each one's math equals unroll's exactly, so the logits agree):
  llama      all layers `A` with dense SwiGLU MLPs, full attention
  mistral    the same with sliding-window attention (window > 0): Llama's weights plus `sliding_window`
             (transformers' window: query t sees keys t − window + 1 ... t, as unroll's)
  mixtral    all MLPs `E`, no shared experts: softmax router, top-k, weights renormalised over the top k
  qwen2_moe  shared experts, or dense and MoE MLPs mixed (`mlp_only_layers`), softmax router with
             `norm_topk_prob`. Qwen2-MoE gates its shared expert by sigmoid(w·x); unroll adds it ungated,
             so the export writes w = 0 (sigmoid(0) = ½ exactly) and the shared down projection × 2 (exact
             in binary floating point); an import refuses a nonzero gate.
Refused, with the reason: recurrent layers (G, L, M), NoPE (rope: false), sigmoid router scores, a
nonzero auxiliary-loss-free expert bias (it changes which experts are picked, which no layout models),
dense and MoE layers mixed without shared experts (Qwen2-MoE always has a shared expert).

Training settings: transformers' router_aux_loss_coef is unroll's moe.aux_loss_coef, rescaled (see
hf_aux_loss_coef); transformers adds that loss only when output_router_logits is set. The router z-loss has no
transformers field (it stays in unroll_config.yaml).

Names: unroll's fused projections are split by rows. qkv.weight [(H + 2·KV)·hd, d] = q_proj ‖ k_proj ‖
v_proj; gate_up.weight [2h, d] = gate_proj ‖ up_proj; a MoE's stacked w_gate_up [E, d, 2h] and w_down
[E, h, d] are per expert the transposes of w1 ‖ w3 (gate_proj ‖ up_proj) and w2 (down_proj). RoPE is
rotate-half in both (models/attention.py), so q and k rows need no permutation.
"""

from __future__ import annotations

import torch

from unroll.models.config import ModelConfig

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "mixtral": "MixtralForCausalLM",
    "qwen2_moe": "Qwen2MoeForCausalLM",
}
BOS_ID, EOS_ID = 1, 2  # unroll's sentencepiece tokenizers (data/sentencepiece_tokenizer.py): unk=0, bos=1, eos=2


class LayoutError(ValueError):
    """A model that a layout cannot express exactly; the message says why."""


def _expert_biases(state: dict) -> list[str]:
    return [k for k, v in state.items() if k.endswith(".expert_bias") and bool(v.ne(0).any())]


def hf_architecture(cfg: ModelConfig, state: dict) -> str:
    """The transformers layout (model_type) whose math is this model's, or LayoutError saying why none is."""
    reasons = []
    recurrent = sorted({c for c in cfg.layers if c != "A"})
    if recurrent:
        reasons.append(
            f"layer kinds {recurrent} in pattern {cfg.pattern!r} are recurrent (transformers "
            f"layouts hold attention layers only)"
        )
    if not cfg.rope:
        reasons.append("rope: false (NoPE); the Llama-family layouts always rotate q and k")
    kinds = cfg.mlp_kinds
    if "E" in kinds:
        if cfg.moe.score != "softmax":
            reasons.append(f"moe.score={cfg.moe.score!r}; Mixtral and Qwen2-MoE route by softmax")
        biased = _expert_biases(state)
        if biased:
            reasons.append(
                f"the expert bias ({biased[0]}, moe.bias_update_rate={cfg.moe.bias_update_rate}) "
                f"changes expert selection; no transformers MoE layout with this attention has one"
            )
    if reasons:
        raise LayoutError("; ".join(reasons))
    if "E" not in kinds:
        return "mistral" if cfg.window else "llama"
    if all(k == "E" for k in kinds) and not cfg.moe.shared_experts:
        return "mixtral"
    if not cfg.moe.shared_experts:  # Qwen2-MoE always has a shared expert; a width-0 one is not loadable
        raise LayoutError(
            f"mlp_pattern {cfg.mlp_pattern!r} mixes dense and MoE layers without shared experts: "
            f"Mixtral needs every layer MoE, Qwen2-MoE a shared expert"
        )
    return "qwen2_moe"


def _moe_prefix(arch: str, i: int) -> str:
    return f"model.layers.{i}.block_sparse_moe" if arch == "mixtral" else f"model.layers.{i}.mlp"


def _expert_names(arch: str) -> tuple[str, str, str]:
    return ("w1", "w3", "w2") if arch == "mixtral" else ("gate_proj", "up_proj", "down_proj")


def hf_aux_loss_coef(cfg: ModelConfig) -> float:
    """transformers' router_aux_loss_coef for unroll's moe.aux_loss_coef c. unroll adds, per MoE layer,
    c·E·Σ_e f_e·P_e (f_e: the layer's share of the top-k assignments going to expert e, summing to 1; P_e: its
    mean router probability) and sums over the N MoE layers. transformers' load_balancing_loss_func pools the
    N layers first and counts assignments per token (summing to top_k): E·Σ_e k·f̄_e·P̄_e. With the same
    routing statistics in every layer the two losses agree, in value and in gradient, when
    c_hf = c·N / k (exactly, whatever the statistics, for one MoE layer)."""
    return cfg.moe.aux_loss_coef * cfg.mlp_kinds.count("E") / cfg.moe.top_k


def hf_config(
    arch: str,
    cfg: ModelConfig,
    *,
    max_positions: int,
    dtype: str,
    bos_id: int | None = BOS_ID,
    eos_id: int = EOS_ID,
) -> dict:
    """transformers' config.json for the model (every field that shapes the computation set explicitly); the
    special ids are the tokenizer's."""
    L = len(cfg.layers)
    out = {
        "architectures": [ARCHITECTURES[arch]],
        "model_type": arch,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "num_hidden_layers": L,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.attn_head_dim,
        "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "max_position_embeddings": max_positions,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "dtype": dtype,
    }
    if arch in ("llama", "mistral"):
        out.update(intermediate_size=cfg.mlp_width, attention_bias=False, mlp_bias=False)
    if arch in ("mistral", "mixtral"):
        out["sliding_window"] = cfg.window or None
    if arch == "mixtral":
        out.update(
            intermediate_size=cfg.moe.hidden,
            num_local_experts=cfg.moe.experts,
            num_experts_per_tok=cfg.moe.top_k,
            router_aux_loss_coef=hf_aux_loss_coef(cfg),
        )
    if arch == "qwen2_moe":
        m = cfg.moe
        out.update(
            intermediate_size=cfg.mlp_width,
            moe_intermediate_size=m.hidden,
            num_experts=m.experts,
            num_experts_per_tok=m.top_k,
            norm_topk_prob=True,
            decoder_sparse_step=1,
            shared_expert_intermediate_size=m.shared_experts * (m.shared_hidden or m.hidden),
            mlp_only_layers=[i for i, k in enumerate(cfg.mlp_kinds) if k != "E"],
            qkv_bias=False,
            router_aux_loss_coef=hf_aux_loss_coef(cfg),
            use_sliding_window=bool(cfg.window),
            sliding_window=cfg.window or None,
            max_window_layers=L,
            layer_types=["sliding_attention" if cfg.window else "full_attention"] * L,
        )
    return out


def tokenizer_config() -> dict:
    """tokenizer_config.json beside unroll's tokenizer.model: transformers' LlamaTokenizer converts the
    sentencepiece model and, with no prefix space added and no bos/eos inserted, encodes text as unroll
    does (byte fallback included). One difference: it reads the literal text "<s>", "</s>", "<unk>" as
    the special tokens, where unroll encodes those characters as text."""
    return {
        "tokenizer_class": "LlamaTokenizer",
        "legacy": False,
        "add_prefix_space": False,
        "add_bos_token": False,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
    }


def to_hf(arch: str, cfg: ModelConfig, state: dict) -> dict:
    """unroll state dict → transformers tensors (contiguous, none sharing storage)."""
    H, KV, hd = cfg.n_heads, cfg.kv_heads, cfg.attn_head_dim
    out = {"model.embed_tokens.weight": state["embed.weight"], "model.norm.weight": state["norm.weight"]}
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = state["head.weight"]
    for i, kind in enumerate(cfg.mlp_kinds):
        b, t = f"blocks.{i}", f"model.layers.{i}"
        q, k, v = state[f"{b}.mixer.qkv.weight"].split([H * hd, KV * hd, KV * hd])
        out |= {
            f"{t}.input_layernorm.weight": state[f"{b}.mixer_norm.weight"],
            f"{t}.post_attention_layernorm.weight": state[f"{b}.mlp_norm.weight"],
            f"{t}.self_attn.q_proj.weight": q,
            f"{t}.self_attn.k_proj.weight": k,
            f"{t}.self_attn.v_proj.weight": v,
            f"{t}.self_attn.o_proj.weight": state[f"{b}.mixer.out_proj.weight"],
        }
        if kind == "D":
            gate, up = state[f"{b}.mlp.gate_up.weight"].chunk(2)
            out |= {
                f"{t}.mlp.gate_proj.weight": gate,
                f"{t}.mlp.up_proj.weight": up,
                f"{t}.mlp.down_proj.weight": state[f"{b}.mlp.down.weight"],
            }
            continue
        p, (n_gate, n_up, n_down) = _moe_prefix(arch, i), _expert_names(arch)
        out[f"{p}.gate.weight"] = state[f"{b}.mlp.router.weight"]
        w_gate_up, w_down = state[f"{b}.mlp.w_gate_up"], state[f"{b}.mlp.w_down"]
        for e in range(cfg.moe.experts):
            gate, up = w_gate_up[e].t().chunk(2)
            out |= {
                f"{p}.experts.{e}.{n_gate}.weight": gate,
                f"{p}.experts.{e}.{n_up}.weight": up,
                f"{p}.experts.{e}.{n_down}.weight": w_down[e].t(),
            }
        if cfg.moe.shared_experts:
            gate, up = state[f"{b}.mlp.shared.gate_up.weight"].chunk(2)
            down = state[f"{b}.mlp.shared.down.weight"]
            out |= {
                f"{p}.shared_expert.gate_proj.weight": gate,
                f"{p}.shared_expert.up_proj.weight": up,
                f"{p}.shared_expert.down_proj.weight": down * 2,  # × sigmoid(0) = ½ in the model
                f"{p}.shared_expert_gate.weight": down.new_zeros(1, cfg.d_model),
            }
    return {name: t.contiguous().clone() for name, t in out.items()}


def _need(config: dict, key: str):
    if key not in config:
        raise LayoutError(f"config.json has no {key!r}")
    return config[key]


def _check_supported(arch: str, config: dict) -> None:
    problems = []
    if config.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act={config['hidden_act']!r} (unroll's MLPs are SwiGLU: silu)")
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        problems.append(f"rope type {rope.get('rope_type', rope.get('type'))!r} (unroll's RoPE is the default one)")
    for key in ("attention_bias", "mlp_bias", "qkv_bias"):
        if config.get(key, key == "qkv_bias" and arch == "qwen2_moe"):
            problems.append(f"{key}=true (unroll's projections have no bias)")
    if arch == "qwen2_moe" and not config.get("norm_topk_prob", False) and config.get("num_experts_per_tok", 1) > 1:
        problems.append("norm_topk_prob=false (unroll renormalises the top-k router weights)")
    if arch == "qwen2_moe" and config.get("use_sliding_window"):
        types = set(config.get("layer_types") or [])
        if types != {"sliding_attention"}:
            problems.append(f"sliding window on some layers only ({sorted(types)}); unroll's window is per model")
    if problems:
        raise LayoutError(f"{ARCHITECTURES[arch]}: " + "; ".join(problems))


def model_fields(config: dict) -> tuple[str, dict, dict]:
    """config.json → (model_type, ModelConfig fields, MoEConfig fields) for the shape; LayoutError for
    anything unroll cannot compute exactly."""
    arch = _need(config, "model_type")
    if arch not in ARCHITECTURES:
        raise LayoutError(f"model_type {arch!r}: unroll imports {', '.join(ARCHITECTURES)}")
    _check_supported(arch, config)
    L, d, H = _need(config, "num_hidden_layers"), _need(config, "hidden_size"), _need(config, "num_attention_heads")
    rope = config.get("rope_parameters") or {}
    window = config.get("sliding_window") or 0
    if arch == "qwen2_moe" and not config.get("use_sliding_window"):
        window = 0
    fields = dict(
        pattern="A" * L,
        vocab_size=_need(config, "vocab_size"),
        d_model=d,
        n_heads=H,
        n_kv_heads=config.get("num_key_value_heads") or H,
        head_dim=config.get("head_dim") or d // H,
        rope=True,
        rope_theta=float(rope.get("rope_theta", config.get("rope_theta", 10000.0))),
        window=window,
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
    moe = {}
    if arch in ("llama", "mistral"):
        fields.update(mlp_hidden=_need(config, "intermediate_size"), mlp_pattern="D")
    elif arch == "mixtral":
        fields.update(mlp_pattern="E")
        moe = dict(
            experts=_need(config, "num_local_experts"),
            top_k=_need(config, "num_experts_per_tok"),
            hidden=_need(config, "intermediate_size"),
            shared_experts=0,
            shared_hidden=0,
            score="softmax",
            bias_update_rate=0.0,
        )
    else:
        step, dense = config.get("decoder_sparse_step", 1), set(config.get("mlp_only_layers") or [])
        kinds = "".join("E" if i not in dense and (i + 1) % step == 0 else "D" for i in range(L))
        shared = _need(config, "shared_expert_intermediate_size")
        fields.update(mlp_hidden=_need(config, "intermediate_size"), mlp_pattern=kinds)
        moe = dict(
            experts=_need(config, "num_experts"),
            top_k=_need(config, "num_experts_per_tok"),
            hidden=_need(config, "moe_intermediate_size"),
            shared_experts=1 if shared else 0,
            shared_hidden=shared,
            score="softmax",
            bias_update_rate=0.0,
        )
    n_moe = L if fields["mlp_pattern"] == "E" else fields["mlp_pattern"].count("E")
    if n_moe and "router_aux_loss_coef" in config:  # hf_aux_loss_coef, inverted
        moe["aux_loss_coef"] = float(config["router_aux_loss_coef"]) * moe["top_k"] / n_moe
    return arch, fields, moe


def _take(tensors: dict, name: str) -> torch.Tensor:
    if name not in tensors:
        raise LayoutError(f"model.safetensors has no tensor {name!r}")
    return tensors.pop(name)


def from_hf(arch: str, cfg: ModelConfig, tensors: dict) -> dict:
    """transformers tensors → unroll state dict for `cfg` (from model_fields); LayoutError for a missing or
    left-over tensor, or a Qwen2-MoE shared-expert gate that is not zero."""
    tensors = dict(tensors)
    take = lambda name: _take(tensors, name)  # noqa: E731
    state = {"embed.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_embeddings:
        tensors.pop("lm_head.weight", None)  # some writers store the tied copy too
    else:
        state["head.weight"] = take("lm_head.weight")
    for i, kind in enumerate(cfg.mlp_kinds):
        b, t = f"blocks.{i}", f"model.layers.{i}"
        state |= {
            f"{b}.mixer_norm.weight": take(f"{t}.input_layernorm.weight"),
            f"{b}.mlp_norm.weight": take(f"{t}.post_attention_layernorm.weight"),
            f"{b}.mixer.qkv.weight": torch.cat([take(f"{t}.self_attn.{n}_proj.weight") for n in "qkv"]),
            f"{b}.mixer.out_proj.weight": take(f"{t}.self_attn.o_proj.weight"),
        }
        if kind == "D":
            state[f"{b}.mlp.gate_up.weight"] = torch.cat(
                [take(f"{t}.mlp.gate_proj.weight"), take(f"{t}.mlp.up_proj.weight")]
            )
            state[f"{b}.mlp.down.weight"] = take(f"{t}.mlp.down_proj.weight")
            continue
        p, (n_gate, n_up, n_down) = _moe_prefix(arch, i), _expert_names(arch)
        state[f"{b}.mlp.router.weight"] = take(f"{p}.gate.weight")
        experts = range(cfg.moe.experts)
        state[f"{b}.mlp.w_gate_up"] = torch.stack(
            [
                torch.cat([take(f"{p}.experts.{e}.{n_gate}.weight"), take(f"{p}.experts.{e}.{n_up}.weight")]).t()
                for e in experts
            ]
        )
        state[f"{b}.mlp.w_down"] = torch.stack([take(f"{p}.experts.{e}.{n_down}.weight").t() for e in experts])
        state[f"{b}.mlp.expert_bias"] = torch.zeros(cfg.moe.experts)
        if cfg.moe.shared_experts:
            gate_w = take(f"{p}.shared_expert_gate.weight")
            if bool(gate_w.ne(0).any()):
                raise LayoutError(f"{p}.shared_expert_gate.weight is not zero: unroll's shared experts are ungated")
            state[f"{b}.mlp.shared.gate_up.weight"] = torch.cat(
                [take(f"{p}.shared_expert.gate_proj.weight"), take(f"{p}.shared_expert.up_proj.weight")]
            )
            state[f"{b}.mlp.shared.down.weight"] = take(f"{p}.shared_expert.down_proj.weight") / 2
    if tensors:
        raise LayoutError(f"model.safetensors holds tensors unroll has no place for: {sorted(tensors)[:5]}")
    return {name: t.contiguous() for name, t in state.items()}
