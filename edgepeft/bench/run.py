"""`run_bench`: export the bundles, run every measurement in its own fresh process, and write the report.

Measurements of different systems are interleaved (each round of the speed grid, then each seed, runs every
system in turn, and the speed rounds rotate who goes first), so slow drifts in the load of a shared machine
spread over all systems instead of one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from edgepeft.bench.config import DESCRIPTIONS, EDGEPEFT, PYTORCH, QUANTIZATION, BenchConfig
from edgepeft.bench.worker import step_figures
from edgepeft.errors import EdgePeftError
from edgepeft.fileio import DirKind, claim_directory, disk_bytes

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
RESULTS = DirKind("a benchmark results directory", ("results.json", "raw.partial.json"), any_marker=True)


def spawn(
    job: dict[str, Any], env: dict[str, str] | None = None, timeout: float = 7200, unset: tuple[str, ...] = ()
) -> dict[str, Any]:
    """Run one measurement in a fresh `python -m edgepeft.bench.worker` process; return its JSON figures.

    `env` is added to this process's environment for it, and the variables named in `unset` are removed.
    """
    env = worker_environment(env, unset)
    who = job.get("system") or job.get("library", "")
    job = {**job, "spawned": time.time()}
    try:
        run = subprocess.run([sys.executable, "-m", "edgepeft.bench.worker", json.dumps(job)],
                             capture_output=True, text=True, env=env, timeout=timeout, check=False)  # fmt: skip
    except subprocess.TimeoutExpired:
        raise EdgePeftError(
            f"benchmark worker {who} {job['task']} ran over {timeout:.0f} s"
        ) from None
    if run.returncode != 0:
        last = (run.stderr.strip().splitlines() or ["no error output"])[-1]
        raise EdgePeftError(f"benchmark worker {who} {job['task']} failed: {last}")
    return device_checked(job, json.loads(run.stdout.strip().splitlines()[-1]))


def worker_environment(env: dict[str, str] | None = None, unset: tuple[str, ...] = ()) -> dict[str, str]:
    """A worker process's environment: this one's, offline, without tokenizers' fork warning, plus `env`, less
    the variables named in `unset`."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **(env or {})}
    return {name: value for name, value in env.items() if name not in unset}


def device_checked(job: dict[str, Any], result: dict[str, Any]) -> dict[str, Any]:
    """`result`, refused if an ONNX Runtime system's worker loaded torch (a device has none)."""
    if QUANTIZATION.get(job.get("system")) is not None and result["torch_loaded"]:
        raise EdgePeftError(f"the {job['system']} worker loaded torch: its figures would not be a device's")
    return result


def pool_speed(rounds: list[dict[str, Any]], batch: int, seq: int) -> dict[str, Any]:
    """One grid point's figures from the speed processes of every round: their timed steps pooled."""
    times = [t for figures in rounds for t in figures["times_ms"]]
    return {**step_figures(times, batch, seq), "round_medians_ms": [figures["median_ms"] for figures in rounds],
            "peak_rss_mb": max(figures["peak_rss_mb"] for figures in rounds),
            "torch_loaded": any(figures["torch_loaded"] for figures in rounds)}  # fmt: skip


def _export_bundles(config: BenchConfig, labels: tuple[str, ...], work: Path, progress: Progress) -> dict[str, Path]:
    """The default (int8) bundle always, to read the optimizer PyTorch must match; fp32 when measured."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # not the expected "classifier newly initialized" warning
    try:
        return _export_each(config, labels, work, progress)
    finally:
        transformers.logging.set_verbosity(verbosity)


def _export_each(config: BenchConfig, labels: tuple[str, ...], work: Path, progress: Progress) -> dict[str, Path]:
    from edgepeft.demo import minilm_path
    from edgepeft.export import ExportOptions, export

    bundles = {}
    for system, quantization in QUANTIZATION.items():
        if quantization is None or (system not in config.systems and system != EDGEPEFT):
            continue
        progress(f"exporting the {quantization} bundle for {system} ...")
        options = ExportOptions(labels=labels, quantization=quantization, max_length=config.max_length)
        export(minilm_path(), work / system, lora=_lora_spec(), options=options)
        bundles[system] = work / system
    return bundles


def _jobs_base(config: BenchConfig, bundles: dict[str, Path], labels: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """The per-system part of every job: which model to open, and PyTorch's matching settings."""
    from edgepeft.bench.optimizer import bundle_adamw
    from edgepeft.demo import minilm_path
    from edgepeft.export import ExportOptions

    common = {"threads": config.threads, "classes": len(labels), "input_seed": config.input_seed,
              "learning_rate": config.learning_rate}  # fmt: skip
    base = {}
    for system in config.systems:
        if system == PYTORCH:
            lora = dataclasses.asdict(_lora_spec())
            lora["target_modules"] = list(lora["target_modules"])
            torch_args = {"labels": list(labels), "lora": lora, "adamw": bundle_adamw(bundles[EDGEPEFT]),
                          "init_seed": ExportOptions().seed, "max_length": config.max_length}  # fmt: skip
            base[system] = {**common, "system": system, "model": str(minilm_path()), "torch": torch_args}
        else:
            base[system] = {**common, "system": system, "model": str(bundles[system])}
    return base


def _lora_spec():
    """The LoRA spec every system trains with: r=8 on MiniLM's query and value, as the demo."""
    from edgepeft.export import LoraSpec
    from edgepeft.export.transformers_models import BERT_LIKE_TARGETS

    return LoraSpec(target_modules=BERT_LIKE_TARGETS)


def _model_description() -> tuple[dict[str, int], dict[str, Any]]:
    """The base model's dimensions (for FLOP counts) and the LoRA spec every system trains with."""
    from edgepeft.bench.flops import BertDims
    from edgepeft.demo import minilm_path
    spec = _lora_spec()
    targets = list(spec.target_modules)
    lora = {"r": spec.r, "alpha": spec.alpha, "dropout": spec.dropout, "target_modules": targets,
            "per_layer": len(targets)}  # fmt: skip
    return dataclasses.asdict(BertDims.from_config(minilm_path())), lora


def measure_peaks(config: BenchConfig, run: Callable[..., dict[str, Any]]) -> dict[str, Any]:
    """The fp32 and int8 matmul peaks: one process per library, each without the OpenBLAS variables."""
    from edgepeft.bench.peak import LIBRARIES
    from edgepeft.bench.roofline import OPENBLAS_VARIABLES, PEAK_SIZE, combine_peaks

    measured = []
    for library in LIBRARIES:
        job = {"task": "peak", "library": library, "size": PEAK_SIZE, "seconds": config.matmul_seconds,
               "threads": config.threads}  # fmt: skip
        measured.append(run(f"matmul peak, {library}", job, unset=OPENBLAS_VARIABLES))
    return combine_peaks(measured, PEAK_SIZE, config.threads)


def measure(config: BenchConfig, work: Path, progress: Progress, partial: Path | None = None) -> dict[str, Any]:
    """Every measurement of the run, raw: {system: {task: figures}} plus the machine's matmul peaks.

    With `partial`, the figures so far are written there after every measurement (for a run that dies).
    """
    from edgepeft.bench.workload import austen_split

    train_csv, test_csv, labels = austen_split(work / "data", config.data_seed, config.train_rows, config.test_rows)
    bundles = _export_bundles(config, labels, work / "bundles", progress)
    base = _jobs_base(config, bundles, labels)
    raw: dict[str, Any] = {"systems": {s: {"speed": [], "accuracy": {}} for s in config.systems}}

    def run(label: str, job: dict[str, Any], unset: tuple[str, ...] = ()) -> dict[str, Any]:
        if partial is not None:  # everything measured so far, before the next measurement starts
            partial.write_text(json.dumps({**raw, "next": label}, indent=2) + "\n")
        started = time.perf_counter()
        result = spawn(job, config.torch_env if job.get("system") == PYTORCH else None, unset=unset)
        progress(f"{label}: {time.perf_counter() - started:.1f} s")
        return result

    raw["peaks"] = measure_peaks(config, run)
    rounds: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for r in range(config.rounds):
        shift = r % len(config.systems)  # who goes first rotates: a noisy minute does not land on one system
        for batch, seq in config.grid:
            for system in config.systems[shift:] + config.systems[:shift]:
                job = {**base[system], "task": "speed", "batch": batch, "seq": seq, "steps": config.steps,
                       "warmup": config.warmup}  # fmt: skip
                figures = run(f"speed {system} {batch} x {seq}, round {r + 1} of {config.rounds}", job)
                rounds.setdefault((system, batch, seq), []).append(figures)
    for batch, seq in config.grid:
        for system in config.systems:
            pooled = pool_speed(rounds[system, batch, seq], batch, seq)
            raw["systems"][system]["speed"].append({"batch": batch, "seq": seq, **pooled})
    batch, seq = config.headline
    for task in ("cold_train", "cold_predict", "latency"):
        for system in config.systems:
            job = {**base[system], "task": task, "batch": batch, "seq": seq, "warmup": config.warmup,
                   "predictions": config.predictions}  # fmt: skip
            raw["systems"][system][task] = run(f"{task} {system}", job)
    for seed in config.seeds:
        for system in config.systems:
            job = {**base[system], "task": "accuracy", "seed": seed, "train_csv": str(train_csv),
                   "test_csv": str(test_csv), "epochs": config.epochs, "batch_size": config.batch_size,
                   "max_steps": config.max_steps}  # fmt: skip
            raw["systems"][system]["accuracy"][seed] = run(f"accuracy {system} seed {seed}", job)
    raw["test_examples"] = sum(1 for _ in test_csv.open(encoding="utf-8")) - 1
    raw["train_examples"] = sum(1 for _ in train_csv.open(encoding="utf-8")) - 1
    raw["labels"] = list(labels)
    raw["model_dims"], raw["lora"] = _model_description()
    raw["adamw"] = base[PYTORCH]["torch"]["adamw"] if PYTORCH in base else None
    raw["bundle_bytes"] = {s: disk_bytes(bundles[s]) for s in config.systems if s in bundles}
    if PYTORCH in config.systems:
        from edgepeft.demo import minilm_path

        raw["bundle_bytes"][PYTORCH] = disk_bytes(minilm_path() / "model.safetensors")
    return raw


def run_bench(config: BenchConfig, out: str | os.PathLike, command: str = "", progress: Progress | None = None) -> dict:
    """Measure every system of `config`, write results.json, results.md and chart.png into `out`; return the results.

    Raises:
        EdgePeftError: a worker failed (its last error line is in the message).
        OutputError: `out` is a file, or a non-empty directory that is not a benchmark results directory.
    """
    from edgepeft.bench.chart import write_chart
    from edgepeft.bench.machine import describe_machine
    from edgepeft.bench.report import summarize, write_json, write_markdown

    say = progress or logger.info
    out = claim_directory(out, RESULTS)
    machine = describe_machine()  # before measuring: the commit and date the run starts from
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="edgepeft-bench-") as tmp:
        raw = measure(config, Path(tmp), say, partial=out / "raw.partial.json")
    (out / "raw.partial.json").unlink(missing_ok=True)
    results = summarize(config, raw, machine, command, time.time() - started, DESCRIPTIONS)
    write_json(results, out / "results.json")
    write_markdown(results, out / "results.md", chart="chart.png")
    write_chart(results, out / "chart.png")
    say(f"wrote {out / 'results.json'}, {out / 'results.md'} and {out / 'chart.png'}")
    return results
