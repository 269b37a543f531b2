"""`unroll bench state-tracking`: its task generators are right, and it runs end to end (no accuracy is
asserted: a few steps learn nothing; the numbers live in the benchmark's output)."""

import json

import torch

from unroll.launch.bench import state_tracking
from unroll.launch.bench.state_tracking import COMPOSE, PERMS, length_at, main, parity_batch, s5_batch
from unroll.launch.cli import main as cli_main


def test_parity_targets_are_prefix_xors():
    x, y = parity_batch(4, 50, torch.Generator().manual_seed(0))
    assert set(x.unique().tolist()) == {0, 1}
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        acc = 0
        for bit, target in zip(row_x, row_y):
            acc ^= bit
            assert target == acc


def test_s5_targets_compose_permutations_first_token_first():
    x, y = s5_batch(3, 20, torch.Generator().manual_seed(1))
    assert PERMS[0] == (0, 1, 2, 3, 4) and len(set(PERMS)) == 120
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        state = list(range(5))
        for g, target in zip(row_x, row_y):
            state = [PERMS[g][state[i]] for i in range(5)]  # g ∘ state: the new token applied last
            assert PERMS[target] == tuple(state)


def test_s5_identity_is_neutral():
    g = torch.Generator().manual_seed(2)
    x, y = s5_batch(2, 12, g)
    ident = torch.zeros(2, 12, dtype=torch.long)
    assert (COMPOSE[0] == torch.arange(120)).all() and (COMPOSE[:, 0] == torch.arange(120)).all()
    # a sequence of identities stays at the identity; inserting identities does not change the product
    assert (_targets(ident) == 0).all()
    with_ids = torch.stack([x, ident], dim=2).flatten(1)  # g0, e, g1, e, ...
    assert (_targets(with_ids)[:, 1::2] == y).all()


def _targets(x: torch.Tensor) -> torch.Tensor:
    state, out = torch.zeros(len(x), dtype=torch.long), []
    for t in range(x.shape[1]):
        state = COMPOSE[state, x[:, t]]
        out.append(state)
    return torch.stack(out, 1)


def test_bench_quick_runs_and_writes_json(tmp_path, capsys):
    out = tmp_path / "st.json"
    assert (
        main(
            [
                "--quick",
                "--families",
                "gru,transformer",
                "--eval-lengths",
                "64,128",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "acc/last@64*" in printed and "acc/last@128" in printed and "transformer" in printed
    result = json.loads(out.read_text())
    assert result["eval_lengths"] == [64, 128] and result["skipped"] == {}
    rows = result["rows"]
    expected = [(f, t) for f in ("gru", "transformer") for t in ("parity", "s5")]
    assert [(r["family"], r["task"]) for r in rows] == expected
    for r in rows:
        assert {"steps", "loss", "params", "train_seconds", "eval_seconds", "acc", "last_acc"} <= r.keys()
        assert set(r["acc"]) == set(r["last_acc"]) == {"64", "128"}
        assert all(0 <= a <= 1 for a in [*r["acc"].values(), *r["last_acc"].values()])


def test_curriculum_grows_the_length_then_holds_it():
    lengths = [length_at(s, 100, 64, start=2, ramp=0.5) for s in range(100)]
    assert lengths[0] == 2 and lengths[49] < 64 and lengths[50:] == [64] * 50
    assert lengths == sorted(lengths) and all(2 <= L <= 64 for L in lengths)
    # off (start 0, or a start at or past the length): always the training length
    assert {length_at(s, 100, 64) for s in range(100)} == {64}
    assert {length_at(s, 100, 64, start=64) for s in range(100)} == {64}
    assert length_at(0, 1, 64, start=2, ramp=0.5) == 2 and length_at(1, 1, 64, start=2, ramp=0.5) == 64


def test_curriculum_keeps_tokens_per_step_and_is_announced(monkeypatch, tmp_path, capsys):
    shapes = []
    make, classes = state_tracking.TASKS["parity"]

    def recording(batch, length, g):
        shapes.append((batch, length))
        return make(batch, length, g)

    monkeypatch.setitem(state_tracking.TASKS, "parity", (recording, classes))
    out = tmp_path / "st.json"
    assert (
        main(
            [
                "--families",
                "gru",
                "--tasks",
                "parity",
                "--steps",
                "4",
                "--batch",
                "2",
                "--length",
                "16",
                "--curriculum",
                "4",
                "--ramp",
                "0.5",
                "--eval-lengths",
                "16",
                "--eval-samples",
                "2",
                "--threads",
                "1",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    assert "length curriculum 4→16" in capsys.readouterr().out
    # the eval set first, then the training batches: batch × length stays 2 × 16 (rounded down)
    assert shapes == [(2, 16), (8, 4), (3, 10), (2, 16), (2, 16)]
    assert json.loads(out.read_text())["curriculum"] == 4


def test_cli_registers_the_bench(capsys):
    assert (
        cli_main(
            [
                "bench",
                "state-tracking",
                "--quick",
                "--families",
                "lstm",
                "--tasks",
                "parity",
                "--eval-lengths",
                "32",
                "--length",
                "16",
                "--threads",
                "1",
            ]
        )
        == 0
    )
    assert "lstm" in capsys.readouterr().out


def test_a_family_that_does_not_build_fails_the_bench_by_name(monkeypatch, capsys, tmp_path):
    # what a family looks like on a checkout that cannot build it: an unknown pattern char or config field
    monkeypatch.setitem(state_tracking.FAMILIES, "bad-char", dict(pattern="QQ"))
    monkeypatch.setitem(state_tracking.FAMILIES, "bad-field", dict(pattern="GG", no_such_field=1))
    out = tmp_path / "st.json"
    assert main(["--quick", "--families", "gru,bad-char,bad-field", "--json", str(out)]) == 1
    printed = capsys.readouterr()
    assert "family bad-char does not build: pattern: unknown layer kind" in printed.err
    assert "family bad-field does not build: ModelConfig rejects" in printed.err
    assert "--exclude bad-char" in printed.err and "family gru" not in printed.err
    assert "acc/last@" not in printed.out and not out.exists()  # nothing trained


def test_excluded_families_are_listed_and_left_out(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(state_tracking.FAMILIES, "bad-char", dict(pattern="QQ"))
    out = tmp_path / "st.json"
    argv = ["--quick", "--families", "gru,bad-char", "--exclude", "bad-char", "--tasks", "parity"]
    assert main([*argv, "--eval-lengths", "64", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "excluded bad-char (--exclude)" in printed and "machine: load average" in printed
    result = json.loads(out.read_text())
    assert [r["family"] for r in result["rows"]] == ["gru"] and set(result["skipped"]) == {"bad-char"}
