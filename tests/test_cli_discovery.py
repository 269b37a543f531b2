"""The command line a newcomer meets: overrides wherever they are typed, --version, every command's help and
choices, the presets table, every config key, and one-line errors that say what was meant."""

import importlib.metadata
import json
import re
import subprocess

import pytest
from conftest import UNROLL, run_cli

from unroll.launch import cli
from unroll.models.summary import summarize
from unroll.train.config import Config, load_config, preset_names, resolve_config_path
from unroll.train.config_keys import config_keys


@pytest.fixture(scope="module")
def run_and_export(config_at, tmp_path_factory):
    """A trained run (one step, a checkpoint) and its export: what `unroll grow` and `unroll import` read."""
    from unroll.train.lifecycle.export import export
    from unroll.train.trainer import train

    root = tmp_path_factory.mktemp("source")
    cfg = config_at(root, "run", train={"steps": 1}, eval={"every": 0, "batches": 1})
    train(cfg)
    export(cfg.run.dir, root / "export")
    return cfg.run.dir, str(root / "export")


# Each command with key=value on both sides of its options: model.d_model=64 before, model.n_heads=5 after.
# Both reach the config only if the error names n_heads *and* d_model=64 (5 heads do not divide 64).
COMMANDS = {
    "train": lambda src, exp, out: ["train", "tiny-gru", "model.d_model=64", "--keys", "model.n_heads=5"],
    "info": lambda src, exp, out: ["info", "tiny-gru", "model.d_model=64", "--json", "model.n_heads=5"],
    "plan": lambda src, exp, out: [
        "plan",
        "tiny-gru",
        "model.d_model=64",
        "--nodes",
        "1",
        "--gpus-per-node",
        "8",
        "model.n_heads=5",
    ],
    "rehearse": lambda src, exp, out: [
        "rehearse",
        "tiny-gru",
        "model.d_model=64",
        "--nodes",
        "1",
        "--gpus-per-node",
        "2",
        "model.n_heads=5",
    ],
    "grow": lambda src, exp, out: ["grow", src, "model.d_model=64", "--factor", "2", "--out", out, "model.n_heads=5"],
    "import": lambda src, exp, out: ["import", exp, "model.d_model=64", "--out", out, "model.n_heads=5"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_overrides_on_both_sides_of_the_options_reach_every_command(command, run_and_export, tmp_path, capsys):
    argv = COMMANDS[command](*run_and_export, str(tmp_path / "out"))
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "model.n_heads: 5 heads do not divide d_model=64" in err, err
    assert not (tmp_path / "out").exists()  # stopped before writing anything

    # a mistyped option among them is named, alone, with the option meant; the overrides are not blamed
    assert cli.main([*argv, "--bogus-option"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"unroll {command}: error: unrecognized option --bogus-option", err


def test_version_is_the_installed_package(offline_env):
    out = run_cli(["--version"], offline_env).stdout
    assert out.strip() == f"unroll {importlib.metadata.version('unroll')}"


@pytest.mark.parametrize("command,table", [("launch", cli.LAUNCHERS), ("bench", cli.BENCHES)])
def test_launch_and_bench_help_list_their_choices(command, table, offline_env):
    out = run_cli([command, "--help"], offline_env).stdout
    for name, (_, line) in table.items():
        assert re.search(rf"^  {re.escape(name)} +{re.escape(line)}$", out, re.MULTILINE), (name, out)


@pytest.mark.parametrize(
    "argv,own_option", [(["launch", "local", "--help"], "--nproc"), (["bench", "solver", "--help"], "--grid")]
)
def test_a_launcher_or_bench_still_gets_its_own_help(argv, own_option, offline_env):
    out = run_cli(argv, offline_env).stdout
    assert out.startswith(f"usage: unroll {argv[0]} {argv[1]}") and own_option in out


def test_train_help_lists_presets_sections_and_where_the_keys_are(offline_env):
    out = run_cli(["train", "--help"], offline_env).stdout
    words = set(re.findall(r"[\w-]+", out))
    assert set(preset_names()) <= words
    assert {"run", "model", "data", "train", "parallel", "optim", "schedule", "eval", "checkpoint"} <= words
    assert "`unroll train --keys`" in out


def test_train_keys_lists_every_key_with_its_type_and_default(offline_env):
    rows = {line.split()[0]: line.split()[1:] for line in run_cli(["train", "--keys"], offline_env).stdout.splitlines()}
    keys = config_keys(Config())
    assert len(keys) > 80 and len(rows) == len(keys) + 1  # and the header
    for key in keys:
        shown = '""' if key.value == "" else str(key.value).lower() if isinstance(key.value, bool) else str(key.value)
        assert rows[key.name] == [key.type, shown], key
    assert rows["train.steps"] == ["int", "1000"] and rows["sample.prompt"] == ["str", "ROMEO."]

    # with a config: its values, overrides included; an empty value is the empty string ("no sample")
    out = run_cli(["train", "tiny-gru", "train.steps=7", "--keys", "sample.prompt="], offline_env).stdout
    assert re.search(r"^train\.steps +int +7$", out, re.MULTILINE) and re.search(
        r"^model\.pattern +str +GGGG$", out, re.MULTILINE
    )
    assert re.search(r'^sample\.prompt +str +""$', out, re.MULTILINE), out


def test_info_keys_is_train_keys(capsys):
    assert cli.main(["train", "tiny-moe", "--keys", "model.d_model=64"]) == 0
    listing = capsys.readouterr().out
    assert cli.main(["info", "tiny-moe", "--keys", "model.d_model=64"]) == 0
    assert capsys.readouterr().out == listing and re.search(r"^model\.d_model +int +64$", listing, re.MULTILINE)


def test_a_listing_piped_into_head_ends_quietly(offline_env):
    """`unroll train --keys | head`: the reader leaves before the listing is written; no traceback."""
    proc = subprocess.Popen(
        [*UNROLL, "train", "--keys"], env=offline_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    proc.stdout.close()  # before the command has imported anything, so before it writes
    err = proc.stderr.read()
    assert proc.wait(timeout=300) == 0 and err == "", err


def test_presets_table_from_the_preset_files(offline_env, capsys):
    rows = json.loads(run_cli(["presets", "--json"], offline_env).stdout)
    assert [r["preset"] for r in rows] == preset_names()
    for row in rows:
        cfg = load_config(row["preset"])
        figures = summarize(cfg.model)
        assert (row["params_total"], row["params_active"]) == (figures["params_total"], figures["params_active"])
        assert (row["pattern"], row["d_model"], row["seq_len"]) == (
            cfg.model.pattern,
            cfg.model.d_model,
            cfg.data.seq_len,
        )
        header = resolve_config_path(row["preset"]).read_text().split("\nrun:")[0]
        assert row["hardware"] and f"\n# hardware: {row['hardware']}\n" in f"\n{header}\n", row
    assert {r["hardware"] for r in rows if r["preset"].startswith("tiny-")} >= {"laptop CPU"}
    moe = next(r for r in rows if r["preset"] == "m2rnn-moe-7b")
    assert moe["params_active"] < moe["params_total"] / 4

    assert cli.main(["presets"]) == 0
    table = capsys.readouterr().out
    assert cli.main(["info"]) == 0  # info without a config: the same table
    assert capsys.readouterr().out == table
    assert re.search(r"^m2rnn-moe-7b +6\.95B +1\.29B +1536 +4096 +multi-node GPU cluster +M+A", table, re.MULTILINE)


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["train", "tiny-gru", "--steps", "10"],
            "unroll train: error: unrecognized option --steps (did you mean train.steps=10?)",
        ),
        (
            ["train", "tiny-gru", "--lr=1e-3"],
            "unroll train: error: unrecognized option --lr (did you mean optim.lr=1e-3?)",
        ),
        (["train", "tiny-gru", "steps=10"], "unroll train: error: unknown key 'steps' (did you mean train.steps?)"),
        (
            ["train", "tiny-gru", "model.moe.expert=4"],
            "unroll train: error: unknown key 'model.moe.expert' (did you mean model.moe.experts?)",
        ),
        (["info", "tiny-gru", "--jsn"], "unroll info: error: unrecognized option --jsn (did you mean --json?)"),
        (
            ["train", "train.steps=5"],
            "unroll train: error: config 'train.steps=5': no such file or preset; the config "
            f"comes first, then key=value overrides (presets: {', '.join(preset_names())})",
        ),
        (
            ["info", "tiny-gru", "data.train[0]=x"],
            "unroll info: error: config key 'data.train[0]' (override 'data.train[0]=x'): give the whole value, "
            "e.g. data.train=[a,b]",
        ),
    ],
)
def test_common_mistakes_get_one_line_that_says_what_was_meant(argv, message, offline_env):
    proc = run_cli(argv, offline_env, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == message, proc.stderr


@pytest.mark.parametrize(
    "argv,missing",
    [
        (["generate", "runs/x"], "--prompt"),
        (["export", "runs/x"], "--out"),
        (["import"], "export, --out"),  # overrides are optional, and not listed as required
        (["train"], "config"),
        (["launch"], "NAME"),
    ],
)
def test_a_missing_argument_is_argparse_usage_and_one_error_line(argv, missing, offline_env):
    proc = run_cli(argv, offline_env, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith(f"usage: unroll {argv[0]}")
    assert "Traceback" not in proc.stderr
    error = proc.stderr.strip().splitlines()[-1]
    assert error.startswith(f"unroll {argv[0]}: error: the following arguments are required: {missing}"), error
    assert "key=value" not in error


NO_TORCH_FOR_CONFIG_MISTAKES = """
import sys
from unroll.launch.cli import main
codes = [main(argv) for argv in (["train", "--keys"], ["train", "no-such-preset"], ["train", "tiny-gru", "no.key=1"])]
print(codes, "torch" in sys.modules)
"""


def test_keys_and_config_mistakes_answer_without_importing_torch(offline_env):
    # torch's import takes seconds: the schema, `--keys` and a config's errors must not need it
    out = subprocess.run(
        [UNROLL[0], "-c", NO_TORCH_FOR_CONFIG_MISTAKES], capture_output=True, text=True, env=offline_env, timeout=120
    )
    assert out.stdout.strip().splitlines()[-1] == "[0, 2, 2] False", out.stdout[-2000:] + out.stderr[-2000:]
