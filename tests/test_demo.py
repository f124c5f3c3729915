"""The README's demo, run as a user runs it: real MiniLM, int8 backbone, trained on the device (~10 min)."""

from __future__ import annotations

import json
import subprocess
import sys


def test_demo_reaches_the_promised_figures(tmp_path):
    report = tmp_path / "demo.json"
    run = subprocess.run(
        [sys.executable, "-m", "edgepeft.cli", "demo", "--out", str(tmp_path / "demo"), "--report", str(report)],
        capture_output=True,
        text=True,
        timeout=3000,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    figures = json.loads(report.read_text())
    assert figures["test_examples"] == 480
    assert figures["test_accuracy_before"] < 0.35  # an untrained head: near chance (1/6)
    assert figures["test_accuracy_after"] >= 0.70
    assert figures["bundle_int8_over_fp32"] <= 0.30
    assert figures["adapter_kb"] < 1000
    assert figures["device_torch_loaded"] is False
    assert figures["median_step_ms"] > 0 and figures["device_peak_rss_mb"] > 0
