"""MoE MLP: dropless top-k routing against a dense reference, grouped vs looped experts, balancing losses,
the aux-loss-free bias, parameter accounting."""

import pytest
import torch
import torch.nn.functional as F

from unroll.models.moe import MoE, grouped_mm_supported

D, E, K, H = 16, 6, 2, 8


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: extra OpenMP threads only add synchronisation, which costs ~100 ms per
    matmul on a loaded 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make(dtype=torch.float64, seed=0, **kw) -> MoE:
    torch.manual_seed(seed)
    kw = {"n_experts": E, "top_k": K, "hidden": H, "init_std": 0.3} | kw
    return MoE(D, **kw).to(dtype)


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Every expert on every token, mixed by a [T, E] combine matrix that is zero off the selected experts."""
    xf = x.reshape(-1, D)
    logits = xf @ moe.router.weight.T
    scores = logits.softmax(-1) if moe.score == "softmax" else logits.sigmoid()
    idx = (scores + moe.expert_bias).topk(moe.top_k, dim=-1).indices
    w = scores.gather(-1, idx)
    combine = torch.zeros_like(scores).scatter(-1, idx, w / w.sum(-1, keepdim=True))
    out = torch.zeros_like(xf)
    for e in range(moe.n_experts):
        gate, up = (xf @ moe.w_gate_up[e]).chunk(2, dim=-1)
        out = out + combine[:, e, None] * ((F.silu(gate) * up) @ moe.w_down[e])
    if moe.shared is not None:
        out = out + moe.shared(xf)
    return out.reshape(x.shape)


def outputs_and_grads(moe: MoE, fn, x: torch.Tensor):
    x = x.detach().requires_grad_()
    moe.zero_grad()
    y = fn(x)
    y.backward(torch.randn_like(y, generator=torch.Generator().manual_seed(1)))
    return [y.detach(), x.grad] + [p.grad.clone() for p in moe.parameters()]


def assert_all_close(a, b, **tol):
    assert len(a) == len(b)
    for u, v in zip(a, b):
        torch.testing.assert_close(u, v, **tol)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
@pytest.mark.parametrize("shared", [0, 2])
def test_matches_dense_reference(score, shared):
    moe = make(score=score, shared_experts=shared, shared_hidden=4)
    x = torch.randn(3, 7, D, dtype=torch.float64)
    assert_all_close(outputs_and_grads(moe, moe, x), outputs_and_grads(moe, lambda t: reference(moe, t), x))
    assert moe.last_load.sum() == 21 * K


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_changes_selection_not_weights(score):
    moe = make(score=score)
    x = torch.randn(40, D, dtype=torch.float64)
    with torch.no_grad():
        moe.expert_bias[0] = 5.0  # every token now has expert 0 among its k
        scores = (x @ moe.router.weight.T).softmax(-1) if score == "softmax" else (x @ moe.router.weight.T).sigmoid()
    assert not (scores.topk(K).indices == 0).any(-1).all()  # the pure scores would not pick it everywhere
    assert_all_close(outputs_and_grads(moe, moe, x), outputs_and_grads(moe, lambda t: reference(moe, t), x))
    assert moe.last_load[0] == 40
    assert not moe.expert_bias.requires_grad


def test_skewed_router_drops_nothing():
    moe = make()
    x = torch.randn(32, D, dtype=torch.float64)
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.router.weight[0, 0] = 50.0  # expert 0 has the largest score for every token
    assert_all_close(outputs_and_grads(moe, moe, x), outputs_and_grads(moe, lambda t: reference(moe, t), x))
    assert moe.last_load[0] == 32 and moe.last_load.sum() == 32 * K


def test_grouped_mm_choice():
    cpu = torch.device("cpu")
    assert grouped_mm_supported(torch.float32, cpu, 16, 8)
    assert grouped_mm_supported(torch.bfloat16, cpu, 16, 8)
    assert not grouped_mm_supported(torch.float64, cpu, 16, 8)  # no float64 kernel
    assert not grouped_mm_supported(torch.float32, cpu, 16, 7)  # 28-byte rows: misaligned
    assert not grouped_mm_supported(torch.bfloat16, cpu, 16, 4)  # 8-byte rows: misaligned


@pytest.mark.parametrize("shared", [0, 1])
def test_grouped_and_loop_paths_agree(shared):
    moe = make(torch.float32, shared_experts=shared, shared_hidden=8)
    x = torch.randn(50, D)
    with torch.no_grad():
        moe.expert_bias[1] = -10.0  # an expert with no tokens: its slice is empty, its gradient zero
    moe.use_grouped_mm = True
    grouped = outputs_and_grads(moe, moe, x)
    assert moe.last_load[1] == 0 and grouped[3][1].abs().sum() == 0  # [y, dx, d router, d w_gate_up, ...]
    moe.use_grouped_mm = False
    looped = outputs_and_grads(moe, moe, x)
    assert_all_close(grouped, looped, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        moe.use_grouped_mm = True
        a = moe(x)
        moe.use_grouped_mm = False
        b = moe(x)
    torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_aux_loss_by_hand(score):
    moe = make(score=score, n_experts=4, aux_loss_coef=0.1)
    x = torch.randn(6, D, dtype=torch.float64)
    moe(x)
    logits = x @ moe.router.weight.T
    p = logits.softmax(-1) if score == "softmax" else logits.sigmoid()
    chosen = p.topk(K).indices
    f = torch.stack([(chosen == i).sum() for i in range(4)]).double() / (6 * K)
    pn = p / p.sum(-1, keepdim=True)
    expected = 0.1 * 4 * sum(f[i] * pn[:, i].mean() for i in range(4))
    torch.testing.assert_close(moe.aux_loss, expected)
    moe.zero_grad()
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0
    assert moe.w_gate_up.grad is None  # only the router is balanced by it


def test_z_loss_by_hand():
    moe = make(z_loss_coef=0.01)
    x = torch.randn(9, D, dtype=torch.float64)
    moe(x)
    logits = x @ moe.router.weight.T
    expected = 0.01 * sum(torch.log(torch.exp(row).sum()) ** 2 for row in logits) / 9
    torch.testing.assert_close(moe.aux_loss, expected)
    moe.aux_loss.backward()
    assert moe.router.weight.grad.abs().sum() > 0


def test_aux_loss_zero_without_coefficients():
    moe = make()
    moe(torch.randn(5, D, dtype=torch.float64))
    assert moe.aux_loss.shape == () and moe.aux_loss.item() == 0.0


@pytest.mark.parametrize("score", ["softmax", "sigmoid"])
def test_bias_update_balances_load(score):
    moe = make(torch.float32, score=score, n_experts=8, bias_update_rate=0.003, init_std=0.1)
    x = torch.randn(512, D, generator=torch.Generator().manual_seed(3))
    x[:, 0] = 1.0
    with torch.no_grad():
        moe.router.weight[:, 0] = torch.linspace(2.0, -2.0, 8)  # expert 0 preferred, expert 7 starved

    def cv(load):
        return (load.std() / load.mean()).item()

    cvs = []
    with torch.no_grad():
        for _ in range(200):
            moe(x)
            cvs.append(cv(moe.last_load))
            moe.update_bias()
            assert moe.load_since_update.sum() == 0
    # A fixed sign step never settles: it ends in a small limit cycle, so judge the worst late step.
    assert cvs[0] > 1.0 and moe.last_load.min() > 0
    assert max(cvs[-20:]) < 0.3 * cvs[0], (cvs[0], cvs[-20:])
    sd = moe.state_dict()
    assert "expert_bias" in sd and "load_since_update" not in sd
    assert "load_since_update" not in dict(moe.named_buffers())  # DDP would overwrite it from rank 0
    torch.testing.assert_close(sd["expert_bias"], moe.expert_bias)


def test_load_accumulates_in_training_only():
    moe = make()
    x = torch.randn(10, D, dtype=torch.float64)
    moe(x)
    moe(x)
    assert moe.load_since_update.sum() == 2 * 10 * K
    moe.eval()
    moe(x)
    assert moe.load_since_update.sum() == 2 * 10 * K
    moe.update_bias()  # rate 0: bias untouched, accumulator reset
    assert moe.expert_bias.abs().sum() == 0 and moe.load_since_update.sum() == 0
    moe.bias_update_rate = 0.5
    moe.update_bias(torch.tensor([4.0, 0, 2, 2, 2, 2]))  # e.g. all-reduced over ranks
    torch.testing.assert_close(moe.expert_bias, torch.tensor([-0.5, 0.5, 0, 0, 0, 0], dtype=torch.float64))


def test_inactive_params():
    moe = MoE(16, 8, 2, 32, shared_experts=1, shared_hidden=64)
    assert moe.inactive_params() == 6 * 3 * 16 * 32
    with torch.device("meta"):  # how models/summary.py sizes big configs
        big = MoE(4096, 64, 6, 1024)
    assert big.inactive_params() == 58 * 3 * 4096 * 1024


@pytest.mark.parametrize("hidden", [8, 12])  # grouped path, and rows not 16-byte aligned -> loop
def test_bf16_autocast(hidden):
    moe = make(torch.float32, hidden=hidden, shared_experts=1, shared_hidden=8, aux_loss_coef=0.01, z_loss_coef=1e-3)
    x = torch.randn(2, 9, D, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = moe(x)
        loss = y.float().square().mean() + moe.aux_loss
    assert moe.aux_loss.dtype == torch.float32
    loss.backward()
    assert y.shape == x.shape and y.isfinite().all() and x.grad.isfinite().all()
    assert all(p.grad.isfinite().all() for p in moe.parameters())


@pytest.mark.parametrize(
    "kw, name",
    [
        ({"top_k": 7}, "top_k"),
        ({"top_k": 0}, "top_k"),
        ({"score": "relu"}, "score"),
        ({"hidden": 0}, "hidden"),
        ({"shared_experts": 1}, "shared_hidden"),
        ({"aux_loss_coef": -1}, "aux_loss_coef"),
        ({"bias_update_rate": -0.1}, "bias_update_rate"),
    ],
)
def test_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        MoE(D, **({"n_experts": E, "top_k": K, "hidden": H} | kw))
