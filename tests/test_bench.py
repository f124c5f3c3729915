"""The benchmark harness: a smoke run writes JSON, markdown and a PNG for all three systems; bad options fail clearly.

Benchmarks are not timed tests: nothing here asserts a speed, only that every figure was measured.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from edgepeft.bench.config import SYSTEMS
from edgepeft.bench.flops import BertDims, train_step_flops
from edgepeft.bench.run import pool_speed
from edgepeft.cli import main

POSITIVE = ("step_ms", "step_p90_ms", "samples_per_s", "tokens_per_s", "flops_fraction", "peak_rss_mb",
            "cold_start_train_s", "cold_start_predict_s", "latency_ms", "bundle_mb", "adapter_kb", "accuracy_steps",
            "accuracy_peak_rss_mb")  # fmt: skip


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_help(runner):
    result = runner.invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    assert "main bench" in result.output
    for option in ("--out", "--batches", "--seqs", "--steps", "--seeds", "--epochs", "--systems", "--smoke"):
        assert option in result.output


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--systems", "edgepeft,tensorflow"],
            "unknown system 'tensorflow': choose from edgepeft, ort-fp32, pytorch-peft",
        ),
        (["--batches", "8,x"], "--batches must be comma-separated integers, got '8,x'"),
        (["--seqs", "512"], "sequence length 512 exceeds the bundle's max_length 128"),
        (["--steps", "0"], "--steps must be a positive integer, got 0"),
        (["--smoke", "--seeds", "-1"], "--seeds must be a non-empty list of non-negative integers"),
    ],
)
def test_bad_options_are_one_line(runner, tmp_path, args, message):
    result = runner.invoke(main, ["bench", "--out", str(tmp_path / "out"), *args])
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: ")
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_flop_count_of_a_minilm_step(minilm_dir):
    dims = BertDims.from_config(minilm_dir)
    assert dims == BertDims(layers=6, hidden=384, intermediate=1536, heads=12)
    step = train_step_flops(dims, 8, 128, rank=8, lora_per_layer=2, classes=6)
    assert step.forward == pytest.approx(23.10e9, rel=1e-3)  # projections and FFN dominate: 6 x 3.62 GFLOP
    # input gradients of frozen weights (1x), attention (2x), LoRA (2x); layer 0 skips the Q, K, V input gradients
    assert 0.95 * step.forward < step.backward < 1.1 * step.forward
    higher = train_step_flops(dims, 8, 128, rank=8, lora_per_layer=2, classes=6, lowest_trainable=3)
    assert higher.forward == step.forward and higher.backward < 0.6 * step.backward


def test_smoke_run_measures_every_system(runner, tmp_path):
    out = tmp_path / "bench"
    result = runner.invoke(main, ["bench", "--smoke", "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert set(results["systems"]) == set(SYSTEMS)
    for name, figures in results["systems"].items():
        for key in POSITIVE:
            assert math.isfinite(figures[key]) and figures[key] > 0, (name, key, figures[key])
        assert 0.0 <= figures["accuracy_mean"] <= 1.0
        assert figures["torch_loaded"] == (name == "pytorch-peft")
        point = figures["speed"][0]
        assert (point["batch"], point["seq"]) == (2, 16) and point["gflop_per_step"] > 0
        assert point["steps_timed"] == 2 * 3 and len(point["round_medians_ms"]) == 2  # two rounds of 3 steps
    assert results["ratios"]["pytorch-peft"]["step_ms"] == 1.0
    assert all(math.isfinite(v) for r in results["ratios"].values() for v in r.values())
    assert results["machine"]["matmul_flops_per_s"] > 0
    markdown = (out / "results.md").read_text()
    assert all(f"| {name} |" in markdown for name in SYSTEMS) and "x PyTorch" in markdown
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_rounds_pool_their_steps():
    rounds = [{"median_ms": 2.0, "times_ms": [1.0, 2.0, 3.0], "peak_rss_mb": 10.0, "torch_loaded": False},
              {"median_ms": 11.0, "times_ms": [10.0, 11.0, 12.0], "peak_rss_mb": 12.0, "torch_loaded": False}]
    pooled = pool_speed(rounds, batch=4, seq=8)
    assert pooled["median_ms"] == 6.5 and pooled["min_ms"] == 1.0 and pooled["steps_timed"] == 6
    assert pooled["round_medians_ms"] == [2.0, 11.0] and pooled["peak_rss_mb"] == 12.0
    assert pooled["samples_per_s"] == pytest.approx(4 / 6.5 * 1000)
