"""One measurement in a fresh process: `python -m edgepeft.bench.worker JOB_JSON` prints one JSON line.

A job names a `task` (speed, cold_train, cold_predict, latency, accuracy, peak; lm_train, lm_generate,
lm_perplexity, lm_teacher_forced in `edgepeft.bench.lm_worker`) and, for all but peak,
a `system`; a peak job names a `library` (`edgepeft.bench.peak.LIBRARIES`). Every process but PyTorch's
and torch's peak blocks torch (`sys.modules["torch"] = None`) before it imports anything that could load
it, as a device would have none; peak memory is this process's own VmHWM.
Cold starts are measured from `spawned`, the parent's `time.time()` just before it started this process.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from typing import Any

from edgepeft.bench.config import PYTORCH, QUANTIZATION


def _open(job: dict[str, Any]):
    if job["system"] == PYTORCH:
        from edgepeft.bench.torch_system import TorchSystem

        return TorchSystem(job["model"], job["threads"], **job["torch"])
    from edgepeft.bench.ort_system import OrtSystem

    return OrtSystem(job["model"], job["threads"])


def _fixed(job: dict[str, Any], batch: int, seq: int):
    from edgepeft.bench.workload import fixed_batch

    return fixed_batch(batch, seq, job["input_seed"], job["classes"])


def _speed(job: dict[str, Any]) -> dict[str, Any]:
    """Median and p90 ms per training step on one fixed batch, after warm-up steps that are discarded."""

    batch, seq = job["batch"], job["seq"]
    system = _open(job)
    step = system.step_function(*_fixed(job, batch, seq), job["learning_rate"])
    times = timed_ms(step, job["warmup"], job["steps"])
    return {**step_figures(times, batch, seq), "times_ms": times}


def timed_ms(call: Callable[[], Any], warmup: int, count: int) -> list[float]:
    """ms of each of `count` calls, after `warmup` calls that are discarded."""
    for _ in range(warmup):
        call()
    times = []
    for _ in range(count):
        start = time.perf_counter()
        call()
        times.append((time.perf_counter() - start) * 1000)
    return times


def step_figures(times: list[float], batch: int, seq: int) -> dict[str, Any]:
    """Median, p90 and min ms, samples/s and tokens/s of timed training steps."""
    import numpy as np

    median = float(np.median(times))
    return {"median_ms": median, "p90_ms": float(np.percentile(times, 90)), "min_ms": min(times),
            "samples_per_s": batch / median * 1000, "tokens_per_s": batch * seq / median * 1000,
            "steps_timed": len(times)}  # fmt: skip


def _cold_train(job: dict[str, Any]) -> dict[str, Any]:
    """Process start (the parent's clock before spawning) to the first training step done."""
    system = _open(job)
    ready = time.time() - job["spawned"]
    system.step_function(*_fixed(job, job["batch"], job["seq"]), job["learning_rate"])()
    return {"seconds": time.time() - job["spawned"], "ready_seconds": ready}


def _cold_predict(job: dict[str, Any]) -> dict[str, Any]:
    """Process start to the first one-sample prediction done."""
    system = _open(job)
    ready = time.time() - job["spawned"]
    system.predict(_fixed(job, 1, job["seq"])[0])
    return {"seconds": time.time() - job["spawned"], "ready_seconds": ready}


def _latency(job: dict[str, Any]) -> dict[str, Any]:
    """Median and p90 ms of one-sample predictions after warm-up."""
    import numpy as np

    system = _open(job)
    features = _fixed(job, 1, job["seq"])[0]
    times = timed_ms(lambda: system.predict(features), job["warmup"], job["predictions"])
    return {"median_ms": float(np.median(times)), "p90_ms": float(np.percentile(times, 90))}


def _accuracy(job: dict[str, Any]) -> dict[str, Any]:
    """Train for the configured epochs on the Austen training split, evaluate on the test split, save the adapter."""
    import tempfile
    from pathlib import Path

    system = _open(job)
    result = system.fit_and_evaluate(
        Path(job["train_csv"]), Path(job["test_csv"]), epochs=job["epochs"], batch_size=job["batch_size"],
        learning_rate=job["learning_rate"], seed=job["seed"], max_steps=job["max_steps"],
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        adapter = system.save_adapter(Path(tmp) / "adapter")
        result["adapter_bytes"] = sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file())
    return result


def _peak(job: dict[str, Any]) -> dict[str, Any]:
    """One library's sustained matmul rates (`edgepeft.bench.peak`)."""
    from edgepeft.bench.peak import LIBRARIES

    return LIBRARIES[job["library"]](job["size"], job["seconds"], job["threads"])


def _lm(name: str):
    def run(job: dict[str, Any]) -> dict[str, Any]:
        from edgepeft.bench import lm_worker

        return getattr(lm_worker, name)(job)

    return run


TASKS = {"speed": _speed, "cold_train": _cold_train, "cold_predict": _cold_predict, "latency": _latency,
         "accuracy": _accuracy, "peak": _peak, **{name: _lm(name) for name in ("lm_train", "lm_generate",
                                                                               "lm_perplexity", "lm_teacher_forced")}}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Run the job given as JSON in the first argument; print its figures as one JSON line."""
    job = json.loads((argv if argv is not None else sys.argv[1:])[0])
    if QUANTIZATION.get(job.get("system")) is not None or (job["task"] == "peak" and job["library"] != "torch"):
        sys.modules["torch"] = None  # type: ignore[assignment]  # a device has no torch: fail loudly if imported
    result = TASKS[job["task"]](job)
    from edgepeft.runtime.memory import peak_rss_mb

    result["peak_rss_mb"] = peak_rss_mb()
    result["torch_loaded"] = sys.modules.get("torch") is not None
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
