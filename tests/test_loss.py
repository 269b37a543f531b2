"""The training loss (train/loss.py), one definition for plain and pipelined runs: the batch split, the
cross-entropy from the final hidden states as the model computes it, and the MoE balancing losses joined
to a micro-batch's backward, whether added to its loss (plain) or to a stage's output (pipelined)."""

import torch

from unroll.models import LM, ModelConfig
from unroll.train.loss import (
    hidden_loss,
    lm_loss,
    micro_batch_backward,
    micro_batch_objective,
    schedule_loss,
    split_batch,
    with_moe_loss,
)


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{"pattern": "GA", "vocab_size": 23, "d_model": 16, "n_heads": 2, **kw})


def test_split_batch_shifts_the_targets_and_slices_the_context_rank():
    batch = torch.arange(18).reshape(2, 9)
    inputs, targets = split_batch(batch)
    assert torch.equal(inputs, batch[:, :-1]) and torch.equal(targets, batch[:, 1:])
    inputs, targets = split_batch(batch, cp_rank=1, cp=2)
    assert torch.equal(inputs, batch[:, 4:8]) and torch.equal(targets, batch[:, 5:9])


def test_the_model_and_a_last_stage_compute_one_cross_entropy():
    torch.manual_seed(0)
    model = LM(tiny(tie_embeddings=False)).double()
    model.loss_chunk = 5
    batch = torch.randint(0, 23, (3, 8))
    inputs, targets = split_batch(batch)
    x = model.embed(inputs)
    for block in model.blocks:
        x, _ = block(x)
    from_hidden = hidden_loss(model.norm(x), model.output_weight(), targets, chunk=5)
    assert torch.equal(lm_loss(model, batch), from_hidden)
    assert torch.equal(schedule_loss(torch.stack([from_hidden]), targets), from_hidden)


def test_a_micro_batch_backward_is_its_share_of_loss_plus_moe_losses():
    torch.manual_seed(0)
    model = LM(tiny(pattern="GG", mlp_pattern="EE")).double()
    batch = torch.randint(0, 23, (2, 7))
    loss = lm_loss(model, batch)
    aux = model.aux_loss()
    assert aux is not None and torch.equal(micro_batch_objective(loss, aux), loss + aux)
    assert micro_batch_objective(loss, None) is loss
    micro_batch_backward(loss, aux, 3)
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    ((lm_loss(model, batch) + model.aux_loss()) / 3).backward()
    for g, p in zip(grads, model.parameters()):
        assert torch.equal(g, p.grad)


def test_with_moe_loss_adds_the_stage_losses_to_the_backward():
    w = torch.tensor([1.0, 2.0], dtype=torch.float64, requires_grad=True)
    x = w * 3
    aux = (w**2).sum()
    out = with_moe_loss(x, aux)
    assert torch.equal(out, x) and out.data_ptr() != x.data_ptr()  # a copy: schedules detach it in place
    out.sum().backward()
    torch.testing.assert_close(w.grad, 3 + 2 * w.detach(), rtol=0, atol=0)
