"""model.newton_kernel=compiled: newton_solve with its elementwise pieces through torch.compile
(kernels/newton.py's compiled_pieces) equals the eager PyTorch path in float64, forward and every gradient,
for ParaGRU (diagonal) and ParaLSTM (2×2 blocks) with documents and a carried state, and a second forward
(new cell objects, the same shapes) compiles nothing new."""

import torch
import torch._dynamo
from torch._dynamo.utils import counters

from unroll.kernels import newton_solve
from unroll.models import LM, ModelConfig


def test_a_model_with_compiled_newton_equals_the_eager_path():
    models = {}
    for kernel in ("compiled", "pytorch"):
        torch.manual_seed(0)
        cfg = ModelConfig(pattern="GAL", vocab_size=50, d_model=16, n_heads=2, solver="newton", newton_kernel=kernel)
        models[kernel] = LM(cfg).double()
    tokens = torch.randint(0, 50, (2, 45), generator=torch.Generator().manual_seed(1))
    resets = torch.zeros(2, 45, dtype=torch.bool)
    resets[0, [20, 31]] = resets[1, 7] = True
    outs = {k: m(tokens, resets=resets) for k, m in models.items()}
    torch.testing.assert_close(outs["compiled"], outs["pytorch"], rtol=0, atol=1e-12)
    weights = torch.randn_like(outs["compiled"])
    for out in outs.values():
        (out * weights).sum().backward()
    named = dict(models["pytorch"].named_parameters())
    for name, p in models["compiled"].named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    for kernel, model in models.items():
        solves = [block.mixer.last_solve for block in model.blocks if hasattr(block.mixer, "last_solve")]
        assert len(solves) == 2 and all(s.converged and s.iterations > 0 for s in solves), (kernel, solves)

    graphs = counters["stats"]["unique_graphs"]
    (models["compiled"](tokens, resets=resets) * weights).sum().backward()
    assert counters["stats"]["unique_graphs"] == graphs  # nothing recompiled: not per call, not per iteration


def test_compiled_pieces_take_the_damped_steps_of_the_eager_solve():
    # a cell whose first Newton step blows up everywhere (tests/stiff_cells.py): the compiled trust-region
    # update takes the same damped steps as the eager one, and both equal the loop
    from stiff_cells import stiff_problem

    cell, x, h0, resets, spec = stiff_problem("diag", 120, seed=2, a=15.0)
    with torch.no_grad():
        h_eager, eager = newton_solve(cell, x, h0, structure=spec, resets=resets)
        h_comp, comp = newton_solve(cell, x, h0, structure=spec, resets=resets, compiled=True)
    assert comp.damped_sequences == eager.damped_sequences > 0 and comp.fallback_sequences == 0, (comp, eager)
    assert comp.iterations == eager.iterations
    torch.testing.assert_close(h_comp, h_eager, rtol=0, atol=1e-12)
