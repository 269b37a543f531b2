"""Damped Newton (kernels/newton_damping.py) in float64: on stiff cells (tests/stiff_cells.py: |∂f/∂h| ≈ 10–40
at Newton's first guess over the whole sequence, ≈ 0 at the solution) plain Newton falls back and the damped
solve converges in a few iterations without the step-by-step path, equal to the loop forward and backward,
with resets and h0, for diagonal and 2×2-block states; where plain Newton is fine the damped solve is plain
Newton bit for bit, per sequence; SolveInfo says which path solved what."""

import pytest
import torch
from stiff_cells import stiff_problem

from unroll.kernels import newton_solve
from unroll.kernels.linear_scan import linear_scan
from unroll.kernels.newton import MAX_ITERS, TOLERANCE, sequential_loop, shift
from unroll.kernels.newton_damping import TrustRegion
from unroll.kernels.structure import Structure


def loop(cell, x, h0, resets):
    """h_t = cell(h_{t−1}, x_t) one step at a time under plain autograd, h_{t−1} = 0 at resets."""
    h, out = h0, []
    for t, x_t in enumerate(x.unbind(1)):
        h = h * (~resets[:, t]).to(h.dtype).view(-1, *([1] * (h.dim() - 1)))
        h = cell(h.unsqueeze(1), x_t.unsqueeze(1)).squeeze(1)
        out.append(h)
    return torch.stack(out, 1)


@pytest.mark.parametrize("structure", ["diag", "block"])
@pytest.mark.parametrize("T", [300, 1000])
def test_damped_newton_solves_stiff_cells_that_plain_newton_leaves_to_the_fallback(structure, T):
    # slope 15·s: at 10, plain Newton's garbage iterates happen to settle one 2×2 sequence of T = 300 by
    # its 12th iteration under some rounding orders of the scan (the pass/fail of a blown-up solve is luck)
    cell, x, h0, resets, spec = stiff_problem(structure, T, seed=T, a=15.0)
    with torch.no_grad():
        _, plain = newton_solve(cell, x, h0, structure=spec, resets=resets, damping="none")
    assert plain.fallback_sequences == 3 and not plain.converged and plain.iterations <= MAX_ITERS, plain

    leaves = [x.requires_grad_(), h0.requires_grad_(), cell.a.requires_grad_()]
    h, info = newton_solve(cell, x, h0, structure=spec, resets=resets)
    # seen: 3 or 4 iterations (the first step blows up everywhere, then the Picard step and damped steps)
    assert info.converged and info.fallback is None and info.iterations <= MAX_ITERS // 2, info
    assert (info.damped_sequences, info.newton_sequences, info.fallback_sequences) == (3, 0, 0), info
    assert info.residual <= TOLERANCE[torch.float64], info
    ref = loop(cell, x, h0, resets)
    torch.testing.assert_close(h, ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(h)
    grads = torch.autograd.grad((h * g).sum(), leaves)
    for name, a, b in zip(["x", "h0", "a"], grads, torch.autograd.grad((ref * g).sum(), leaves)):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10, msg=name)


def easy_problem(structure, T, seed):
    """Cells whose Newton converges in a few plain steps (|∂f/∂h| < 1): x, h0, resets, the spec."""
    g = torch.Generator().manual_seed(seed)
    B, D = 3, 5
    if structure == "dense":
        W = torch.randn(D, D, generator=g, dtype=torch.float64) * 0.8 / D**0.5
        x = torch.randn(B, T, D, generator=g, dtype=torch.float64)
        h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
        return (lambda h, u: torch.tanh(h @ W + u)), x, h0, torch.rand(B, T, generator=g) < 0.02, "dense"
    cell, x, h0, resets, spec = stiff_problem(structure, T, seed, a=0.5)  # the switch's slope is at most 0.5·s ≤ 1
    return cell, x, h0, resets, spec


@pytest.mark.parametrize("structure", ["diag", "block", "dense"])
def test_where_plain_newton_is_fine_damped_newton_is_plain_newton_bit_for_bit(structure):
    cell, x, h0, resets, spec = easy_problem(structure, 500, seed=1)
    with torch.no_grad():
        plain, plain_info = newton_solve(cell, x, h0, structure=spec, resets=resets, damping="none")
        damped, info = newton_solve(cell, x, h0, structure=spec, resets=resets)
    assert plain_info.converged and 1 <= plain_info.iterations < MAX_ITERS, plain_info
    assert torch.equal(damped, plain)
    assert info == plain_info and (info.newton_sequences, info.damped_sequences) == (3, 0), info


def test_the_decision_is_per_sequence():
    """One easy sequence in a batch of stiff ones: the stiff ones are damped and solved, the easy one takes
    plain Newton's steps bit for bit (compared with plain Newton run for the same number of iterations)."""
    cell, x, h0, resets, spec = stiff_problem("block", 400, seed=3)
    x[0, :, 2] = x[0, :, 2] * 0.02  # branch heights s ≤ 0.04: the switch's slope a·s ≤ 0.4 in sequence 0
    with torch.no_grad():
        damped, info = newton_solve(cell, x, h0, structure=spec, resets=resets)
        plain, plain_info = newton_solve(cell, x, h0, structure=spec, resets=resets, damping="none")
        same_steps, _ = newton_solve(
            cell, x, h0, structure=spec, resets=resets, damping="none", max_iters=info.iterations
        )
    assert (info.newton_sequences, info.damped_sequences, info.fallback_sequences) == (1, 2, 0), info
    assert (plain_info.newton_sequences, plain_info.damped_sequences, plain_info.fallback_sequences) == (1, 0, 2)
    assert torch.equal(damped[0], same_steps[0])
    torch.testing.assert_close(damped, sequential_loop(cell, x, h0, resets), rtol=1e-10, atol=1e-10)


def test_the_fallback_stays_the_last_resort_and_says_what_it_solved():
    cell, x, h0, resets, spec = stiff_problem("diag", 300, seed=4)
    with torch.no_grad():
        h, info = newton_solve(cell, x, h0, structure=spec, resets=resets, max_iters=1)
    assert not info.converged and info.fallback == "sequential for 3 of 3 sequences" and info.iterations == 1
    assert info.as_dict() | {"residual": 0.0} == {
        "iterations": 1,
        "residual": 0.0,
        "converged": False,
        "fallback": "sequential for 3 of 3 sequences",
        "fallback_sequences": 3,
        "newton_sequences": 0,
        "damped_sequences": 0,
    }
    torch.testing.assert_close(h, sequential_loop(cell, x, h0, resets), rtol=0, atol=0)


@pytest.mark.parametrize("structure", ["diag", "block"])
def test_a_damped_step_keeps_the_exact_prefix_and_makes_the_next_position_exact(structure):
    """The prefix property, through the trust test: an iterate exact on its first p positions and far off
    after them (so the Newton step blows up there) is exact on p + 1 positions after one damped step."""
    cell, x, h0, _, spec = stiff_problem(structure, 200, seed=5, reset_rate=0.0)
    st, p, tol = Structure.parse(spec), 37, TOLERANCE[torch.float64]
    with torch.no_grad():
        h = sequential_loop(cell, x, h0, None)
        h[:, p:] = cell(torch.zeros_like(h[:, p:]), x[:, p:])  # the first guess after p: the steep point
        region = TrustRegion(h.shape[0], h.dtype, h.device, st)
        f, J = st.value_and_jacobian(cell, shift(h, h0, None), x)
        a, b = st.to_scan(region.transfer(J), f - h)
        h, outside = region.step(h, st.from_scan(linear_scan(a, b)), f)
        assert outside.all()  # the plain step blew up in every sequence
        f_new = cell(shift(h, h0, None), x)
        exact = ((f_new - h).abs() / (1 + f_new.abs())).flatten(2).amax(2) <= tol  # [B, T]
    assert exact[:, : p + 1].all()
    region.widen()
    region.cut(outside)
    assert region.damped.all() and (region.radius == 1.0).all()


def test_an_unknown_damping_is_named():
    cell, x, h0, resets, spec = stiff_problem("diag", 10, seed=6)
    with pytest.raises(ValueError, match=r"damping 'lm': expected one of none, trust_region"):
        newton_solve(cell, x, h0, structure=spec, damping="lm")


def test_the_trust_radius_clips_the_damped_sequences_jacobians_and_widens_back_to_plain_newton():
    st = Structure("block", 2)
    region = TrustRegion(2, torch.float64, torch.device("cpu"), st)
    J = (3 * torch.eye(2, dtype=torch.float64)).expand(2, 7, 4, 2, 2)
    assert region.transfer(J) is J  # nothing damped: not even computed
    region.widen()
    region.cut(torch.tensor([True, False]))  # sequence 0's plain step left its trust region
    region.engaged = True
    A = region.transfer(J)
    torch.testing.assert_close(torch.linalg.matrix_norm(A[0]), torch.ones(7, 4, dtype=torch.float64))
    assert torch.equal(A[1], J[1])
    radii = []
    for _ in range(5):  # steps that stay in their trust region: 1 → 2 → 4 → 8 → 16 → plain Newton
        region.widen()
        region.cut(torch.tensor([False, False]))
        radii.append(region.radius[0].item())
    assert radii == [2.0, 4.0, 8.0, 16.0, float("inf")] and region.radius[1].item() == float("inf")
    region.radius = torch.tensor([4.0, float("inf")], dtype=torch.float64)
    region.widen()  # a step at radius 4 that leaves the trust region: the next one gets 2
    region.cut(torch.tensor([True, False]))
    assert region.radius.tolist() == [2.0, float("inf")] and region.damped.tolist() == [True, False]


@pytest.mark.parametrize("damping", ["none", "trust_region"])
def test_model_newton_damping_reaches_every_newton_solve(monkeypatch, damping):
    import unroll.models.m2rnn as m2rnn_module
    import unroll.models.recurrent as recurrent_module
    from unroll.models import LM, ModelConfig

    seen = []

    def recording(solve):
        def wrapped(*args, **kwargs):
            seen.append(kwargs["damping"])
            return solve(*args, **kwargs)

        return wrapped

    monkeypatch.setattr(recurrent_module, "newton_solve", recording(recurrent_module.newton_solve))
    monkeypatch.setattr(m2rnn_module, "newton_solve", recording(m2rnn_module.newton_solve))
    cfg = ModelConfig(pattern="GLM", vocab_size=50, d_model=16, n_heads=2, solver="newton", newton_damping=damping)
    cfg.m2rnn.solver, cfg.m2rnn.k_dim, cfg.m2rnn.v_dim = "newton", 8, 8
    model = LM(cfg, seed=0).double()
    model(torch.randint(0, 50, (2, 12), generator=torch.Generator().manual_seed(0)))
    assert seen == [damping] * 3


def test_an_unknown_model_newton_damping_is_named():
    from unroll.models import ModelConfig
    from unroll.train.config import ConfigError, load_config

    assert ("newton_damping", "must be one of none, trust_region, got 'lm'") in ModelConfig(
        newton_damping="lm"
    ).problems()
    with pytest.raises(ConfigError, match=r"model.newton_damping.*must be one of none, trust_region"):
        load_config("tiny-gru", ["model.newton_damping=elk"])
