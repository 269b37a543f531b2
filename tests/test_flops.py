"""Training FLOPs per token (models/flops.py) equal hand counts on small configs, layer kind by layer kind; the
weights' part equals 6 × the matmul weights of the built model; where every counted FLOP is a matmul (TNT's
memories, MoE experts) torch's FlopCounterMode measures the same; the peak table and MFU (train/mfu.py)."""

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from unroll.models import LM
from unroll.models.config import M2RNNConfig, ModelConfig, MoEConfig, TNTConfig
from unroll.models.flops import attention_context, model_flops
from unroll.models.lm import build_mixer, build_mlp
from unroll.models.recurrent import HeadLinear
from unroll.models.tnt import TNTState
from unroll.train.metrics import format_step
from unroll.train.mfu import matmul_precision, peak_flops, table_peak_tflops, utilisation


def matmul_weights(module: nn.Module) -> int:
    """Elements of the weights of the module's linear maps and convolutions (biases and other parameters not)."""
    kinds = (nn.Linear, nn.Conv1d, HeadLinear)
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, kinds))


def test_a_dense_transformer_is_six_times_its_matmul_weights_plus_attention():
    T = 8
    for tie in (True, False):
        cfg = ModelConfig(
            pattern="AA", d_model=16, n_heads=4, n_kv_heads=2, mlp_hidden=32, vocab_size=64, tie_embeddings=tie
        )
        model = LM(cfg)
        used = sum(matmul_weights(b) for b in model.blocks) + cfg.vocab_size * cfg.d_model  # + the (tied) head
        f = model_flops(cfg, T)
        weights = f.head + sum(layer.mixer_weights + layer.mlp_weights for layer in f.layers)
        assert weights == 6 * used
        # scores and values: 12 · heads · head_dim · T_eff per layer, T_eff = (1 + ... + 8) / 8 = 4.5 keys
        assert f.per_token() == 6 * used + 2 * 12 * 4 * 4 * 4.5
    # by hand: qkv 16·(4 + 2·2)·4 = 512, out 256, SwiGLU 3·16·32 = 1536, head 64·16 = 1024
    assert used == 2 * (512 + 256 + 1536) + 1024


def test_attention_context_is_causal_and_limited_by_the_window():
    assert attention_context(8) == (1 + 2 + 3 + 4 + 5 + 6 + 7 + 8) / 8
    assert attention_context(8, window=3) == (1 + 2 + 3 + 3 * 5) / 8
    assert attention_context(8, window=8) == attention_context(8, window=100) == attention_context(8)
    cfg = ModelConfig(pattern="A", d_model=16, n_heads=2, window=3, vocab_size=64)
    assert model_flops(cfg, 8).layers[0].mixing == 12 * 2 * 8 * (21 / 8)


@pytest.mark.parametrize("kind", ["G", "L", "M", "T", "A"])
def test_every_mixers_weights_are_those_of_the_built_module(kind):
    cfg = ModelConfig(
        pattern=kind,
        d_model=16,
        rnn_width=8,
        rnn_heads=2,
        n_heads=2,
        m2rnn=M2RNNConfig(k_dim=4, v_dim=4, qk_heads=2, v_heads=4, conv=3),
        tnt=TNTConfig(heads=2, global_chunk=4, local_chunks=[2, 4], local_reset=8),
    )
    assert model_flops(cfg, 8).layers[0].mixer_weights == 6 * matmul_weights(build_mixer(kind, cfg, 0.02))


def test_moe_counts_the_router_and_the_experts_a_token_is_sent_to():
    moe = MoEConfig(experts=4, top_k=2, hidden=8, shared_experts=1)
    cfg = ModelConfig(pattern="A", d_model=16, mlp_pattern="E", moe=moe)
    # router 16·4, two routed experts 2 · 3·16·8, the shared one 3·16·8
    assert model_flops(cfg, 8).layers[0].mlp_weights == 6 * (64 + 768 + 384)
    # measured: the experts as one matmul each (torch._grouped_mm is not counted by FlopCounterMode)
    layer = build_mlp("E", cfg, 0.02)
    layer.use_grouped_mm = False
    x = torch.randn(10, 16, requires_grad=True)
    with FlopCounterMode(display=False) as counter:
        layer(x).sum().backward()
    assert counter.get_total_flops() == 10 * 6 * (64 + 768 + 384)


def test_paragru_and_paralstm_recurrences_by_hand():
    """E a cell evaluation, J its Jacobian's extra, S a scan step, N state elements, per channel × width:
    sequential 5E + J + S; Newton 6E + 2J + 5N + S, + E + J + S + 7N per iteration."""
    gru = model_flops(ModelConfig(pattern="G", d_model=8), 16).layers[0].recurrence
    E, J, S, N = 13 * 8, 18 * 8, 2 * 8, 8
    assert gru is not None and gru.sequential == 5 * E + J + S == 680
    assert gru.at(3) == (6 * E + 2 * J + 5 * N + S) + 3 * (E + J + S + 7 * N) == 968 + 3 * 320
    lstm = model_flops(ModelConfig(pattern="L", d_model=8, rnn_width=4), 16).layers[0].recurrence
    E, J, S, N = 19 * 4, 31 * 4, 8 * 4, 2 * 4  # a 2×2 block per channel: its scan step 8, its state 2
    assert lstm is not None and lstm.at(0) == 5 * E + J + S == 536
    assert lstm.at(1) == 776 + 288


def test_m2rnn_by_hand():
    m2rnn = M2RNNConfig(k_dim=2, v_dim=3, qk_heads=1, v_heads=2, conv=2, solver="sequential")
    layer = model_flops(ModelConfig(pattern="M", d_model=8, m2rnn=m2rnn), 16).layers[0]
    # in_proj 8·(q 2 + k 2 + v 6 | a 2 | g 6), conv 10 channels × 2, out_proj 6·8
    assert layer.mixer_weights == 6 * (8 * 18 + 20 + 48)
    assert layer.mixing == 3 * 2 * (2 * 2 * 3 + 2 * 2 * 3)  # k vᵀ and qᵀH per value head, as matmuls, × 3
    # 4 rows of V = 3: row·W 2·9, + k vᵀ, tanh, f·h + (1 − f)·c 5·3 + 1; the loop differentiated: 3E
    assert layer.recurrence is not None and layer.recurrence.at(0) == 3 * 4 * 34
    newton = model_flops(
        ModelConfig(pattern="M", d_model=8, m2rnn=M2RNNConfig(**{**vars(m2rnn), "solver": "newton"})), 16
    )
    rec = newton.layers[0].recurrence
    E, J, S, N = 4 * 34, 4 * (3 * 9 + 3 * 3 + 1), 4 * 2 * 9, 4 * 3  # the Jacobian dense as the cell builds it
    assert rec is not None and rec.at(2) == (6 * E + 2 * J + 5 * N + S) + 2 * (E + J + S + 7 * N)


def test_tnt_memory_by_hand():
    """One linear local memory, chunk 4, no momentum, no projection; per head of width 4 and token: gradients
    k Wᵀ 2·16, read after the update x Wᵀ 2·16 + the causal chunk product 2·4·(4 + 4), update Σ δ uᵀ 2·16."""
    tnt = TNTConfig(
        heads=2, layers=1, global_chunk=0, local_chunks=[4], local_reset=0, qk_project=False, momentum=False
    )
    layer = model_flops(ModelConfig(pattern="T", d_model=8, tnt=tnt), 16).layers[0]
    assert layer.mixing == 3 * 2 * (32 + (32 + 64) + 32)
    assert layer.mixer_weights == 6 * (8 * 32 + 8 * 2 * 2 + 8 * 8)  # in_proj q k v g, gates θ and α, out_proj


@pytest.mark.parametrize(
    "tnt",
    [
        TNTConfig(heads=2, layers=2, expansion=2, global_chunk=8, local_chunks=[4, 2], local_reset=0, qk_project=False),
        TNTConfig(heads=2, layers=1, global_chunk=4, local_chunks=[4], local_reset=0, qk_project=False, forget=False),
    ],
)
def test_tnt_memories_are_what_flop_counter_measures(tnt):
    """Every FLOP the memories are counted is a matmul, so torch's counter sees them all: forward, and forward
    + backward. The count is the steady state's; two boundary effects are taken out for the measure: the last
    chunk's update feeds nothing but the final memories (here in the loss), and the initial momentum, a zero
    constant in training, skips its products' gradients in the first chunk (here a leaf that needs one)."""
    T, cfg = 16, ModelConfig(pattern="T", d_model=16, tnt=tnt)
    layer = model_flops(cfg, T).layers[0]
    mixer = build_mixer("T", cfg, 0.02)
    x = torch.randn(1, T, 16, requires_grad=True)
    if tnt.forget:  # (without, the momentum's decay products are trained at 2×, not 3×)
        with FlopCounterMode(display=False) as forward:
            mixer(x)
        assert forward.get_total_flops() == T * (layer.mixer_weights + layer.mixing) / 3
    fresh = [mixer._fresh(i, 1, x.dtype) for i in range(len(mixer.specs))]
    for c in fresh:
        c.momentum = tuple(s.clone().requires_grad_() for s in c.momentum or ()) or None
    with FlopCounterMode(display=False) as training:
        y, state = mixer(x, TNTState(fresh))
        loss = y.sum() + sum(w.sum() for c in state.memories for w in c.value + (c.momentum or ()))
        loss.backward()
    assert training.get_total_flops() == T * (layer.mixer_weights + layer.mixing)


def test_newton_iterations_scale_the_recurrent_layers_only():
    cfg = ModelConfig(pattern="GAG", d_model=8, n_heads=2)
    f = model_flops(cfg, 16)
    per = f.layers[0].recurrence.per_iteration  # type: ignore[union-attr]
    base = f.per_token({0: 1, 2: 1})
    assert f.per_token({0: 4, 2: 1}) - base == 3 * per
    assert f.per_token({0: 4, 2: 4}) - base == 6 * per == 3 * f.per_newton_iteration()
    assert f.per_token({1: 7}) == f.per_token()  # attention has no iterations
    # a layer another pipeline stage ran counts at the mean of its kind's given layers; none given: sequential
    assert f.per_token({0: 3}) == f.per_token({0: 3, 2: 3})
    assert f.per_token() == f.per_token({0: 0, 2: 0})
    kinds = f.by_kind({0: 2, 2: 2})
    assert set(kinds) == {"paragru", "attention", "dense mlp", "lm head"}
    assert sum(kinds.values()) == pytest.approx(f.per_token({0: 2, 2: 2}))


def test_peak_table_by_device_name_and_precision():
    assert table_peak_tflops("NVIDIA H100 80GB HBM3", "bf16") == 989.4
    assert table_peak_tflops("NVIDIA H100 PCIe", "bf16") == 756.5
    assert table_peak_tflops("NVIDIA H200", "bf16") == 989.4
    assert table_peak_tflops("NVIDIA GH200 480GB", "tf32") == 494.7
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "bf16") == 312.0
    assert table_peak_tflops("NVIDIA A100-SXM4-80GB", "fp32") == 19.5
    assert table_peak_tflops("Tesla T4", "bf16") is None  # not in the table: no mfu
    assert table_peak_tflops("NVIDIA B200", "fp32") is None  # a precision the table has no figure for


def test_peak_override_and_no_peak_on_a_cpu():
    cpu = torch.device("cpu")
    assert peak_flops(cpu, torch.bfloat16) is None and peak_flops(cpu, torch.float32) is None
    assert peak_flops(cpu, torch.float32, override_tflops=2.5) == 2.5e12
    assert matmul_precision(torch.bfloat16) == "bf16"
    before = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert matmul_precision(torch.float32) == "fp32"
        torch.set_float32_matmul_precision("high")
        assert matmul_precision(torch.float32) == "tf32"
    finally:
        torch.set_float32_matmul_precision(before)


def test_utilisation_and_its_console_line():
    # 4000 tokens/s over 2 GPUs at 1e9 FLOPs each: 2 TFLOP/s per GPU, 40% of a 5 TFLOP/s peak
    assert utilisation(4000, 1e9, 2, None) == {"tflops_per_gpu": pytest.approx(2.0)}
    row = utilisation(4000, 1e9, 2, 5e12)
    assert row == {"tflops_per_gpu": pytest.approx(2.0), "mfu": pytest.approx(0.4)}
    line = format_step({"step": 1, "loss": 2.0, "lr": 1e-3, "grad_norm": 0.5, "tokens_per_s": 4000, **row}, 10)
    assert line.endswith("tokens/s 4,000  tflops/gpu 2  mfu 40.0%")
    assert "mfu" not in format_step({"step": 1, "loss": 2.0, "lr": 1e-3, "tokens_per_s": 1.0, "tflops_per_gpu": 1}, 10)
