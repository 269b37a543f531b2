"""`make gpu-check`'s runner (launch/gpu_check.py) on the CPU: the plumbing, not the figures. --device cpu
is forced so that these pass on a GPU machine too; no timing is asserted."""

import json
import subprocess
import sys

from unroll.launch import gpu_check
from unroll.launch.gpu_check_parts import PARTS, Part


def _part(name: str, code: str, timeout_s: int = 60) -> Part:
    return Part(name, f"python -c {code!r}", timeout_s, False, lambda s: ["-c", code], lambda path: ("", None))


def test_cuda_parts_are_skipped_on_cpu_and_the_rest_run_at_tiny_sizes(tmp_path):
    out = tmp_path / "check"
    argv = ["--device", "cpu", "--quick", "--parts", "cuda-tests,throughput-1b,tnt", "--out", str(out)]
    done = subprocess.run(
        [sys.executable, "-m", "unroll.launch.gpu_check", *argv], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {line.split()[0]: line for line in done.stdout.splitlines() if line[:1].isalpha()}
    assert "skip" in rows["cuda-tests"] and "needs CUDA" in rows["cuda-tests"]
    assert "skip" in rows["throughput-1b"] and " pass " in rows["tnt"] and "tokens/s over titans" in rows["tnt"]
    assert " pass " in rows["all"] and "2 skipped" in rows["all"]
    report = json.loads((out / "gpu-check.json").read_text())
    assert report["passed"] and report["device"] == "cpu" and report["quick"]
    assert {"torch", "torch_cuda", "gpu", "commit"} <= set(report["machine"])
    parts = {p["name"]: p for p in report["parts"]}
    assert [p["name"] for p in report["parts"]] == ["cuda-tests", "throughput-1b", "tnt"]
    assert parts["cuda-tests"]["status"] == parts["throughput-1b"]["status"] == "skipped"
    tnt = parts["tnt"]
    assert tnt["status"] == "passed" and tnt["seconds"] > 0 and tnt["figures"][0]["layout"].startswith("titans")
    assert (out / "tnt.log").exists() and (out / "gpu-check.txt").read_text().count("\n") >= 4


def test_a_failing_or_hanging_part_is_recorded_and_the_others_still_run(tmp_path, monkeypatch, capsys):
    tnt = next(p for p in PARTS if p.name == "tnt")
    parts = [
        _part("crashes", "import sys; print('loading'); print('boom: out of memory'); sys.exit(3)"),
        _part("hangs", "import time; print('waiting', flush=True); time.sleep(120)", timeout_s=3),
        _part("no-figures", "print('done, but wrote nothing')"),
        tnt,
    ]
    monkeypatch.setattr(gpu_check, "PARTS", parts)
    names = ",".join(p.name for p in parts)
    assert gpu_check.main(["--device", "cpu", "--parts", names, "--out", str(tmp_path)]) == 1
    printed = capsys.readouterr().out
    rows = {line.split()[0]: line for line in printed.splitlines() if line[:1].isalpha()}
    assert "FAIL" in rows["crashes"] and "exit 3" in rows["crashes"]
    assert "| boom: out of memory" in printed  # the failed part's last log lines, under its row
    assert "FAIL" in rows["hangs"] and "timed out after 3 s" in rows["hangs"]
    assert "FAIL" in rows["no-figures"] and "wrote no no-figures.json" in rows["no-figures"]
    assert " pass " in rows["tnt"] and "FAIL" in rows["all"] and "3 failed" in rows["all"]
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    status = {p["name"]: (p["status"], p["tail"][-1:]) for p in report["parts"]}
    assert status["crashes"] == ("failed", ["boom: out of memory"]) and status["hangs"] == ("failed", ["waiting"])
    assert status["tnt"] == ("passed", []) and not report["passed"]


def test_parts_past_the_budget_are_skipped_and_do_not_pass(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "PARTS", [_part("late", "print(1)")])
    assert gpu_check.main(["--device", "cpu", "--budget-s", "0", "--out", str(tmp_path)]) == 1
    assert "not started: 0 s of the budget left" in capsys.readouterr().out
    (late,) = json.loads((tmp_path / "gpu-check.json").read_text())["parts"]
    assert late["status"] == "skipped" and late["seconds"] == 0
