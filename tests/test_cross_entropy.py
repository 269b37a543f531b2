"""The chunked cross-entropy (kernels/cross_entropy.py) against F.cross_entropy on full logits, float64, value and
gradients (hidden and weight), over awkward sizes; `LM(tokens, targets=...)` against the cross-entropy of
`LM(tokens)`'s logits for a tied and an untied model, value and every parameter's gradient. The
vocabulary-parallel variant runs on 2 ranks in tests/tp_worker.py (tests/test_tensor_parallel.py)."""

import pytest
import torch
import torch.nn.functional as F

from unroll.kernels.cross_entropy import chunked_cross_entropy, cross_entropy_reference
from unroll.models import LM, ModelConfig

# (N tokens, chunk): one token per chunk, chunks not dividing N, exactly N, more than N, all at once (0)
SIZES = [(13, 1), (13, 4), (13, 5), (12, 4), (13, 13), (13, 100), (13, 0), (1, 1), (1, 0), (1, 7)]


@pytest.mark.parametrize("N,chunk", SIZES)
def test_chunked_equals_full_logits_float64(N, chunk):
    g = torch.Generator().manual_seed(N * 100 + chunk)
    hidden = torch.randn(N, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(17, 6, dtype=torch.float64, generator=g, requires_grad=True)
    targets = torch.randint(0, 17, (N,), generator=g)
    ref = cross_entropy_reference(hidden, weight, targets)
    ref_dh, ref_dw = torch.autograd.grad(ref, (hidden, weight))
    loss = chunked_cross_entropy(hidden, weight, targets, chunk=chunk)
    dh, dw = torch.autograd.grad(loss, (hidden, weight))
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-13)
    torch.testing.assert_close(dh, ref_dh, rtol=0, atol=1e-13)
    torch.testing.assert_close(dw, ref_dw, rtol=0, atol=1e-13)


def test_the_reference_is_torch_cross_entropy():
    g = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(5, 4, generator=g), torch.randn(9, 4, generator=g)
    targets = torch.randint(0, 9, (5,), generator=g)
    assert cross_entropy_reference(hidden, weight, targets) == F.cross_entropy((hidden @ weight.T).float(), targets)


def test_chunks_recompute_their_logits_in_the_backward():
    """With chunks, what the forward keeps for the backward is no larger than the inputs (the logits are
    recomputed); all at once, it keeps [N, V] logits. Measured by the saved-tensor hooks."""
    hidden = torch.randn(64, 8, requires_grad=True)
    weight = torch.randn(500, 8, requires_grad=True)
    targets = torch.randint(0, 500, (64,))

    def saved_elements(chunk: int) -> int:
        sizes = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: sizes.append(t.numel()) or t, lambda t: t):
            chunked_cross_entropy(hidden, weight, targets, chunk=chunk)
        return max(sizes)

    assert saved_elements(0) >= 64 * 500
    assert saved_elements(16) <= 500 * 8  # the weight itself, no logits


def test_no_grad_and_bad_shapes():
    hidden, weight, targets = torch.randn(10, 4), torch.randn(7, 4), torch.randint(0, 7, (10,))
    with torch.no_grad():
        torch.testing.assert_close(
            chunked_cross_entropy(hidden, weight, targets, chunk=3), cross_entropy_reference(hidden, weight, targets)
        )
    with pytest.raises(ValueError, match=r"hidden \(10, 4\), weight \(7, 5\)"):
        chunked_cross_entropy(hidden, torch.randn(7, 5), targets, chunk=3)


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("chunk", [1, 5, 0])
def test_lm_loss_equals_cross_entropy_of_its_logits(tied, chunk):
    cfg = ModelConfig(pattern="GA", vocab_size=23, d_model=16, n_heads=2, tie_embeddings=tied)
    torch.manual_seed(0)
    model = LM(cfg).double()
    tokens = torch.randint(0, 23, (3, 7))
    targets = torch.randint(0, 23, (3, 7))
    ref = F.cross_entropy(model(tokens).flatten(0, 1), targets.flatten())
    ref_grads = torch.autograd.grad(ref, list(model.parameters()))
    model.loss_chunk = chunk
    loss = model(tokens, targets=targets)
    grads = torch.autograd.grad(loss, list(model.parameters()))
    torch.testing.assert_close(loss, ref, rtol=0, atol=1e-13)
    for (name, _), g, r in zip(model.named_parameters(), grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=0, atol=1e-12, msg=name)
    loss2, states = model(tokens, targets=targets, return_states=True)
    assert loss2.shape == () and len(states) == 2
