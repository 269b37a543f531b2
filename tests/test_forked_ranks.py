"""tests/forked_ranks.py behaves as torchrun does for the tests: the rendezvous environment, the ranks' output,
a failing rank stopping the run with its traceback, a hung run killed at its timeout."""

import os
import textwrap

import pytest
from forked_ranks import run_forked

from unroll.launch.torchrun import TorchrunError

WORKER = textwrap.dedent(
    """
    import os, sys, time
    import torch, torch.distributed as dist

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    t = torch.tensor([rank + 1.0])
    dist.all_reduce(t)
    print(f"rank {rank} of {dist.get_world_size()} local {os.environ['LOCAL_RANK']} sum {t.item():g} {sys.argv[1]}")
    if sys.argv[1] == "fail" and rank == 1:
        raise ValueError("rank 1 fails on purpose")
    if sys.argv[1] in ("fail", "hang") and rank == 0:
        time.sleep(3600)  # as a rank waiting for a peer that never comes
    dist.barrier()
    """
)


@pytest.fixture
def worker(tmp_path):
    path = tmp_path / "worker.py"
    path.write_text(WORKER)
    return str(path)


def test_ranks_meet_and_print_in_rank_order(worker):
    proc = run_forked([worker, "ok"], 3, dict(os.environ, OMP_NUM_THREADS="1"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"rank {r} of 3 local {r} sum 6 ok" for r in range(3)]


def test_a_failing_rank_stops_the_others_and_its_traceback_is_kept(worker):
    proc = run_forked([worker, "fail"], 2, dict(os.environ, OMP_NUM_THREADS="1"), timeout=600)
    assert proc.returncode == 1
    assert "ValueError: rank 1 fails on purpose" in proc.stderr


def test_a_hung_run_is_killed_at_its_timeout(worker):
    with pytest.raises(TorchrunError, match="timed out after 10 s"):
        run_forked([worker, "hang"], 2, dict(os.environ, OMP_NUM_THREADS="1"), timeout=10)
