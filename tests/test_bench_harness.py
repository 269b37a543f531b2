"""The bench harness: compared paths alternate round by round, each figure is the minimum and median of
its rounds, an oversubscribed machine is warned about, --threads is applied (and restored). No wall-clock
figure is asserted."""

import argparse
import os
from types import SimpleNamespace

import pytest
import torch

from unroll.launch.bench import harness

CPU = torch.device("cpu")


def test_paths_alternate_round_by_round_after_an_interleaved_warmup():
    calls = []
    paths = {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}
    times = harness.alternate(paths, CPU, rounds=3, warmup=1)
    assert calls == ["a", "b"] * 4  # one warm-up round, then 3 timed ones
    assert set(times) == {"a", "b"} and all(len(t.seconds) == 3 for t in times.values())


def test_min_and_median_are_over_the_rounds(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(harness, "time", SimpleNamespace(perf_counter=lambda: now[0]))  # a clock the paths move
    durations = {"a": iter([5.0, 3.0, 2.0]), "b": iter([1.0, 4.0, 1.0])}

    def path(name):
        return lambda: now.__setitem__(0, now[0] + next(durations[name]))

    times = harness.alternate({"a": path("a"), "b": path("b")}, CPU, rounds=3, warmup=0)
    assert times["a"].seconds == [5.0, 3.0, 2.0] and times["a"].min == 2.0 and times["a"].median == 3.0
    assert times["b"].seconds == [1.0, 4.0, 1.0] and times["b"].min == 1.0 and times["b"].median == 1.0
    assert harness.ratio(times["a"], times["b"]) == 3.0  # of the medians


def _machine(monkeypatch, load: float, cpus: int):
    monkeypatch.setattr(os, "getloadavg", lambda: (load, load / 2, load / 4))
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)


@pytest.mark.parametrize(
    ("load", "cpus", "threads", "processes", "warned"),
    [
        (0.5, 4, 1, 1, False),
        (4.0, 4, 2, 2, False),  # at the CPU count, not above
        (4.5, 4, 1, 1, True),  # load average above the CPU count
        (0.5, 4, 3, 2, True),  # 6 threads over 4 CPUs
        (0.5, 4, 5, 1, True),
    ],
)
def test_oversubscription_is_warned_on_stderr(monkeypatch, capsys, load, cpus, threads, processes, warned):
    _machine(monkeypatch, load, cpus)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # the test machine's own threads stay
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    with harness.session(threads, processes, prog="unroll bench x"):
        pass
    out, err = capsys.readouterr()
    assert f"load average {load:.2f}" in out and f"on {cpus} CPUs" in out and f"{threads} torch thread(s)" in out
    assert ("unroll bench x: warning: the machine is oversubscribed" in err) == warned, err
    assert ("load average" in err) == (load > cpus) and ("thread(s) =" in err) == (threads * processes > cpus)


def test_threads_are_applied_inside_the_session_and_restored(capsys):
    before = torch.get_num_threads()
    want = 1 if before != 1 else 2
    with harness.session(want):
        assert torch.get_num_threads() == want
        inside = capsys.readouterr().out
    assert f"{want} torch thread(s)" in inside and torch.get_num_threads() == before
    with harness.session(0):  # 0: torch's own count is kept
        assert torch.get_num_threads() == before


def test_rounds_flag_defaults_to_five_and_keeps_repeat_as_its_old_name():
    p = argparse.ArgumentParser()
    harness.add_arguments(p, threads_default=2)
    assert p.parse_args([]).rounds == harness.ROUNDS >= 5 and p.parse_args([]).threads == 2
    assert p.parse_args(["--repeat", "3"]).rounds == 3 and p.parse_args(["--rounds", "7"]).rounds == 7
    with pytest.raises(SystemExit):
        p.parse_args(["--rounds", "0"])


@pytest.mark.parametrize("timed", [True, False])
def test_the_warning_advises_minima_only_where_rounds_are_timed(monkeypatch, capsys, timed):
    _machine(monkeypatch, 9.0, 2)
    with harness.session(0, timed=timed):
        pass
    err = capsys.readouterr().err
    assert "oversubscribed" in err and ("compare minima" in err) == timed
