"""The benchmark harness: a smoke run writes JSON, markdown and a PNG for all three systems; bad options fail clearly.

Benchmarks are not timed tests: nothing here asserts a speed, only that every figure was measured.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner
from hypothesis import given
from hypothesis import strategies as st

from edgepeft.bench.config import SYSTEMS, BenchConfig
from edgepeft.bench.flops import BertDims, StepFlops, train_step_flops
from edgepeft.bench.roofline import OPENBLAS_VARIABLES, roofline_seconds, roofline_share
from edgepeft.bench.run import measure_peaks, pool_speed, spawn
from edgepeft.cli import main

POSITIVE = ("step_ms", "step_p90_ms", "samples_per_s", "tokens_per_s", "roofline_share", "peak_rss_mb",
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
    # the frozen weights' matmuls (int8 in the default bundle): all but attention, LoRA and the classifier
    assert 0.9 * step.total < step.frozen < step.total
    # edgepeft's exporter computes the last layer for the first token only: ~14% fewer FLOPs
    first = train_step_flops(dims, 8, 128, rank=8, lora_per_layer=2, classes=6, first_token_last_layer=True,
                             lora_on_keys_values=1)  # fmt: skip
    assert first.total == pytest.approx(0.858 * step.total, rel=2e-3) and first.frozen < step.frozen


def test_roofline_compares_int8_work_with_the_int8_peak():
    # edgepeft at 8 x 128 on an AVX-512 VNNI machine: 36.6 GFLOP int8 of 39.9, measured 41 ms a step
    step = StepFlops(forward=19.9e9, backward=20.0e9, frozen=36.6e9)
    fp32_peak, int8_peak, seconds = 457e9, 4300e9, 0.041
    assert step.total / seconds / fp32_peak > 2  # the old figure: every FLOP at the fp32 peak, over 200%
    roofline = 36.6e9 / int8_peak + 3.3e9 / fp32_peak
    assert roofline_seconds(step, True, fp32_peak, int8_peak) == pytest.approx(roofline)
    assert roofline_share(step, seconds, True, fp32_peak, int8_peak) == pytest.approx(roofline / seconds)
    assert roofline_share(step, seconds, True, fp32_peak, int8_peak) < 1
    # an fp32 system's step: all of it at the fp32 peak; a step at its roofline time is exactly 100%
    assert roofline_seconds(step, False, fp32_peak, int8_peak) == pytest.approx(step.total / fp32_peak)
    assert roofline_share(step, step.total / fp32_peak, False, fp32_peak, int8_peak) == pytest.approx(1.0)


@given(
    frozen=st.floats(0, 1e11), rest=st.floats(1e6, 1e11), fp32_peak=st.floats(1e9, 1e13),
    int8_peak=st.floats(1e9, 1e14), int8_speed=st.floats(1e-3, 1), fp32_speed=st.floats(1e-3, 1),
    overhead=st.floats(0, 10), int8=st.booleans(),
)  # fmt: skip
def test_no_step_passes_its_roofline(frozen, rest, fp32_peak, int8_peak, int8_speed, fp32_speed, overhead, int8):
    """A step whose kernels each run at or below the peak of their precision takes its roofline time or longer."""
    step = StepFlops(forward=(frozen + rest) / 2, backward=(frozen + rest) / 2, frozen=frozen)
    int8_rate = int8_speed * int8_peak if int8 else fp32_speed * fp32_peak  # fp32 systems: frozen work in fp32
    seconds = frozen / int8_rate + rest / (fp32_speed * fp32_peak) + overhead
    assert roofline_share(step, seconds, int8, fp32_peak, int8_peak) <= 1 + 1e-9


def test_peaks_are_measured_without_the_openblas_variables(monkeypatch):
    for name, value in zip(OPENBLAS_VARIABLES, ("Haswell", "1048576")):  # what this platform sets on some CPUs
        monkeypatch.setenv(name, value)
    config = BenchConfig.smoke()
    peaks = measure_peaks(config, lambda label, job, unset=(): spawn(job, unset=unset))
    assert peaks["environment"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    assert peaks["unset_for_peaks"] == {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1048576"}
    assert set(peaks["fp32"]) == {"numpy", "torch", "onnxruntime"}
    assert set(peaks["int8"]) == {"MatMulInteger", "DynamicQuantizeMatMul"}
    assert peaks["fp32_flops_per_s"] == max(peaks["fp32"].values()) > 0
    assert peaks["int8_ops_per_s"] == max(peaks["int8"].values()) > 0
    kernels = [blas for blas in peaks["blas"] if blas["internal_api"] == "openblas"]
    assert kernels and all(blas["architecture"] and blas["num_threads"] == config.threads for blas in kernels)


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
    peaks = results["machine"]["peaks"]
    assert peaks["fp32_flops_per_s"] > 0 and peaks["int8_ops_per_s"] > 0
    assert all(value is None for value in peaks["environment"].values()) and peaks["blas"]
    assert isinstance(results["machine"]["cpu_flags"], list) and results["machine"]["cpu"]
    edgepeft_point = results["systems"]["edgepeft"]["speed"][0]
    assert 0 < edgepeft_point["int8_gflop_per_step"] < edgepeft_point["gflop_per_step"]
    assert results["systems"]["ort-fp32"]["speed"][0]["int8_gflop_per_step"] == 0
    markdown = (out / "results.md").read_text()
    assert all(f"| {name} |" in markdown for name in SYSTEMS) and "x PyTorch" in markdown
    assert "% of roofline" in markdown and "int8" in markdown and "kernel" in markdown
    assert (out / "chart.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_speed_rounds_pool_their_steps():
    rounds = [{"median_ms": 2.0, "times_ms": [1.0, 2.0, 3.0], "peak_rss_mb": 10.0, "torch_loaded": False},
              {"median_ms": 11.0, "times_ms": [10.0, 11.0, 12.0], "peak_rss_mb": 12.0, "torch_loaded": False}]
    pooled = pool_speed(rounds, batch=4, seq=8)
    assert pooled["median_ms"] == 6.5 and pooled["min_ms"] == 1.0 and pooled["steps_timed"] == 6
    assert pooled["round_medians_ms"] == [2.0, 11.0] and pooled["peak_rss_mb"] == 12.0
    assert pooled["samples_per_s"] == pytest.approx(4 / 6.5 * 1000)
