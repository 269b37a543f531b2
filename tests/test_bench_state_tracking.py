"""`unroll bench state-tracking`: its task generators agree with brute-force references, and it runs end to
end at a tiny size (no accuracy is asserted: a few steps learn nothing; the numbers live in the benchmark's
output and the issue notes)."""

import itertools
import json
import re

import pytest
import torch

from unroll.launch.bench import state_tracking
from unroll.launch.bench.state_tracking import (
    COMPOSE,
    PERMS,
    S3_COMPOSE,
    S3_PERMS,
    length_at,
    main,
    modadd_batch,
    parity_batch,
    s3_batch,
    s5_batch,
    solved,
    summary,
)
from unroll.launch.cli import main as cli_main

TINY = ["--steps", "2", "--eval-samples", "4", "--threads", "1"]


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


def test_s3_targets_compose_permutations_first_token_first_and_s3_is_not_abelian():
    x, y = s3_batch(4, 30, torch.Generator().manual_seed(3))
    assert S3_PERMS == list(itertools.permutations(range(3))) and S3_PERMS[0] == (0, 1, 2)
    assert set(x.unique().tolist()) == set(range(6))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        state = [0, 1, 2]
        for g, target in zip(row_x, row_y):
            state = [S3_PERMS[g][state[i]] for i in range(3)]
            assert S3_PERMS[target] == tuple(state)
    # the table against composing the tuples, and two elements that do not commute
    for a, p in enumerate(S3_PERMS):
        for b, q in enumerate(S3_PERMS):
            assert S3_PERMS[S3_COMPOSE[a, b]] == tuple(q[p[i]] for i in range(3))
    assert (S3_COMPOSE != S3_COMPOSE.T).any()


def test_modadd_targets_are_prefix_sums_mod_5():
    x, y = modadd_batch(3, 40, torch.Generator().manual_seed(4))
    assert set(x.unique().tolist()) == set(range(5))
    for row_x, row_y in zip(x.tolist(), y.tolist()):
        total = 0
        for a, target in zip(row_x, row_y):
            total = (total + a) % 5
            assert target == total


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
    argv = ["--length", "8", "--tasks", "parity,s3", "--seeds", "0,1", "--diagnose", *TINY, "--json", str(out)]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    # every family, at the training length, 4× and 8× it; a summary over the seeds
    assert "acc/last@8*" in printed and "acc/last@32" in printed and "acc/last@64" in printed
    assert re.search(r"gru +parity +solved [012]/2 seeds: @8 min", printed)
    assert "    @64: by position: [0-0]" in printed
    result = json.loads(out.read_text())
    assert result["eval_lengths"] == [8, 32, 64] and result["skipped"] == {} and result["setting"] == "quick"
    # --quick's learning rate per task, in the header, the JSON and every row
    assert "lr parity 0.03, s3 0.01," in printed and result["lr"] == {"parity": 3e-2, "s3": 1e-2}
    rows = result["rows"]
    expected = [(f, t, s) for f in ("gru", "lstm", "m2rnn", "transformer") for t in ("parity", "s3") for s in (0, 1)]
    assert [(r["family"], r["task"], r["seed"]) for r in rows] == expected
    for r in rows:
        assert {"steps", "loss", "params", "train_seconds", "eval_seconds", "acc", "last_acc"} <= r.keys()
        assert set(r["acc"]) == set(r["last_acc"]) == {"8", "32", "64"}
        assert r["lr"] == result["lr"][r["task"]]
        assert all(0 <= a <= 1 for a in [*r["acc"].values(), *r["last_acc"].values()])
        assert set(r["diagnosis"]) == {"8", "32", "64"} and ("sign_acc" in r["diagnosis"]["8"]) == (r["task"] == "s3")
        assert r["solved"] == (r["acc"]["8"] >= 0.99 and r["acc"]["32"] >= 0.99)


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
                *TINY,
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
    argv = ["--quick", *TINY, "--families", "gru,bad-char", "--exclude", "bad-char", "--tasks", "parity"]
    assert main([*argv, "--eval-lengths", "64", "--threads", "1", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "excluded bad-char (--exclude)" in printed and "machine: load average" in printed
    result = json.loads(out.read_text())
    assert [r["family"] for r in result["rows"]] == ["gru"] and set(result["skipped"]) == {"bad-char"}


def test_settings_and_model_overrides(monkeypatch, capsys, tmp_path):
    """--full and --quick fill what is not given; --set reaches every family's ModelConfig (and a field that
    does not exist fails the bench by name, before training); --decay all is recorded."""
    built = []
    real_build = state_tracking.build

    def recording(family, vocab, overrides=()):
        model, why = real_build(family, vocab, overrides)
        built.append((family, model.cfg.m2rnn.state_grad_clip if model is not None else why))
        return model, why

    monkeypatch.setattr(state_tracking, "build", recording)
    out = tmp_path / "st.json"
    argv = ["--full", "--families", "m2rnn", "--tasks", "parity", "--length", "4", "--eval-lengths", "6"]
    assert (
        main(
            [
                *argv,
                *TINY,
                "--device",
                "cpu",
                "--decay",
                "all",
                "--decay-extra",
                "norm",
                "--set",
                "m2rnn.state_grad_clip=0.5",
                "--json",
                str(out),
            ]
        )
        == 0
    )
    result = json.loads(out.read_text())
    assert result["setting"] == "full" and result["seeds"] == [0, 1, 2] and result["curriculum"] == 4
    assert result["lr"] == {"parity": 1e-2}
    assert (
        result["decay"] == "all"
        and result["decay_extra"] == "norm"
        and result["model_overrides"] == ["m2rnn.state_grad_clip=0.5"]
    )
    assert result["eval_lengths"] == [4, 6] and built and all(clip == 0.5 for _, clip in built)
    capsys.readouterr()
    assert main(["--families", "gru", *TINY, "--set", "no_such_field=1"]) == 1
    assert "family gru does not build: ModelConfig rejects" in capsys.readouterr().err


@pytest.mark.parametrize("setting", ["quick", "full"])
def test_each_setting_names_its_tasks_and_lengths(setting):
    preset = state_tracking.SETTINGS[setting]
    assert set(preset["tasks"].split(",")) >= {"parity", "s3"} and preset["steps"] > 0


def test_decay_extra_moves_only_the_matching_parameters_into_the_decayed_group():
    model, _ = state_tracking.build("gru", 2)
    names = {id(p): n for n, p in model.named_parameters()}

    def decayed(opt):
        return {names[id(p)] for g in opt.param_groups if g["weight_decay"] for p in g["params"]}

    base = decayed(state_tracking.optimizer(model, 1e-3, 0.1))
    extra = state_tracking.optimizer(model, 1e-3, 0.1, decay_extra=r"in_proj\.weight")
    assert decayed(extra) == base | {"blocks.0.mixer.in_proj.weight", "blocks.1.mixer.in_proj.weight"}
    everything = [id(p) for g in extra.param_groups for p in g["params"]]
    assert sorted(everything) == sorted(names) and len(set(everything)) == len(everything)


def test_diagnose_buckets_positions_and_splits_s3_into_sign_and_rest():
    x, y = s3_batch(8, 12, torch.Generator().manual_seed(5))
    perfect = state_tracking.diagnose(y, y, "s3")
    assert list(perfect["by_position"]) == ["0-0", "1-1", "2-3", "4-7", "8-11"]
    assert set(perfect["by_position"].values()) == {1.0} and perfect["sign_acc"] == perfect["z3_given_sign_acc"] == 1
    # the signs are a homomorphism: sign(b ∘ a) = sign(a) xor sign(b)
    sign = state_tracking.S3_SIGN
    assert all(sign[S3_COMPOSE[a, b]] == sign[a] ^ sign[b] for a in range(6) for b in range(6))
    # a predictor of the sign only (the identity or a transposition): sign right everywhere, the rest 1 in 3
    sign_only = torch.where(sign[y] == 1, 1, 0)
    d = state_tracking.diagnose(sign_only, y, "s3")
    assert d["sign_acc"] == 1 and d["z3_given_sign_acc"] == pytest.approx((sign_only == y).float().mean().item())
    assert "sign_acc" not in state_tracking.diagnose(y[:, :3] % 2, y[:, :3] % 2, "parity")
    assert "by position: [0-0] 1.00" in state_tracking.format_diagnosis(perfect)


def test_a_seed_solves_a_task_at_the_training_length_and_at_four_times_it():
    row = {"acc": {"8": 1.0, "32": 0.995, "64": 0.5}}
    assert solved(row, 8)  # 8× is reported, not required
    assert not solved({"acc": {"8": 1.0, "32": 0.98, "64": 1.0}}, 8)
    assert not solved({"acc": {"8": 0.98, "32": 1.0}}, 8)
    assert solved({"acc": {"8": 0.99}}, 8)  # 4× not evaluated: the training length alone
    rows = [dict(row, family="gru", task="parity", seed=s) for s in (0, 1)]
    rows[1] = dict(rows[1], acc={"8": 0.6, "32": 0.5, "64": 0.5})
    assert summary(rows, [8, 32, 64], 8).startswith("gru          parity  solved 1/2 seeds: @8 min 0.600 mean 0.800")
