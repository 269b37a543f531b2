"""A checkpoint never holds a NaN or an inf: a save whose model or optimizer state has one is refused
before anything is written, naming the tensor and the step, in line or async; the checkpoints before it
are untouched and resume exactly. (Two FSDP ranks with the NaN on one: test_checkpoint_disk_faults.py.)"""

import fault_injection
import pytest
import torch
from conftest import losses

from unroll.train.checkpoint import dcp as checkpoint
from unroll.train.checkpoint import integrity
from unroll.train.checkpoint.finite import first_non_finite
from unroll.train.trainer import train


@pytest.mark.parametrize(
    "async_save,target,name",
    [
        (False, "blocks.0.mixer.out_proj.weight", "model.blocks.0.mixer.out_proj.weight"),
        (True, "blocks.1.mlp.down.weight:exp_avg_sq", "optim.state.blocks.1.mlp.down.weight.exp_avg_sq"),
    ],
    ids=["sync_weight", "async_optimizer_state"],
)
def test_a_non_finite_save_is_refused_and_nothing_is_written(
    straight, config_at, tmp_path, monkeypatch, async_save, target, name
):
    cfg = config_at(tmp_path, "nan", checkpoint={"async_save": async_save})
    with monkeypatch.context() as m:
        fault_injection.install(f"nan@8:{target}", m.setattr)
        with pytest.raises(checkpoint.CheckpointError) as raised:
            train(cfg)
    root = checkpoint.checkpoint_root(cfg.run.dir)
    assert str(raised.value) == (
        f"checkpoint of step 8 refused: {name} holds NaN or inf values; nothing was "
        f"written, the checkpoints in {root} are as they were"
    )
    assert sorted(p.name for p in root.iterdir()) == ["step_00000004"]  # no step_00000008(.tmp)
    assert integrity.problem(root / "step_00000004", cfg.model) is None

    assert train(cfg)["step"] == 12  # resumes from step 4
    assert losses(cfg.run.dir) == losses(straight.run.dir)


def test_the_check_names_the_first_bad_tensor_and_is_exact():
    """One sum per tensor finds NaN and inf in any floating dtype; a sum that overflows on finite values
    (3e38 + 3e38 in float32) is checked exactly, not refused; integer tensors are not checked."""
    big = torch.full((4,), 3e38)
    state = {
        "model": {"a": torch.ones(3), "big": big, "count": torch.tensor([7])},
        "optim": {"state": {"a": {"exp_avg": torch.zeros(2, 2)}}, "param_groups": [{"lr": 0.1}]},
    }
    assert first_non_finite(state) is None
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        for bad in (float("nan"), float("inf"), float("-inf")):
            exp_avg = torch.zeros(2, 2, dtype=dtype)
            exp_avg[1, 0] = bad
            state["optim"]["state"]["a"]["exp_avg"] = exp_avg
            state["optim"]["state"]["b"] = {"exp_avg": torch.tensor([bad])}  # after it: the first is named
            assert first_non_finite(state) == "optim.state.a.exp_avg", (dtype, bad)
