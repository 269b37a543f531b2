"""SymmetricWorld (train/planning/fake_comm.py) in one process under torch's fake process group: the collectives'
values in a symmetric world, their byte counts, DTensor, FSDP2 at world 64, pipeline schedules,
expert-parallel MoE, object collectives and DCP."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Partial, Replicate, Shard

from unroll.train.planning import comm_bytes as cb
from unroll.train.planning.fake_comm import SymmetricWorld, fake_process_group
from unroll.train.planning.fake_objects import FakeWorldError

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning")


def test_all_reduce_sum_avg_max():
    with fake_process_group(1, 4), SymmetricWorld() as world:
        t = torch.tensor([1.0, -2.0, 3.0])
        dist.all_reduce(t)
        assert t.tolist() == [4.0, -8.0, 12.0]
        for op in (dist.ReduceOp.MAX, dist.ReduceOp.AVG, dist.ReduceOp.MIN):
            t = torch.tensor([1.0, -2.0])
            dist.all_reduce(t, op=op)
            assert t.tolist() == [1.0, -2.0]
        flag = torch.tensor([1.0])  # train/parallel/distributed.py any_rank's stop flag
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        assert flag.item() == 1.0
        assert world.traffic.calls("all_reduce", 4) == 5
        assert world.traffic.total("all_reduce") == 2 * 3 * 12 // 4 + 3 * (2 * 3 * 8 // 4) + 2 * 3 * 4 // 4
        assert not world.unknown


def test_all_gather_and_reduce_scatter():
    with fake_process_group(2, 4), SymmetricWorld() as world:
        out = torch.empty(8)
        dist.all_gather_into_tensor(out, torch.tensor([5.0, 6.0]))
        assert out.tolist() == [5.0, 6.0] * 4
        slots = [torch.empty(2) for _ in range(4)]
        dist.all_gather(slots, torch.tensor([1.0, 2.0]))
        assert all(s.tolist() == [1.0, 2.0] for s in slots)
        out = torch.empty(2)
        dist.reduce_scatter_tensor(out, torch.arange(8.0))
        assert out.tolist() == [16.0, 20.0]  # rank 2's chunk [4, 5], summed over 4 equal ranks
        dist.reduce_scatter_tensor(out, torch.arange(8.0), op=dist.ReduceOp.AVG)
        assert out.tolist() == [4.0, 5.0]
        assert world.traffic.total("all_gather") == 2 * cb.all_gather_bytes(4, 32)
        assert world.traffic.total("reduce_scatter") == 2 * cb.reduce_scatter_bytes(4, 32) == 48


def test_all_to_all_uneven_symmetric_splits():
    with fake_process_group(1, 4), SymmetricWorld() as world:
        inp = torch.arange(7.0)  # rank 1 sends [0] [1 2] [3] [4 5 6]: keeps [1 2]
        out = torch.empty(8)  # ... and receives 2 rows from every rank
        dist.all_to_all_single(out, inp, [2, 2, 2, 2], [1, 2, 1, 3])
        assert out.tolist() == [1.0, 2.0] * 4
        assert world.traffic.total("all_to_all") == (7 - 2) * 4
        assert not world.unknown
        out = torch.full((9,), float("nan"))  # split sizes no symmetric world gives
        dist.all_to_all_single(out, inp, [2, 3, 2, 2], [1, 2, 1, 3])
        assert out.tolist() == [1.0, 2.0, 0.0, 0.0, 0.0, 1.0, 2.0, 1.0, 2.0]
        assert world.unknown["all_to_all split size"] == 1
        counts = torch.arange(8)  # equal splits: chunk `rank` in every slot
        recv = torch.empty_like(counts)
        dist.all_to_all_single(recv, counts)
        assert recv.tolist() == [2, 3] * 4


def test_broadcast_recv_and_send():
    with fake_process_group(1, 4), SymmetricWorld() as world:
        t = torch.tensor([3.0, 4.0])
        dist.broadcast(t, src=0)
        assert t.tolist() == [3.0, 4.0]
        buf = torch.full((3,), float("nan"))
        dist.recv(buf, src=0)
        assert buf.tolist() == [0.0, 0.0, 0.0]
        assert world.unknown["recv"] == 1
        dist.send(torch.ones(5), dst=2)
        assert world.traffic.total("send") == 20 and world.traffic.calls("recv") == 1
        dist.barrier()
        assert world.traffic.calls("barrier") == 1


def test_recv_mirrors_what_this_rank_sends_the_other_way():
    with fake_process_group(1, 4), SymmetricWorld(mirror_p2p=True) as world:
        dist.send(torch.tensor([7.0, 8.0]), dst=2)  # to rank + 1: rank 0 sends rank 1 the like
        buf = torch.empty(2)
        dist.recv(buf, src=0)
        assert buf.tolist() == [7.0, 8.0]
        dist.recv(buf, src=2)  # from rank + 1: nothing sent to rank - 1 yet
        assert buf.tolist() == [0.0, 0.0] and world.unknown["recv"] == 1


def test_recv_fill_answers_first():
    def fill(buf, src, group):
        buf.fill_(float(src))
        return True

    with fake_process_group(3, 4), SymmetricWorld(recv_fill=fill):
        buf = torch.empty(2)
        dist.recv(buf, src=1)
        assert buf.tolist() == [1.0, 1.0]


def test_functional_collectives_async_and_waited():
    with fake_process_group(1, 4) as group, SymmetricWorld() as world:
        x = torch.tensor([1.0, 2.0])
        assert (funcol.all_reduce(x, "sum", group) + 0).tolist() == [4.0, 8.0]
        assert funcol.all_gather_tensor(x, 0, group).wait().tolist() == [1.0, 2.0] * 4
        assert funcol.reduce_scatter_tensor(torch.arange(8.0), "sum", 0, group).wait().tolist() == [8.0, 12.0]
        y = funcol.all_to_all_single(torch.arange(8.0), None, None, group).wait()
        assert y.tolist() == [2.0, 3.0] * 4
        w = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
        y = funcol.all_to_all_single_autograd(w, [1, 1, 1, 1], [1, 1, 1, 1], group)
        assert y.tolist() == [2.0] * 4
        y.sum().backward()  # backward: the inverse exchange, chunk 1 of the ones, i.e. ones
        assert w.grad.tolist() == [1.0] * 4
        assert world.traffic.calls("all_to_all") == 3
        assert not world.unknown
        import torch.distributed._functional_collectives_impl as fci

        received = fci._irecv(torch.full((2,), float("nan")), 0, 0, group.group_name)
        assert funcol.wait_tensor(received).tolist() == [0.0, 0.0] and world.unknown["recv"] == 1


def test_dtensor_redistribute_and_implicit_redistribution():
    with fake_process_group(2, 4), SymmetricWorld() as world:
        mesh = init_device_mesh("cpu", (4,))
        shard = torch.arange(6.0).view(2, 3)
        x = DTensor.from_local(shard, mesh, [Shard(0)])
        assert torch.equal(x.redistribute(mesh, [Replicate()]).to_local(), shard.repeat(4, 1))
        p = DTensor.from_local(torch.ones(2), mesh, [Partial()])
        assert p.full_tensor().tolist() == [4.0, 4.0]
        assert world.traffic.total("all_gather") == cb.all_gather_bytes(4, 96)
        world.reset()
        # an op whose sharding propagation gathers its argument: counted although DTensor inserts it
        b = DTensor.from_local(torch.ones(1, 3), mesh, [Shard(0)])
        z = torch.mm(DTensor.from_local(torch.ones(2, 4), mesh, [Shard(0)]), b)
        assert z.to_local().tolist() == [[4.0] * 3] * 2
        assert world.traffic.total("all_gather", 4) == cb.all_gather_bytes(4, 48)


def test_object_collectives():
    original = dist.broadcast_object_list
    with fake_process_group(1, 4), SymmetricWorld() as world:
        objs = [None] * 4
        dist.all_gather_object(objs, {"rank": "mine"})
        assert objs == [{"rank": "mine"}] * 4
        mine = ["plan"]
        dist.broadcast_object_list(mine, src=1)  # this rank is the source
        assert mine == ["plan"]
        kept = [3]
        dist.broadcast_object_list(kept, src=0)  # the source holds what this rank holds
        assert kept == [3] and world.unknown["broadcast_object_list (kept the caller's objects)"] == 1
        with pytest.raises(FakeWorldError, match="broadcast_object_list"):
            dist.broadcast_object_list([None], src=0)
        with pytest.raises(FakeWorldError, match="recv_object_list"):
            dist.recv_object_list([None], src=0)
        with pytest.raises(FakeWorldError, match="scatter_object_list"):
            dist.scatter_object_list([None], None, src=0)
    assert dist.broadcast_object_list is original


def _mlp_blocks(n: int, width: int, hidden: int) -> nn.Sequential:
    return nn.Sequential(
        *[nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, width)) for _ in range(n)]
    )


def _fsdp(model: nn.Module, blocks, mesh) -> nn.Module:
    """fully_shard each of `blocks` and the root, allocate this rank's shards, initialise them."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    torch.manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            p.to_local().normal_(0, 0.1)
    return model


def test_fsdp2_step_at_world_64_counts_its_gathers_and_scatters():
    n = 64
    with fake_process_group(5, n), SymmetricWorld() as world:
        mesh = init_device_mesh("cpu", (n,))
        with torch.device("meta"):
            model = _mlp_blocks(2, 64, 128)
            model.append(nn.Linear(64, 64, bias=False))  # the root's own parameter
        model = _fsdp(model, model[:2], mesh)
        assert model[0][0].weight.to_local().shape == (2, 64)  # this rank's 1/64
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        loss = model(torch.randn(4, 64)).pow(2).mean()
        loss.backward()
        opt.step()
        assert loss.isfinite()
        assert all(p.grad.to_local().isfinite().all() for p in model.parameters())

        block = 2 * 64 * 128 + 128 + 64  # numel of one block, all sharded evenly over 64 ranks
        root = 64 * 64
        # forward gathers both blocks and the root; backward re-gathers the blocks (resharded after
        # forward; the root is not) and reduce-scatters all three, in float32
        gathered = 4 * (2 * block + root) + 4 * 2 * block
        assert world.traffic.calls("all_gather", n) == 5
        assert world.traffic.total("all_gather", n) == cb.all_gather_bytes(n, gathered) == 277_200
        assert world.traffic.calls("reduce_scatter", n) == 3
        assert world.traffic.total("reduce_scatter", n) == cb.reduce_scatter_bytes(n, 4 * (2 * block + root))
        assert not world.unknown


@pytest.mark.parametrize(
    "schedule,pattern,rank",
    [("1F1B", "GA|LG", 0), ("1F1B", "GA|LG", 1), ("GPipe", "GA|LG", 1), ("Interleaved1F1B", "GA|LG|GA|LG", 0)],
)
def test_pipeline_schedule_steps_on_one_rank(schedule, pattern, rank):
    """The trainer's pipeline (static stage metadata) steps on one rank; the stages' vote is answered."""
    from torch.distributed.device_mesh import init_device_mesh

    from unroll.models import LM, ModelConfig
    from unroll.train.parallel.pipeline import Pipeline
    from unroll.train.planning.fake_comm import static_pipeline_vote

    n_mb, mb, seq, d = 4, 2, 6, 16
    with fake_process_group(rank, 2), SymmetricWorld(recv_fill=static_pipeline_vote) as world:
        model = LM(ModelConfig(pattern=pattern, vocab_size=40, d_model=d, n_heads=2, tie_embeddings=False), seed=0)
        pipe = Pipeline(model, init_device_mesh("cpu", (2,), mesh_dim_names=("pp",))["pp"], schedule)
        modules = pipe.modules
        tokens, targets = torch.randint(0, 40, (n_mb * mb, seq)), torch.randint(0, 40, (n_mb * mb, seq))
        for _ in range(2):
            world.reset()
            loss, _ = pipe.step(tokens, targets, n_mb, torch.device("cpu"))
        if any(m.last for m in modules):
            assert loss.isfinite() and loss > 0
        grads = [p.grad for m in modules for p in m.parameters()]
        assert all(g is not None and g.isfinite().all() for g in grads)
        # per microbatch each stage sends its hidden state on (unless last) and its input's gradient back
        # (unless first), and receives the like
        sends = sum((not m.last) + (not m.first) for m in modules)
        hidden = mb * seq * d * 4
        assert world.traffic.total("send") == n_mb * sends * hidden
        assert world.traffic.calls("recv") == n_mb * sends


def test_expert_parallel_moe_at_ep_8_exchanges_symmetric_splits():
    from unroll.models.moe import MoE
    from unroll.train.parallel.expert_parallel import apply_expert_parallel

    ep, rank, d, n_experts = 8, 3, 16, 16
    with fake_process_group(rank, ep) as group, SymmetricWorld() as world:
        torch.manual_seed(0)
        moe = MoE(d, n_experts=n_experts, top_k=2, hidden=8)
        apply_expert_parallel(moe, group)
        seen = {}
        route, local = moe.route, moe.compute_experts

        def spy_route(x):
            out = route(x)
            seen["counts"] = out[2].clone()
            return out

        def spy_local(a, counts, sizes):
            seen["rows"], seen["sizes"] = a.shape[0], list(sizes)
            return local(a, counts, sizes)

        moe.route, moe.compute_experts = spy_route, spy_local
        x = torch.randn(24, d, requires_grad=True)
        moe(x).square().sum().backward()
        assert x.grad.isfinite().all() and moe.w_gate_up.grad.isfinite().all()

        mine = seen["counts"][2 * rank : 2 * rank + 2]  # assignments to this rank's two experts
        own = int(mine.sum())
        assert seen["sizes"] == (ep * mine).tolist()  # every source routed like this rank
        assert seen["rows"] == ep * own
        # The experts' outputs return in the sizes this rank sent to each rank: chunks of another size than
        # its own are what no symmetric world can say (zeros, counted), in the combine's forward and in the
        # dispatch's backward
        sent = seen["counts"].view(ep, 2).sum(1)
        assert world.unknown == {"all_to_all split size": 2 * int((sent != own).sum())} != {}
        n = 24 * 2
        row = d * 4
        count_exchange = 8 * n_experts - 8 * 2
        rows_exchanged = 2 * (n - own) * row + 2 * (ep * own - own) * row  # forward pair + backward pair
        assert world.traffic.total("all_to_all", ep) == count_exchange + rows_exchanged
        assert world.traffic.calls("all_to_all", ep) == 5


def test_dcp_save_writes_this_ranks_shards(tmp_path):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict import get_state_dict

    n, rank = 8, 3
    with fake_process_group(rank, n), SymmetricWorld():
        mesh = init_device_mesh("cpu", (n,))
        with torch.device("meta"):
            model = _mlp_blocks(2, 64, 128)
        model = _fsdp(model, model, mesh)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        model(torch.randn(4, 64)).sum().backward()
        opt.step()
        model_sd, optim_sd = get_state_dict(model, opt)
        state = {"model": model_sd, "optim": optim_sd}
        with pytest.raises(FakeWorldError, match="scatter_object_list"):  # the coordinator's plan
            dcp.save(state, checkpoint_id=str(tmp_path / "dist"))
        dcp.save(state, checkpoint_id=str(tmp_path / "local"), no_dist=True)

    files = {f: os.path.getsize(tmp_path / "local" / f) for f in os.listdir(tmp_path / "local")}
    assert set(files) == {".metadata", "__0_0.distcp"}
    meta = dcp.FileSystemReader(str(tmp_path / "local")).read_metadata()
    local_bytes = 0
    for md in meta.state_dict_metadata.values():
        if not isinstance(md, TensorStorageMetadata):
            continue
        (chunk,) = md.chunks  # one chunk per tensor: this rank's
        rows = md.size[0] // n if len(md.size) else 0
        assert tuple(chunk.offsets) == ((rank * rows,) + (0,) * (len(md.size) - 1) if md.size else ())
        assert tuple(chunk.sizes) == ((rows,) + tuple(md.size[1:]) if md.size else ())
        local_bytes += math.prod(chunk.sizes) * md.properties.dtype.itemsize
    params = 2 * (2 * 64 * 128 + 128 + 64)
    assert local_bytes == 3 * 4 * params // n + 4 * 8  # params, exp_avg, exp_avg_sq shards; 8 step scalars
    n_tensors = sum(isinstance(md, TensorStorageMetadata) for md in meta.state_dict_metadata.values())
    # DCP torch.saves each tensor: a few KB of framing each on top of the payload
    assert local_bytes < files["__0_0.distcp"] < local_bytes + 4096 * n_tensors
