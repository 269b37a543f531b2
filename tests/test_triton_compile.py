"""`unroll check kernels`: every Triton kernel the project launches compiles to a cubin for an H100 (sm_90)
through Triton's real compiler, on a machine without a GPU (the tests otherwise run the kernels only in the
interpreter, which accepts code the compiler rejects)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

TESTS = Path(__file__).parent
# the kernels the launchers start: the scans, the fused Newton and its adjoint (diagonal and 2×2), M²RNN's
KERNELS = {
    "triton_scan:_diag_summary_kernel",
    "triton_scan:_diag_chunk_kernel",
    "triton_scan:_block_summary_kernel",
    "triton_scan:_block_chunk_kernel",
    "triton_newton:newton_k1_p3",  # ParaGRU's fused Newton (1×1 blocks, 3 parameter vectors)
    "triton_newton:adjoint_k1_p3",
    "triton_newton:newton_k2_p5",  # ParaLSTM's (2×2 blocks, 5 parameter vectors)
    "triton_newton:adjoint_k2_p5",
    "triton_m2rnn:_fwd_kernel",
    "triton_m2rnn:_bwd_kernel",
}


def check(tmp_path, *args):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), env.get("PYTHONPATH", "")])
    out = tmp_path / "kernels.json"
    proc = subprocess.run(
        # through the command line, as a user runs it (not as __main__ itself: records must unpickle in another module)
        [sys.executable, "-m", "unroll.launch.cli", "check", "kernels", "--json", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    return proc, json.loads(out.read_text()) if out.exists() else []


def test_every_kernel_compiles_for_sm90_in_float32_and_float64(tmp_path):
    proc, rows = check(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    compiled = {row["kernel"].removeprefix("unroll.kernels.") for row in rows}
    assert compiled == KERNELS
    assert all(row["ok"] and row["cubin_bytes"] > 0 for row in rows)
    for kernel in ("triton_newton:newton_k1_p3", "triton_newton:adjoint_k2_p5", "triton_m2rnn:_bwd_kernel"):
        dtypes = {"F64=True" in row["constexprs"] for row in rows if row["kernel"].endswith(kernel)}
        assert dtypes == {True, False}, kernel
    # the fused Newton at its production tiles (64-step chunks, 32 channels) and the diagonal scan's 128-step chunks
    assert any("C=64, BLOCK_D=32" in row["constexprs"] for row in rows if "newton_k2_p5" in row["kernel"])
    assert any("C=128" in row["constexprs"] for row in rows if "_diag_chunk_kernel" in row["kernel"])
    assert f"{len(rows)} of {len(rows)} compiled within" in proc.stdout


def test_a_kernel_the_interpreter_runs_and_the_compiler_rejects_fails_the_check(tmp_path):
    proc, rows = check(tmp_path, "--cases", "broken_triton_kernel", "--no-builtin")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    [row] = rows
    assert row["kernel"] == "broken_triton_kernel:_scale_kernel" and not row["ok"]
    assert "Cannot access global variable SCALE" in row["error"]
    assert "0 of 1 compiled" in proc.stdout


def test_a_users_own_fused_cells_compile_through_cases(tmp_path):
    """Fused cells written outside the project go through the same check with --cases: a diagonal one with one
    parameter vector (tests/stiff_fused_cells.py) and a 3×3-block one (tests/block3_fused_cell.py), each with
    its Newton and adjoint kernels written out for its block size and parameters, its cell inlined."""
    proc, rows = check(tmp_path, "--cases", "stiff_fused_cells", "--cases", "block3_fused_cell", "--no-builtin")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    kernels = {(row["kernel"].removeprefix("unroll.kernels."), row["ok"]) for row in rows}
    assert {kernel for kernel, _ in kernels} == {
        "triton_newton:newton_k1_p1",
        "triton_newton:adjoint_k1_p1",
        "triton_newton:newton_k3_p9",
        "triton_newton:adjoint_k3_p9",
    }
    assert all(ok for _, ok in kernels)
    for row in rows:
        cell = "switch_value_and_jacobian" if "_k1_" in row["kernel"] else "rotor3_value_and_jacobian"
        assert f"CELL={cell}" in row["constexprs"], row
