"""The state-dict views DCP reads and writes (train/checkpoint/views.py), in one process; the views of real
tp and ep layouts run on 2 ranks in tests/tp_worker.py and tests/test_train_relayout.py."""

import subprocess
import sys

import torch

from unroll.models import LM
from unroll.models.config import ModelConfig
from unroll.train.checkpoint.views import dcp_view, ep_view, tp_view


def test_checkpoint_code_does_not_import_tensor_parallelism():
    """The checkpoint room needs the views, not the tp machinery (plans, styles, the models they shard)."""
    code = (
        "import sys, unroll.train.checkpoint.dcp, unroll.train.checkpoint.writer, unroll.train.checkpoint.resolve\n"
        "print(sorted(m for m in sys.modules if m.startswith('unroll.train.parallel.tensor_parallel')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_single_device_state_is_its_own_view():
    model = LM(ModelConfig(pattern="GA", vocab_size=64, d_model=16, n_heads=2))
    optimizer = torch.optim.AdamW(model.parameters())
    state = {"model": model.state_dict(), "optim": optimizer.state_dict()}
    assert ep_view(model, state) is state  # no expert-parallel parameter
    view = dcp_view(model, state)
    for name, t in state["model"].items():
        assert view["model"][name] is t  # plain tensors pass through: a load into the view lands in place
    nested = tp_view({"a": [torch.ones(2), 3]})
    assert nested["a"][1] == 3 and torch.equal(nested["a"][0], torch.ones(2))
