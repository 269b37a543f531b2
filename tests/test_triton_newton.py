"""The fused Newton solve (kernels/fused_newton.py over the k×k-block kernels of kernels/triton_newton.py, the
Triton cells of kernels/triton_cells.py and tests/block3_fused_cell.py), for ParaGRU, ParaLSTM and a 3×3 cell, against
newton.py's PyTorch Newton path and the sequential loop, in float64: the solution, the iterations, and the
gradients of the inputs, the cell's parameters and h0, with resets and h0, over several chunks (64 steps) and
channel blocks (32 channels), with 2×2 blocks for ParaLSTM. Without a GPU the kernels run in Triton's
interpreter (conftest sets TRITON_INTERPRET=1): sizes stay small. Failing-test checks done by hand: the chunk carry of δ dropped, the
reverse scan's carry dropped, J not zeroed at a reset, h0's gradient taken at a reset — each fails."""

import pytest
import torch

pytest.importorskip("triton")

from unroll.kernels import newton_solve, sequential_solve  # noqa: E402
from unroll.kernels.fused_newton import fused_newton_solve  # noqa: E402
from unroll.kernels.newton import sequential_loop  # noqa: E402
from unroll.models.paragru import ParaGRUCell  # noqa: E402
from unroll.models.paralstm import ParaLSTMCell  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def problem(B, T, D, seed, reset_rate=0.1, dtype=torch.float64, scale=0.5, cell="gru"):
    """(cell, u [B, T, 3, D], h0 [B, D] or [B, D, 2], resets, the cell's parameters), all but resets requiring grad."""
    g = torch.Generator().manual_seed(seed)

    def uniform(*shape):
        return ((torch.rand(*shape, generator=g, dtype=torch.float64) - 0.5) * 2 * scale).to(DEVICE, dtype)

    params = [uniform(3, D)] + ([uniform(2, D)] if cell == "lstm" else [])
    u = torch.randn(B, T, 3, D, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    h0 = torch.randn(B, D, *([2] if cell == "lstm" else []), generator=g, dtype=torch.float64).to(DEVICE, dtype)
    resets = (torch.rand(B, T, generator=g) < reset_rate).to(DEVICE) if reset_rate else None
    params = [p.requires_grad_() for p in params]
    made = ParaLSTMCell(*params) if cell == "lstm" else ParaGRUCell(*params)
    return made, u.requires_grad_(), h0.requires_grad_(), resets, params


STRUCTURE = {"gru": "diag", "lstm": ("block", 2)}


@pytest.mark.parametrize("cell_name", ["gru", "lstm"])
@pytest.mark.parametrize(
    "B,T,D,with_resets", [(2, 1, 3, True), (2, 70, 5, False), (2, 70, 5, True), (1, 130, 34, True)]
)  # one step; two chunks; three chunks and two channel blocks
def test_fused_equals_the_pytorch_newton_path_and_the_loop(cell_name, B, T, D, with_resets):
    cell, u, h0, resets, params = problem(B, T, D, T * D + with_resets, 0.1 if with_resets else 0, cell=cell_name)
    h, info = fused_newton_solve(cell, u, h0, resets=resets)
    h_ref, info_ref = newton_solve(cell, u, h0, structure=STRUCTURE[cell_name], resets=resets)
    with torch.no_grad():
        h_loop = sequential_loop(cell, u, h0, resets)
    assert info.converged and info.fallback is None and info.iterations == info_ref.iterations
    # both solves stop at a relative residual ≤ 1e-12 (float64's tolerance), so they agree to about that
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-11)
    torch.testing.assert_close(h, h_loop, rtol=0, atol=1e-11)

    weights = torch.randn_like(h)
    inputs = (u, h0, *params)
    grads = torch.autograd.grad((h * weights).sum(), inputs)
    h_seq, _ = sequential_solve(cell, u, h0, structure=STRUCTURE[cell_name], resets=resets)  # newton.py's adjoint
    expected = torch.autograd.grad((h_seq * weights).sum(), inputs)
    for name, got, want in zip(("u", "h0", "a", "p"), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("cell_name", ["gru", "lstm"])
def test_gradients_equal_autograd_through_the_plain_loop(cell_name):
    # an independent reference: torch.autograd differentiating the step-by-step loop itself
    cell, u, h0, resets, params = problem(2, 80, 6, seed=5, cell=cell_name)
    h, _ = fused_newton_solve(cell, u, h0, resets=resets)
    weights = torch.randn_like(h)
    inputs = (u, h0, *params)
    grads = torch.autograd.grad((h * weights).sum(), inputs)
    expected = torch.autograd.grad((sequential_loop(cell, u, h0, resets) * weights).sum(), inputs)
    for got, want in zip(grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("cell_name", ["gru", "lstm"])
def test_a_sequence_newton_leaves_unsolved_is_redone_and_reported(cell_name):
    # one iteration cannot solve 100 steps: every sequence falls back, and the result is still the loop's
    # (damping="none"); with damping, the damped PyTorch Newton's one iteration comes first, then the same
    cell, u, h0, resets, _ = problem(2, 100, 4, seed=9, reset_rate=0.05, cell=cell_name)
    for damping, iterations in (("none", 1), ("trust_region", 2)):
        h, info = fused_newton_solve(cell, u, h0, resets=resets, max_iters=1, damping=damping)
        assert not info.converged and info.fallback_sequences == 2 and "sequential for 2 of 2" in info.fallback
        assert info.iterations == iterations and info.damped_sequences == 0, (damping, info)
        with torch.no_grad():
            torch.testing.assert_close(h, sequential_loop(cell, u, h0, resets), rtol=0, atol=1e-12)


def test_sequences_whose_plain_steps_blow_up_are_solved_by_damped_newton():
    # a fused cell whose first Newton step blows up everywhere (tests/stiff_fused_cells.py): the kernel's plain
    # steps leave every sequence unsolved; without damping they are redone step by step, with it damped Newton
    # solves them; both equal the loop, forward and (through the fused adjoint) backward
    from stiff_cells import stiff_problem
    from stiff_fused_cells import FusedGatedSwitch

    base, x, h0, resets, _ = stiff_problem("diag", 200, seed=2, a=15.0)
    cell = FusedGatedSwitch(base.a.expand(x.shape[-1]).clone().to(DEVICE).requires_grad_())
    x, h0, resets = x.to(DEVICE).requires_grad_(), h0.to(DEVICE).requires_grad_(), resets.to(DEVICE)
    with torch.no_grad():
        _, plain = fused_newton_solve(cell, x, h0, resets=resets, damping="none")
    assert plain.fallback_sequences == 3 and plain.damped_sequences == 0, plain
    h, info = fused_newton_solve(cell, x, h0, resets=resets)
    assert info.converged and (info.damped_sequences, info.fallback_sequences) == (3, 0), info
    ref = sequential_loop(cell, x, h0, resets)  # plain autograd through the loop
    torch.testing.assert_close(h, ref, rtol=0, atol=1e-10)
    weights = torch.randn_like(h)
    inputs = (x, h0, cell.a)
    for name, got, want in zip(
        ("x", "h0", "a"),
        torch.autograd.grad((h * weights).sum(), inputs),
        torch.autograd.grad((ref * weights).sum(), inputs),
    ):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"d{n}: {m}")


@pytest.mark.parametrize("cell_name", ["gru", "lstm"])
def test_float32_and_no_gradient_needed(cell_name):
    cell, u, h0, resets, _ = problem(2, 90, 7, seed=4, dtype=torch.float32, cell=cell_name)
    with torch.no_grad():
        h, info = fused_newton_solve(cell, u, h0, resets=resets)
        loop = sequential_loop(cell, u.double(), h0.double(), resets)
    assert h.dtype == torch.float32 and not h.requires_grad and info.converged
    torch.testing.assert_close(h.double(), loop, rtol=0, atol=1e-5)


def test_empty_sequence_and_bad_inputs_are_named():
    cell, u, h0, _, _ = problem(2, 5, 3, seed=1)
    h, info = fused_newton_solve(cell, u[:, :0], h0)
    assert h.shape == (2, 0, 3) and info.converged
    with pytest.raises(ValueError, match=r"are not \[B, T, G, D\], \[B, D\] \(or \[B, D, k\]\), \[P, D\]"):
        fused_newton_solve(cell, u, h0[:, :2])
    # a state whose block does not match the cell's kernel: ParaLSTM's 2×2 kernel given ParaGRU's state, and back
    lstm, u2, c0, _, _ = problem(2, 5, 3, seed=1, cell="lstm")
    with pytest.raises(ValueError, match=r"PARALSTM' has 2×2 blocks: its state is \[B, D, 2\], not \[2, 3\]"):
        fused_newton_solve(lstm, u2, c0[..., 0])
    with pytest.raises(ValueError, match=r"PARAGRU' has 1×1 blocks: its state is \[B, D\], not \[2, 3, 2\]"):
        fused_newton_solve(cell, u, c0)
    with pytest.raises(TypeError, match="must be one float dtype"):
        fused_newton_solve(cell, u, h0.float())
    with pytest.raises(ValueError, match=r"resets \(2, 4\) is not \[B, T\]"):
        fused_newton_solve(cell, u, h0, resets=torch.zeros(2, 4, dtype=torch.bool, device=DEVICE))


def test_a_model_with_the_fused_kernel_equals_the_pytorch_path(monkeypatch):
    # model.newton_kernel=fused through LM.forward (ParaGRU, attention, ParaLSTM), float64, with
    # documents: logits and every parameter's gradient as with newton_kernel=pytorch
    from unroll.kernels import fused_newton
    from unroll.models import LM, ModelConfig

    calls = []
    solve = fused_newton.fused_newton_solve
    monkeypatch.setattr(fused_newton, "fused_newton_solve", lambda *a, **k: calls.append(1) or solve(*a, **k))

    models = {}
    for kernel in ("fused", "pytorch"):
        torch.manual_seed(0)
        cfg = ModelConfig(pattern="GAL", vocab_size=50, d_model=16, n_heads=2, solver="newton", newton_kernel=kernel)
        models[kernel] = LM(cfg).double().to(DEVICE)
    tokens = torch.randint(0, 50, (2, 70), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    resets = torch.zeros(2, 70, dtype=torch.bool, device=DEVICE)
    resets[0, [20, 64]] = resets[1, 33] = True
    outs = {k: m(tokens, resets=resets) for k, m in models.items()}
    assert len(calls) == 2  # the fused model's ParaGRU and ParaLSTM layers, and only those
    torch.testing.assert_close(outs["fused"], outs["pytorch"], rtol=0, atol=1e-12)
    weights = torch.randn_like(outs["fused"])
    for out in outs.values():
        (out * weights).sum().backward()
    named = dict(models["pytorch"].named_parameters())
    for name, p in models["fused"].named_parameters():
        torch.testing.assert_close(p.grad, named[name].grad, rtol=1e-10, atol=1e-12, msg=lambda m, n=name: f"{n}: {m}")
    solves = [block.mixer.last_solve for block in models["fused"].blocks if hasattr(block.mixer, "last_solve")]
    assert len(solves) == 2 and all(info.converged and info.iterations > 0 for info in solves)


def test_newton_kernel_key_is_checked_and_auto_fuses_only_on_cuda():
    from unroll.models import LM, ModelConfig
    from unroll.train.config import ConfigError, load_config

    assert ("newton_kernel", "must be one of auto, fused, pytorch, compiled, got 'fast'") in ModelConfig(
        pattern="G", newton_kernel="fast"
    ).problems()
    with pytest.raises(ConfigError, match=r"model.newton_kernel.*must be one of auto, fused, pytorch, compiled"):
        load_config("tiny-gru", ["model.newton_kernel=triton"])
    for block in LM(ModelConfig(pattern="GL", d_model=16, n_heads=2)).blocks:
        assert block.mixer.fused(torch.device("cuda")) and not block.mixer.fused(torch.device("cpu"))


def test_a_compiled_block_keeps_the_fused_solve_in_one_graph():
    # train.compile compiles each block: with the fused kernel a ParaGRU block compiles with fullgraph=True (any
    # graph break would raise) and gives the eager block's output and gradients; the solve's stats are read after
    import torch._dynamo

    from unroll.models import LM, ModelConfig

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(pattern="GG", vocab_size=50, d_model=16, n_heads=2, solver="newton", newton_kernel="fused")
    model = LM(cfg).double().to(DEVICE)
    x = torch.randn(2, 40, 16, dtype=torch.float64, device=DEVICE, requires_grad=True)
    resets = torch.zeros(2, 40, dtype=torch.bool, device=DEVICE)
    resets[1, 17] = True
    block = model.blocks[0]
    compiled = torch.compile(block, fullgraph=True)
    outs = [f(x, resets=resets) for f in (compiled, block)]
    outs = [o[0] if isinstance(o, tuple) else o for o in outs]
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=1e-12)
    grads = [torch.autograd.grad(o.sum(), (x, block.mixer.a)) for o in outs]
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert block.mixer.last_solve.converged and block.mixer.last_solve.iterations > 0


def test_the_fused_solve_reports_what_solved_each_sequence():
    # plain Newton steps only: every sequence counted as solved by them, or by the fallback
    cell, u, h0, resets, _ = problem(3, 40, 4, seed=2)
    _, info = fused_newton_solve(cell, u, h0, resets=resets)
    assert (info.newton_sequences, info.damped_sequences, info.fallback_sequences) == (3, 0, 0)
    _, info = fused_newton_solve(cell, u, h0, resets=resets, max_iters=0)
    assert (info.newton_sequences, info.damped_sequences, info.fallback_sequences) == (0, 0, 3)


@pytest.mark.parametrize("B,T,D,with_resets", [(2, 70, 5, True), (1, 20, 33, False)])  # 2 chunks; 2 channel blocks
def test_a_users_3x3_block_cell_equals_the_pytorch_newton_path_and_the_loop(B, T, D, with_resets):
    """Any k×k-block cell with Triton code is fused: tests/block3_fused_cell.py's tanh(M_d s + u), whose 3×3
    Jacobian blocks are full, against newton.py's ("block", 3) path (its Jacobian by forward-mode autodiff) and the
    sequential loop: the solution, and the gradients of u, s0 and M against autograd through the loop."""
    from block3_fused_cell import problem as rotor_problem

    cell, u, s0, resets, M = rotor_problem(B, T, D, seed=T + D, device=DEVICE)
    resets = resets if with_resets else None
    h, info = fused_newton_solve(cell, u, s0, resets=resets)
    h_ref, info_ref = newton_solve(cell, u, s0, structure=("block", 3), resets=resets)
    assert info.converged and info.fallback is None and info.iterations == info_ref.iterations > 2
    torch.testing.assert_close(h, h_ref, rtol=0, atol=1e-11)
    loop = sequential_loop(cell, u, s0, resets)
    torch.testing.assert_close(h, loop, rtol=0, atol=1e-11)
    weights = torch.randn_like(h)
    grads = torch.autograd.grad((h * weights).sum(), (u, s0, M))
    expected = torch.autograd.grad((loop * weights).sum(), (u, s0, M))
    for name, got, want in zip(("u", "s0", "M"), grads, expected):
        torch.testing.assert_close(got, want, rtol=1e-11, atol=1e-11, msg=lambda m, n=name: f"d{n}: {m}")


def test_block_kernels_are_written_out_for_each_size_and_checked():
    from unroll.kernels import triton_newton

    newton, adjoint = triton_newton.kernels(4, 2)  # written out and compiled by Triton's front end (interpreter)
    assert newton.fn.__name__ == "newton_k4_p2" and adjoint.fn.__name__ == "adjoint_k4_p2"
    assert triton_newton.newton_k4_p2 is newton  # by name, as `unroll check kernels` resolves a recorded launch
    with pytest.raises(ValueError, match=r"k = 5 \(1 to 4\)"):
        triton_newton.FusedBlockKernel(None, None, k=5, params=1)
