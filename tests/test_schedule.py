"""Learning-rate schedules: warmup, cosine, warmup-stable-decay."""

import math

import pytest

from unroll.train.config import ScheduleConfig
from unroll.train.schedule import lr_at


def curve(name, steps=100, **kw):
    cfg = ScheduleConfig(name=name, warmup_steps=10, min_lr_ratio=0.1, **kw)
    return [lr_at(s, 1.0, steps, cfg) for s in range(steps)]


@pytest.mark.parametrize("name", ["cosine", "wsd", "constant"])
def test_linear_warmup_reaches_peak(name):
    lrs = curve(name)
    assert lrs[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert max(lrs) == pytest.approx(1.0)


def test_cosine_decays_monotonically_to_the_floor():
    lrs = curve("cosine")
    assert lrs[10] == pytest.approx(1.0) and lrs[-1] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    mid = 10 + (99 - 10) / 2  # halfway through the decay the cosine is at the mean of peak and floor
    assert lr_at(math.floor(mid), 1.0, 100, ScheduleConfig(warmup_steps=10)) == pytest.approx(0.55, abs=0.02)


def test_wsd_is_flat_then_decays_linearly_in_the_last_fraction():
    lrs = curve("wsd", decay_fraction=0.2)
    assert lrs[10:80] == pytest.approx([1.0] * 70)
    decay = lrs[80:]
    assert decay[-1] == pytest.approx(0.1)
    steps = [a - b for a, b in zip(decay, decay[1:])]
    assert steps == pytest.approx([steps[0]] * len(steps)) and steps[0] > 0
