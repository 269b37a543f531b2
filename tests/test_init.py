"""Layout-independent initialisation (models/init.py, train/parallel/materialize.py): every element a function of
the seed, the parameter's name and its global index, so a rank that builds on the meta device and
allocates only its shards holds exactly the one-process weights."""

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import run_workers
from torch import nn
from torch.testing._internal.distributed.fake_pg import FakeStore

from unroll.models import LM
from unroll.models.init import Draws, constant, fill, identity, init_parameters, name_key, normal, uniform
from unroll.models.paragru import chrono_bias
from unroll.train.config import load_config

RULES = {
    "normal": normal(0.5),
    "uniform": uniform(-2.0, 3.0),
    "identity": identity(),
    "constant": constant(7.0),
    "chrono": chrono_bias(-1.0),
}


def values(rule, shape, index=None, seed=0, name="w"):
    index = index or [torch.arange(n) for n in shape]
    out = torch.empty([len(i) for i in index])
    fill(out, rule, name_key(seed, name), tuple(shape), index)
    return out


@pytest.mark.parametrize("rule", RULES)
def test_any_subset_of_elements_gets_the_values_of_the_whole_tensor(rule):
    shape = (6, 5, 5)
    whole = values(RULES[rule], shape)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):  # arbitrary index sets along every dimension (shards, strided shards, reorderings)
        index = [torch.randperm(n, generator=g)[: int(torch.randint(1, n + 1, (), generator=g))] for n in shape]
        want = whole
        for d, idx in enumerate(index):
            want = want.index_select(d, idx)
        assert torch.equal(values(RULES[rule], shape, index), want)


def test_the_draws_have_the_stated_distribution_and_depend_on_seed_and_name():
    x = values(normal(1.0), (1000, 1000)).double().flatten()
    assert abs(x.mean()) < 3e-3 and abs(x.var() - 1) < 5e-3
    kurtosis = ((x - x.mean()) ** 4).mean() / x.var() ** 2
    assert abs(kurtosis - 2.9) < 0.02 and x.abs().max() <= 6  # Irwin–Hall with 12 terms
    assert abs(torch.corrcoef(torch.stack([x[:-1], x[1:]]))[0, 1]) < 5e-3  # neighbours independent
    u = values(uniform(-2.0, 3.0), (100_000,))
    assert u.min() > -2 and u.max() < 3 and abs(u.mean() - 0.5) < 0.02
    base = values(normal(1.0), (64,))
    assert not torch.equal(base, values(normal(1.0), (64,), seed=1))
    assert not torch.equal(base, values(normal(1.0), (64,), name="v"))
    assert torch.equal(base, values(normal(1.0), (64,)))


def test_more_than_two_to_the_32_elements_hash_the_high_word_too():
    d = Draws(
        name_key(0, "big"), (1 << 20, 1 << 13), [torch.tensor([0, 1 << 19]), torch.tensor([0])], torch.device("cpu")
    )
    assert d.wide and d.counter.flatten().tolist() == [0, 1 << 32]
    assert len(set(d.uniform().flatten().tolist())) == 2


def test_lm_weights_are_a_function_of_the_seed():
    cfg = load_config("tiny-moe").model
    a, b, c = LM(cfg, seed=3).state_dict(), LM(cfg, seed=3).state_dict(), LM(cfg, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["blocks.0.mlp.w_gate_up"], c["blocks.0.mlp.w_gate_up"])
    torch.manual_seed(5)
    d = LM(cfg).state_dict()
    torch.manual_seed(5)
    assert all(torch.equal(d[k], v) for k, v in LM(cfg).state_dict().items())  # eager: torch's seed decides
    with torch.device("meta"):
        assert all(p.is_meta for p in LM(cfg).parameters())  # built on meta, nothing allocated


def test_a_tensor_without_a_rule_is_refused_by_name():
    class Undeclared(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(2, 2)
            self.norm = nn.RMSNorm(2)

        def init_rules(self):
            return {"proj.weight": normal(1.0)}

    with pytest.raises(TypeError, match=r"\['proj.bias'\]"):
        init_parameters(Undeclared(), 0)


LAYOUTS = [
    ("tiny-gru", 3, []),
    ("tiny-m2rnn", 4, ["parallel.tp=2"]),
    ("tiny-moe", 4, ["parallel.ep=4"]),
    ("tiny-transformer", 4, ["parallel.pp=2", "parallel.tp=2", "model.tie_embeddings=false"]),
    ("tiny-lstm", 4, ["parallel.pp=2", "parallel.pp_schedule=Interleaved1F1B"]),
    ("tiny-tnt", 4, ["parallel.cp=2", "model.documents=packed"]),
    ("tiny-gru", 4, ["parallel.dp_replicate=2"]),
]


@pytest.mark.parametrize("preset,world,overrides", LAYOUTS, ids=[f"{p}-{w}-{'-'.join(o)}" for p, w, o in LAYOUTS])
def test_every_rank_of_a_fake_world_holds_its_part_of_the_one_process_weights(preset, world, overrides):
    """Each rank in turn, in one process (torch's fake process group: nothing is communicated, and
    initialisation needs nothing): its local tensors equal the one-process weights at the indices it holds,
    uneven shards (3 ranks) included."""
    from unroll.train.parallel.materialize import shard_index
    from unroll.train.parallel.mesh import build_mesh, resolve_layout
    from unroll.train.parallel.parallelize import parallelize
    from unroll.train.parallel.pipeline import Pipeline

    cfg = load_config(preset, overrides)
    full = LM(cfg.model, seed=5).state_dict()
    for rank in range(world):
        dist.init_process_group("fake", store=FakeStore(), rank=rank, world_size=world)
        try:
            layout = resolve_layout(cfg.parallel, world)
            mesh = build_mesh(layout, "cpu")
            with torch.device("meta"):
                model = LM(cfg.model)
            pipe = Pipeline(model, mesh["pp"], cfg.parallel.pp_schedule) if layout.pp > 1 else None
            parallelize(
                model,
                mesh,
                layout,
                device=torch.device("cpu"),
                seed=5,
                bf16=False,
                stages=pipe.modules if pipe else None,
            )
            held = 0
            for part in pipe.modules if pipe else [model]:
                for name, t in list(part.named_parameters()) + list(part.named_buffers()):
                    _, index, local = shard_index(t)
                    want = full["embed.weight" if name == "tied_embed_weight" else name]
                    for d, idx in enumerate(index):
                        want = want.index_select(d, idx)
                    assert torch.equal(local, want), (rank, name)
                    held += local.numel()
            assert 0 < held < sum(t.numel() for t in full.values())
        finally:
            dist.destroy_process_group()


@pytest.mark.slow
def test_meta_build_under_every_layout_equals_the_one_process_build(tmp_path):
    """torchrun, 2 gloo ranks: each tiny preset built by the trainer's path under dp_shard 2, tp 2, pp 2 and
    ep 2, gathered back, is bit-identical to LM(cfg, seed); under FSDP each rank holds half."""
    results = run_workers(Path(__file__).parent / "init_worker.py", 2, tmp_path)
    for r in results:
        assert {k for k, v in r.items() if "refused" not in v} >= {
            f"{p}/{lay}"
            for p in ("tiny-gru", "tiny-lstm", "tiny-m2rnn", "tiny-moe", "tiny-transformer")
            for lay in ("dp_shard2", "tp2", "pp2")
        } | {"tiny-moe/ep2", "tiny-tnt/dp_shard2", "tiny-tnt/pp2"}
        for case, v in r.items():
            if "refused" in v:
                assert case == "tiny-tnt/tp2"
                continue
            assert v["mismatched"] == [] and v["missing"] == [], case
            if case.endswith(("dp_shard2", "ep2")):  # FSDP over 2 ranks: half of every tensor, rounded up
                assert v["local_elements"] <= v["total_elements"] / 2 + 64, case


@pytest.mark.parametrize("preset", ["tiny-gru", "tiny-lstm"])
def test_rnn_init_sets_the_recurrent_coefficients_range_and_nothing_else(preset):
    narrow = LM(load_config(preset).model, seed=0).state_dict()
    wide = LM(load_config(preset, ["model.rnn_init=2"]).model, seed=0).state_dict()
    coefficients = [k for k in narrow if k.endswith(("mixer.a", "mixer.p"))]
    assert len(coefficients) == (4 if preset == "tiny-gru" else 8)
    for k in coefficients:  # the same draws, scaled: U(±0.5) by default, U(±2) here
        assert torch.allclose(wide[k], 4 * narrow[k]) and 0.45 < narrow[k].abs().max() <= 0.5
    assert all(torch.equal(wide[k], v) for k, v in narrow.items() if k not in coefficients)
