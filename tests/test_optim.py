"""The optimizer's room (train/optim.py): the modules that build an optimizer outside a training run (growth,
import, rehearsal) take it from there, so none of them loads the training loop."""

import os
import subprocess
import sys

import pytest
import torch

from unroll.models import LM, ModelConfig
from unroll.train.config import Config, ConfigError
from unroll.train.optim import apply_trainable, build_optimizer, clip_gradients


def test_growth_import_and_rehearsal_do_not_load_the_trainer():
    code = (
        "import sys\n"
        "import unroll.train.lifecycle.grow, unroll.train.lifecycle.export, unroll.train.planning.rehearse\n"
        "assert 'unroll.train.trainer' not in sys.modules, 'the trainer was imported'\n"
        "from unroll.train import build, optim, step\n"
        "from unroll.train.lifecycle import export, grow\n"
        "from unroll.train.planning import rehearse\n"
        "assert grow.build_optimizer is optim.build_optimizer is export.build_optimizer\n"
        "assert rehearse.build_training is build.build_training and rehearse.train_step is step.train_step\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, env=dict(os.environ), timeout=300)


def test_frozen_parameters_stay_out_of_the_optimizer_and_clipping_bounds_the_norm():
    model = LM(ModelConfig(pattern="GA", vocab_size=23, d_model=16, n_heads=2))
    trainable = apply_trainable(model, r"^blocks\.1\.")
    assert trainable == sum(p.numel() for n, p in model.named_parameters() if n.startswith("blocks.1."))
    optimizer = build_optimizer(model, Config())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for p in model.parameters() if p.requires_grad
    }
    with pytest.raises(ConfigError, match="matches no parameter"):
        apply_trainable(model, "nothing_here")
    for p in model.parameters():
        p.requires_grad_(True)
        p.grad = torch.full_like(p, 10.0)
    norm = clip_gradients(model, 1.0)
    assert norm > 1.0
    after = torch.nn.utils.get_total_norm([p.grad for p in model.parameters()])
    torch.testing.assert_close(after, torch.tensor(1.0), rtol=1e-5, atol=0)


def test_weight_decay_groups_leave_gates_biases_norms_and_recurrent_coefficients_undecayed():
    """One rule (`parameter_groups`) for the trainer and the state-tracking bench: decay on the Linear and
    Embedding matrices only; never on norms, biases, convolutions, M²RNN's W/A_log/dt_bias/D or the ParaRNN
    cells' recurrent coefficients."""
    from unroll.launch.bench import state_tracking
    from unroll.models.config import M2RNNConfig
    from unroll.train.optim import parameter_groups

    model = LM(ModelConfig(pattern="MGLA", vocab_size=23, d_model=32, n_heads=2, m2rnn=M2RNNConfig(k_dim=8, v_dim=8)))
    groups = parameter_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in groups if g["weight_decay"] for p in g["params"]}
    kept = {names[id(p)] for g in groups if not g["weight_decay"] for p in g["params"]}
    assert decayed | kept == set(names.values()) and not decayed & kept
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))}
    # and ParaGRU's / ParaLSTM's input projections (head-blocked matrices, not nn.Linear)
    assert decayed == linear | {"blocks.1.mixer.in_proj.weight", "blocks.2.mixer.in_proj.weight"}
    assert "blocks.1.mixer.in_proj.bias" in kept and "blocks.1.mixer.a" in kept and "blocks.2.mixer.p" in kept
    for name in ("blocks.0.mixer.A_log", "blocks.0.mixer.dt_bias", "blocks.0.mixer.D", "blocks.0.mixer.W"):
        assert name in kept
    assert any("norm" in n for n in kept) and any("conv" in n for n in kept)
    assert [g["weight_decay"] for g in build_optimizer(model, Config()).param_groups] == [
        Config().optim.weight_decay,
        0.0,
    ]
    bench = state_tracking.optimizer(model, 1e-3, 0.1)
    assert [[id(p) for p in g["params"]] for g in bench.param_groups] == [[id(p) for p in g["params"]] for g in groups]
    assert [g["weight_decay"] for g in state_tracking.optimizer(model, 1e-3, 0.1, "all").param_groups] == [0.1]
