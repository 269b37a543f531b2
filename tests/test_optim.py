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
