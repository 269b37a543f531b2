"""The TNT mixer (models/tnt.py, kernels/memory.py) against independent per-token implementations of its
equations, in float64, forward and gradients: chunk size 1 is the per-token recurrence (inner gradients by
autograd), any chunk sizes match the per-token reading of the paper, local resets equal independent
shards, the Titans special case matches a torch.func chunkwise Titans, generation by `step` equals the
full forward, and `unroll info` counts the layer's parameters and state."""

import re

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, vmap

from unroll.models import LM, ModelConfig
from unroll.models.config import TNTConfig
from unroll.models.summary import summarize
from unroll.models.tnt import TNT


def make(seed=0, **kw):
    torch.manual_seed(seed)
    shape = dict(heads=2, head_dim=4, global_chunk=4, local_chunks=(2, 3), local_reset=6, max_step=0.6) | kw
    m = TNT(8, init_std=0.4, **shape).double()
    with torch.no_grad():  # gates that vary per token, so that the per-token weighting is exercised
        for gates in (m.global_gates, m.local_gates):
            if gates is not None:
                gates.weight.normal_(std=0.7)
                gates.bias.normal_(std=0.5)
    return m


def inputs(m: TNT, x):
    """q, k, v, gate per head written out: [B, T, H, d]; per memory (θ, β, α) [B, T, H]."""
    H, d = m.heads, m.head_dim
    q, k, v, g = m.in_proj(x).split(H * d, dim=-1)
    q, k, v = (t.unflatten(-1, (H, d)) for t in (q, k, v))
    q, k = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
    raw = ([m.global_gates(x)] if m.global_gates is not None else []) + (
        list(m.local_gates(x).chunk(len(m.local_init) // m.depth, -1)) if m.local_gates is not None else []
    )
    gates = []
    for r in raw:
        r = r.unflatten(-1, (H, m.n_gates))
        gates.append(
            (
                m.max_step * torch.sigmoid(r[..., 0]),
                torch.sigmoid(r[..., 1]) if m.momentum else None,
                torch.sigmoid(r[..., -1]) if m.forget else None,
            )
        )
    return q, k, v, g, gates


def mlp(ws, x):
    return x @ ws[0].T if len(ws) == 1 else x + F.silu(x @ ws[0].T) @ ws[1].T


def reference(m: TNT, x):
    """The docstring's semantics, token by token, sequence by sequence, head by head; every inner gradient
    by autograd at the memory's chunk-start weights P (C = 1: the previous token's weights)."""
    B, T, _ = x.shape
    q, k, v, g, gates = inputs(m, x)
    out = torch.zeros(B, T, m.heads, m.head_dim, dtype=x.dtype)
    for i, spec in enumerate(m.specs):
        init = m.initial_weights(i)
        for b in range(B):
            for h in range(m.heads):
                pos = 0
                for t in range(T):
                    if t == 0 or (spec.reset and pos == spec.reset):
                        W = P = [w[h] for w in init]
                        S = [torch.zeros_like(w) for w in W]
                        M, pos = torch.zeros(m.head_dim, m.head_dim, dtype=x.dtype), 0
                    loss = ((mlp(P, k[b, t, h]) - v[b, t, h]) ** 2).sum()
                    grads = torch.autograd.grad(loss, P, create_graph=True)
                    theta, beta, alpha = (None if z is None else z[b, t, h] for z in gates[i])
                    S = [(beta * s if beta is not None else 0) - theta * gr for s, gr in zip(S, grads)]
                    W = [(1 - alpha if alpha is not None else 1) * w + s for w, s in zip(W, S)]
                    read = q[b, t, h]
                    if spec.project:
                        M = M + torch.outer(k[b, t, h], k[b, t, h]) / k[b, t, h].dot(k[b, t, h])
                        read = M @ read
                    out[b, t, h] += mlp(W if spec.read == "after" else P, read)
                    pos += 1
                    if pos % spec.chunk == 0:
                        P = W
    return m.out_proj(m.norm(out.flatten(2)) * F.silu(g))


def grads_of(m, y, w):
    (y * w).sum().backward()
    out = {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p) for n, p in m.named_parameters()}
    m.zero_grad(set_to_none=True)
    return out


def assert_same(m, y, ref, w):
    torch.testing.assert_close(y, ref, rtol=1e-9, atol=1e-11)
    a, b = grads_of(m, y, w), grads_of(m, ref, w)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-8, atol=1e-10, msg=n)


@pytest.mark.parametrize(
    "kw",
    [dict(), dict(layers=1), dict(momentum=False), dict(forget=False, qk_project=False)],
    ids=["2layer", "1layer", "no-momentum", "no-forget"],
)
def test_chunk_size_one_is_the_per_token_recurrence(kw):
    m = make(global_chunk=1, local_chunks=(1, 1), local_reset=4, **kw)
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    y, state = m(x)
    assert_same(m, y, reference(m, x), torch.randn_like(y))
    assert [c.pos for c in state.memories] == [9, 1, 1]


@pytest.mark.parametrize(
    "T,kw",
    [
        (1, {}),
        (13, {}),
        (18, {}),
        (13, dict(layers=1)),
        (13, dict(momentum=False)),
        (13, dict(forget=False, qk_project=False)),
    ],
    ids=["T1", "T13", "T18", "T13-1layer", "T13-no-momentum", "T13-no-forget"],
)
def test_chunkwise_equals_the_per_token_reading(T, kw):
    m = make(**kw)  # C_G = 4, C_L = {2, 3}, S_L = 6: partial chunks and shards for T = 13
    x = torch.randn(2, T, 8, dtype=torch.float64)
    y, _ = m(x)
    assert_same(m, y, reference(m, x), torch.randn_like(y))


def test_local_resets_equal_independent_shards():
    """With resets every S_L = 4 tokens, the whole sequence (its shards batched) equals each shard run alone
    by a memory that never resets, forward and gradients."""
    kw = dict(global_chunk=0, local_chunks=(2, 4))
    resets, alone = make(local_reset=4, **kw), make(local_reset=0, **kw)
    alone.load_state_dict(resets.state_dict())
    x = torch.randn(2, 14, 8, dtype=torch.float64)
    y, _ = resets(x)
    ys = torch.cat([alone(x[:, s : s + 4])[0] for s in range(0, 14, 4)], 1)
    torch.testing.assert_close(y, ys, rtol=1e-10, atol=1e-12)
    w = torch.randn_like(y)
    a, b = grads_of(resets, y, w), grads_of(alone, ys, w)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=1e-9, atol=1e-11)


def titans_memory(m: TNT, x, C: int, i: int = 0, read: str = "after"):
    """Memory i as plain chunkwise Titans, written independently: per chunk, every token's gradient at the
    chunk-start weights by torch.func (vmap of grad), then the momentum/forget recurrence token by token
    with those fixed gradients, reading each token's weights after its update (read="start": the
    chunk-start weights). Returns the memory's read [B, T, H, d]."""
    B, T, _ = x.shape
    q, k, v, g, gates = inputs(m, x)
    theta, beta, alpha = gates[i]
    names = [str(j) for j in range(m.depth)]
    loss = lambda ws, kk, vv: ((functional_call_mlp(ws, kk) - vv) ** 2).sum()  # noqa: E731
    per_token = vmap(grad(loss), in_dims=(None, 0, 0))
    out = torch.zeros(B, T, m.heads, m.head_dim, dtype=x.dtype)
    for b in range(B):
        for h in range(m.heads):
            W = {n: w[h] for n, w in zip(names, m.initial_weights(i))}
            S = {n: torch.zeros_like(w) for n, w in W.items()}
            for c0 in range(0, T, C):
                P = dict(W)
                G = per_token(P, k[b, c0 : c0 + C, h], v[b, c0 : c0 + C, h])
                for j, t in enumerate(range(c0, min(c0 + C, T))):
                    S = {n: beta[b, t, h] * S[n] - theta[b, t, h] * G[n][j] for n in names}
                    W = {n: (1 - alpha[b, t, h]) * W[n] + S[n] for n in names}
                    out[b, t, h] = functional_call_mlp(W if read == "after" else P, q[b, t, h])
    return out


def output(m: TNT, x, o):
    g = inputs(m, x)[3]
    return m.out_proj(m.norm(o.flatten(2)) * F.silu(g))


def functional_call_mlp(ws: dict, x):
    return mlp([ws[str(j)] for j in range(len(ws))], x)


@pytest.mark.parametrize("C", [1, 4])
def test_equal_chunks_without_resets_is_plain_chunkwise_titans(C):
    """C_L = C, no reset, no projection and no global memory: TNT's local memory is Titans at chunk C."""
    m = make(global_chunk=0, local_chunks=(C,), local_reset=0, qk_project=False)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    y, _ = m(x)
    assert_same(m, y, output(m, x, titans_memory(m, x, C)), torch.randn_like(y))


def test_global_and_local_at_one_chunk_size_without_resets_are_two_titans_memories():
    """C_L = C_G = 4, no reset, no projection: the layer is the sum of two plain chunkwise Titans memories
    of chunk 4, the global one read at its chunk start, the local one after each token's update."""
    m = make(global_chunk=4, local_chunks=(4,), local_reset=0, qk_project=False)
    x = torch.randn(2, 11, 8, dtype=torch.float64)
    y, _ = m(x)
    ref = output(m, x, titans_memory(m, x, 4, 0, "start") + titans_memory(m, x, 4, 1, "after"))
    assert_same(m, y, ref, torch.randn_like(y))


def test_global_memory_alone_reads_its_chunk_start():
    """A global memory of chunk C_G = 4 read at the chunk start: the first chunk reads the initial memory
    only, so its outputs do not depend on the tokens of the chunk other than through q (and the gate)."""
    m = make(local_chunks=())
    x = torch.randn(1, 8, 8, dtype=torch.float64)
    y, _ = m(x)
    x2 = x.clone()
    x2[:, 2] += 1.0  # a later token of the first chunk
    y2, _ = m(x2)
    torch.testing.assert_close(y[:, :2], y2[:, :2])
    torch.testing.assert_close(y[:, 3], y2[:, 3])  # token 3 reads the same chunk-start memory
    assert (y[:, 4:] - y2[:, 4:]).abs().max() > 1e-6  # the next chunk sees the update


@pytest.mark.parametrize("prefix", [5, 12])
def test_step_generation_equals_the_full_forward(prefix):
    """A forward over a prefix, then token by token with the cache; and (prefix 12, where every memory
    stands at a chunk and shard boundary) a chunkwise forward continuing from the state."""
    m = make()
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    full, end = m(x)
    y, state = m(x[:, :prefix])
    outs = [y]
    for t in range(prefix, 17):
        yt, state = m.step(x[:, t], state)
        outs.append(yt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)
    rest, state2 = m(x[:, prefix:], m(x[:, :prefix])[1])
    torch.testing.assert_close(rest, full[:, prefix:], rtol=1e-10, atol=1e-12)
    for a, b in zip(state.memories, end.memories):
        assert a.pos == b.pos
        for s, t in zip(a.value + a.point, b.value + b.point):
            torch.testing.assert_close(s, t, rtol=1e-10, atol=1e-12)


def lm_config(**tnt):
    shape = dict(heads=2, global_chunk=4, local_chunks=[2], local_reset=4) | tnt
    return ModelConfig(pattern="TA", vocab_size=50, d_model=16, n_heads=2, tnt=TNTConfig(**shape))


def test_lm_generation_by_step_equals_forward():
    torch.manual_seed(0)
    model = LM(lm_config()).double()
    tokens = torch.randint(0, 50, (2, 11))
    full = model(tokens)
    logits, states = model(tokens[:, :3], return_states=True)
    outs = [logits]
    for t in range(3, 11):
        lt, states = model.step(tokens[:, t], states)
        outs.append(lt[:, None])
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-12)


def test_info_counts_parameters_and_state():
    cfg = lm_config(local_chunks=[2, 4], head_dim=4)
    s = summarize(cfg)
    layer = s["layers"][0]
    assert layer["mixer"] == "tnt"
    mixer = LM(cfg).blocks[0].mixer
    assert layer["mixer_params"] == sum(p.numel() for p in mixer.parameters())
    # by hand: in_proj 16→4·8, gates (global 2·3, local 2·2·3, with biases), 3 memories × (4·8 + 8·4) per
    # head, norm 8, out_proj 8→16
    assert layer["mixer_params"] == 16 * 32 + (16 + 1) * 6 + (16 + 1) * 12 + 3 * 2 * 64 + 8 + 8 * 16
    # per head: each memory's chunk-start and current weights and momentum (3 × 64), and the local ones' 4×4
    # query projection; 2 heads
    assert layer["state_elements"] == 2 * (3 * 3 * 64 + 2 * 16)


@pytest.mark.parametrize(
    "kw,key,words",
    [
        (dict(local_chunks=[3], local_reset=8), "model.tnt.local_chunks", "must divide tnt.local_reset=8"),
        (dict(layers=3), "model.tnt.layers", "1 or 2 layers"),
        (dict(global_chunk=0, local_chunks=[]), "model.tnt.local_chunks", "no memory at all"),
        (dict(heads=3), "model.tnt.heads", "do not divide d_model=16"),
    ],
)
def test_bad_tnt_values_name_the_key(kw, key, words):
    from unroll.train.config import ConfigError, load_config

    over = [f"model.tnt.{k}={v}".replace(" ", "") for k, v in kw.items()]
    with pytest.raises(ConfigError) as err:
        load_config("tiny-tnt", ["model.d_model=16", *over])
    assert key in str(err.value) and words in str(err.value)


def test_info_cli_prints_the_tnt_layers(capsys):
    from unroll.launch.cli import main

    assert main(["info", "tiny-tnt"]) == 0
    out = capsys.readouterr().out
    # per head (d = 48, hidden 96): 2 memories × 3 × (2·48·96) + the local 48×48 projection; 4 heads
    assert len(re.findall(r"^ +\d+ tnt ", out, flags=re.M)) == 3  # the layer table's rows (the FLOPs table has one too)
    assert f"{4 * (2 * 3 * 2 * 48 * 96 + 48 * 48):,}" in out


@pytest.mark.parametrize(
    "layout,seq_len,documents,words",
    [
        (
            dict(cp=2),
            96,
            "packed",
            "model.tnt.local_reset=64 must be positive and divide the per-rank sequence length 48",
        ),
        (dict(cp=2), 256, "packed", None),
        (dict(cp=8), 256, "packed", "model.tnt.global_chunk=64 must divide the per-rank sequence length 32"),
        # isolated documents: each rank runs whole documents from the gathered slices, at any slice length
        (dict(cp=2), 96, "isolated", None),
        (dict(cp=8), 256, "isolated", None),
        (dict(tp=2), 128, "packed", "TNT layers (pattern T): not available yet"),
    ],
)
def test_layout_checks_for_tnt(layout, seq_len, documents, words):
    from unroll.train.config import load_config
    from unroll.train.parallel.mesh import Layout, LayoutError, check_model

    cfg = load_config("tiny-tnt", [f"model.documents={documents}"]).model
    if words is None:
        check_model(Layout(**layout), cfg, seq_len=seq_len)
        return
    with pytest.raises(LayoutError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_model(Layout(**layout), cfg, seq_len=seq_len)
        return
    with pytest.raises(LayoutError, match=words.replace("(", r"\(").replace(")", r"\)")):
        check_model(Layout(**layout), cfg, seq_len=seq_len)
