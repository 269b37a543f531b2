"""train/preflight.py: the checks a launcher runs before any process starts (the ranks run the same), and
pipelining's default micro-batches. The launchers' use of it is tested through their entry points in
tests/test_launch_local.py and tests/test_slurm.py."""

import pytest

from unroll.train.config import load_config
from unroll.train.parallel.mesh import LayoutError
from unroll.train.preflight import check_layout, preflight


def config(*overrides: str):
    return load_config(
        None, ["model.pattern=GAGAGAGA", "model.vocab_size=320", "model.d_model=32", "model.n_heads=2", *overrides]
    )


@pytest.mark.parametrize(
    "schedule, batch, world, micro, accum",
    [
        ("1F1B", 8, 2, 4, 2),  # 2 stages: a micro-batch per stage
        ("GPipe", 8, 4, 2, 2),  # 2 data ranks, a share of 4 each
        ("1F1B", 9, 2, 3, 3),  # the fewest that divide the share: 3
        ("Interleaved1F1B", 8, 2, 2, 4),  # 2 stages per rank
        ("Interleaved1F1B", 6, 2, 1, 6),  # at least 4, a multiple of pp, dividing 6
        ("ZBVZeroBubble", 4, 2, 1, 4),
    ],
)
def test_pipelining_splits_each_share_into_a_micro_batch_per_stage_by_default(schedule, batch, world, micro, accum):
    shape = check_layout(
        config(
            "parallel.pp=2",
            f"parallel.pp_schedule={schedule}",
            f"train.batch_size={batch}",
            "model.tie_embeddings=false",
        ),
        world,
    )
    assert (shape.micro, shape.accum) == (micro, accum)
    assert shape.layout.pp == 2 and shape.layout.dp == world // 2


def test_an_explicit_micro_batch_and_no_pipelining_are_left_as_they_were():
    piped = check_layout(config("parallel.pp=2", "train.batch_size=8", "train.micro_batch_size=2"), 2)
    assert (piped.micro, piped.accum) == (2, 4)
    plain = check_layout(config("train.batch_size=8"), 2)
    assert (plain.micro, plain.accum) == (4, 1)


@pytest.mark.parametrize(
    "schedule, batch, world, fix",
    [
        ("1F1B", 2, 4, "train.batch_size=4"),  # a share of 1 for 2 stages
        ("Interleaved1F1B", 10, 4, "train.batch_size=12"),  # a share of 5: no even divisor >= 4 (stages)
        ("1F1B", 1, 2, "train.batch_size=2"),
    ],
)
def test_a_share_too_small_to_split_names_the_batch_that_would_do(schedule, batch, world, fix):
    with pytest.raises(LayoutError, match=f"parallel.pp=2 with parallel.pp_schedule={schedule} runs .*; set {fix} "):
        check_layout(config("parallel.pp=2", f"parallel.pp_schedule={schedule}", f"train.batch_size={batch}"), world)


def test_data_files_are_checked_unless_left_to_the_ranks(tmp_path):
    cfg = config(f"data.tokenizer={tmp_path}/missing.model")
    with pytest.raises(ValueError, match="config key 'data.tokenizer'"):
        preflight(cfg, 1)
    assert preflight(cfg, 1, data=False).layout.world == 1
