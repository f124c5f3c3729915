"""What machine and software a benchmark ran on: CPU model, cores, memory, library versions, date."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from typing import Any

_PACKAGES = ("onnxruntime-training-cpu", "onnx", "torch", "transformers", "peft", "numpy", "threadpoolctl",
             "edgepeft")  # fmt: skip
# The /proc/cpuinfo flags that decide which fp32 and int8 matmul kernels run (x86: FMA, AVX2, AVX-512 and
# its VNNI/BF16 parts, AVX-VNNI, AMX; Arm: dot product, i8mm, SVE), in this order in the report.
MATMUL_FEATURES = ("fma", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
                   "amx_tile", "amx_int8", "amx_bf16", "asimd", "asimddp", "i8mm", "sve", "bf16")  # fmt: skip


def _cpu() -> dict[str, Any]:
    info: dict[str, Any] = {"model": platform.processor() or platform.machine(), "flags": []}
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    info["model"] = value.strip()
                elif key.strip() in ("flags", "Features"):
                    present = set(value.split())
                    info["flags"] = [flag for flag in MATMUL_FEATURES if flag in present]
                    break
    except OSError:
        pass
    return info


def _memory_gb() -> float | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1e9
    except (ValueError, OSError, AttributeError):
        return None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def code_version() -> dict[str, Any]:
    """The git commit edgepeft was imported from, and whether its files differed from it (None outside git)."""
    import edgepeft

    root = os.path.dirname(os.path.dirname(os.path.abspath(edgepeft.__file__)))

    def git(*args: str) -> str | None:
        try:
            run = subprocess.run(["git", "-C", root, *args], capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError):
            return None
        return run.stdout.strip() if run.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no", "--", "edgepeft")
    return {"commit": commit, "modified": bool(status) if commit else None, "path": root}


def describe_machine() -> dict[str, Any]:
    """The machine's CPU, core count, memory, OS, Python and library versions, and the date (UTC)."""
    cpu = _cpu()
    memory = _memory_gb()
    return {
        "cpu": cpu["model"],
        "cpu_flags": cpu["flags"],
        "cores": os.cpu_count(),
        "memory_gb": round(memory, 1) if memory else None,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": {name: _version(name) for name in _PACKAGES},
        "code": code_version(),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
