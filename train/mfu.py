"""Achieved model FLOPs per GPU and model FLOPs utilisation (MFU): the FLOPs per token of models/flops.py times the
tokens per second, per rank, over the device's peak.

The peaks are the datasheets' dense figures (no structured sparsity) per GPU, by the precision the matmuls run
in: bf16 under bf16 autocast, tf32 for float32 matmuls where torch is allowed tf32
(`torch.set_float32_matmul_precision("high")`), else plain fp32. A device not in the table, a precision it has
no figure for, and a CPU have no peak, and then no MFU is logged: none is invented. `train.peak_tflops`
overrides the table (a GPU missing from it, a clock-limited part, or an agreed reference for a CPU run).
"""

from __future__ import annotations

import re

import torch

# (pattern over the lowercased device name, {precision: dense TFLOP/s}), the first match wins: the more
# specific names first ("h100 pcie" before "h100"); \b keeps "gh200" out of "h200".
PEAK_TFLOPS: list[tuple[str, dict[str, float]]] = [
    (r"\bgh200\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bh200\b.*\bnvl\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bh200\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),
    (r"\bh100\b.*\bnvl\b", {"bf16": 835.5, "tf32": 417.5, "fp32": 60.0}),
    (r"\bh100\b.*\bpcie\b", {"bf16": 756.5, "tf32": 378.0, "fp32": 51.0}),
    (r"\bh100\b", {"bf16": 989.4, "tf32": 494.7, "fp32": 66.9}),  # SXM: "NVIDIA H100 80GB HBM3"
    (r"\ba100\b", {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5}),
    (r"\bl40s\b", {"bf16": 362.05, "tf32": 183.0, "fp32": 91.6}),
    (r"\bb200\b", {"bf16": 2250.0}),
]


def matmul_precision(dtype: torch.dtype) -> str:
    """The precision a float matmul of `dtype` activations runs in on a GPU: bf16 (or fp16), tf32, fp32."""
    if dtype in (torch.bfloat16, torch.float16):
        return "bf16"
    return "fp32" if torch.get_float32_matmul_precision() == "highest" else "tf32"


def table_peak_tflops(device_name: str, precision: str) -> float | None:
    """The table's dense TFLOP/s of a device by its name (torch.cuda.get_device_name), None if it has none."""
    name = device_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(precision)
    return None


def peak_flops(device: torch.device, dtype: torch.dtype, override_tflops: float = 0.0) -> float | None:
    """Peak FLOP/s of one device for matmuls of `dtype`: override_tflops when positive, else the table's for a
    CUDA device; None where none is known (a CPU, a GPU not in the table)."""
    if override_tflops > 0:
        return override_tflops * 1e12
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    tflops = table_peak_tflops(torch.cuda.get_device_name(device), matmul_precision(dtype))
    return None if tflops is None else tflops * 1e12


def utilisation(tokens_per_s: float, flops_per_token: float, gpus: int, peak: float | None) -> dict[str, float]:
    """{"tflops_per_gpu": achieved model TFLOP/s per device, "mfu": its fraction of `peak` (only with one)}, from
    tokens/s over all `gpus` devices together."""
    achieved = tokens_per_s * flops_per_token / gpus
    row = {"tflops_per_gpu": achieved / 1e12}
    if peak:
        row["mfu"] = achieved / peak
    return row
