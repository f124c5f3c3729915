"""The roofline a training step is compared with: the machine's fp32 and int8 matmul peaks, and a step's share.

The peaks come from `edgepeft.bench.peak`, one process per library, each started without OPENBLAS_CORETYPE
and OPENBLAS_L2_SIZE: this platform sets them on some processors for old OpenBLAS builds, and they pin a
current numpy to its Haswell kernel (253 against 457 GFLOP/s on an AVX-512 machine). The fp32 peak is
the fastest of numpy's, torch's and ONNX Runtime's fp32 matmul, the int8 peak the fastest of ONNX
Runtime's int8 kernels, so each bounds every library a system can run its matmuls in.

A step's roofline time is the least time its matmuls can take: its int8 FLOPs at the int8 peak plus its
fp32 FLOPs at the fp32 peak. Its share of the roofline is that time over the measured step time, which
stays at or below 1 as long as no kernel runs faster than the peak of its precision.
"""

from __future__ import annotations

import os
from typing import Any

from edgepeft.bench.flops import StepFlops

OPENBLAS_VARIABLES = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
PEAK_SIZE = 2048  # square matrices: large enough that every library runs at its sustained rate


def platform_openblas_variables() -> dict[str, str]:
    """The OpenBLAS variables set in the bench's own environment (the peak processes run without them)."""
    return {name: os.environ[name] for name in OPENBLAS_VARIABLES if name in os.environ}


def combine_peaks(measured: list[dict[str, Any]], size: int, threads: int) -> dict[str, Any]:
    """One record of the per-library peak processes' figures: every rate, the best of each precision, the BLAS."""
    fp32 = {k: v for figures in measured for k, v in figures.get("fp32", {}).items()}
    int8 = {k: v for figures in measured for k, v in figures.get("int8", {}).items()}
    numpy = next(figures for figures in measured if "blas" in figures)
    return {
        "fp32_flops_per_s": max(fp32.values()),
        "int8_ops_per_s": max(int8.values()),
        "fp32": fp32,
        "int8": int8,
        "size": size,
        "threads": threads,
        "blas": numpy["blas"],
        "environment": numpy["environment"],  # the OpenBLAS variables as the numpy peak process saw them
        "unset_for_peaks": platform_openblas_variables(),
    }


def roofline_seconds(flops: StepFlops, int8_frozen: bool, fp32_peak: float, int8_peak: float) -> float:
    """The least time a step's matmuls take: the frozen weights' at the int8 peak if `int8_frozen`, the rest at fp32."""
    int8 = flops.frozen if int8_frozen else 0.0
    return int8 / int8_peak + (flops.total - int8) / fp32_peak


def roofline_share(flops: StepFlops, seconds: float, int8_frozen: bool, fp32_peak: float, int8_peak: float) -> float:
    """A step's share of its roofline: its roofline time over its measured `seconds`."""
    return roofline_seconds(flops, int8_frozen, fp32_peak, int8_peak) / seconds
