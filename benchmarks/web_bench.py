"""Web runtime next to the Python runtime in one run: ms per step, peak memory, cold start (issue 13).

Systems: `python` (edgepeft's runtime, onnxruntime-training 1.19.2), `web-node` (edgepeft/web on onnxruntime-web
1.19.2's training WASM under Node, one thread), and with --chromium `web-chromium` (the page in headless Chromium,
cross-origin isolated, its threads; peak memory: the renderer process's peak RSS). Same bundle, data, batch and
steps; the order of examples differs (each runtime shuffles with its own seeded generator). Cold start: process
start to the end of the first training step; in the page, load to a ready session plus train start (the session
rebuilt with the schedule) to the end of the first step.

    PYTHONPATH=. .venv/bin/python benchmarks/web_bench.py --bundle BUNDLE --data train.csv [--steps 20] [--chromium]
"""

from __future__ import annotations

import argparse
import csv
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "edgepeft" / "web"

PYTHON_RUN = """
import json, resource, sys, time
t0 = time.perf_counter()
sys.modules["torch"] = None  # a device has no torch
from edgepeft.runtime import TrainConfig, TrainingSession
session = TrainingSession(sys.argv[1], threads=1)
data = session.load_data(sys.argv[2])
first = []
def on_step(step, total, loss):
    if step == 1:
        first.append(time.perf_counter() - t0)
report = session.train(data, TrainConfig(batch_size=int(sys.argv[3]), max_steps=int(sys.argv[4]), epochs=99,
                                         learning_rate=2e-3), on_step=on_step)
print(json.dumps({"median_step_ms": report.median_step_ms, "cold_start_ms": 1000 * first[0],
                  "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def python_system(bundle: Path, data: Path, batch: int, steps: int) -> dict:
    done = subprocess.run([sys.executable, "-c", PYTHON_RUN, str(bundle), str(data), str(batch), str(steps)],
                          capture_output=True, text=True, check=True)  # fmt: skip
    return json.loads(done.stdout.strip().splitlines()[-1])


def node_system(bundle: Path, data: Path, batch: int, steps: int) -> dict:
    t0 = time.perf_counter()
    done = subprocess.run(["node", str(WEB / "bin" / "edgepeft-web-train.mjs"), "--bundle", str(bundle), "--data",
                           str(data), "--batch-size", str(batch), "--max-steps", str(steps), "--lr", "2e-3",
                           "--threads", "1"], capture_output=True, text=True, check=True)  # fmt: skip
    report = json.loads(done.stdout)
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024  # the largest child so far: this one
    return {"median_step_ms": float(np.median(report["stepMs"][1:] or report["stepMs"])),
            "cold_start_ms": report["coldStartMs"], "peak_rss_mb": max(peak, report["peakRssMb"]),
            "wall_s": time.perf_counter() - t0}  # fmt: skip


def chromium_system(bundle: Path, data: Path, batch: int, steps: int, out: Path) -> dict:
    from edgepeft.webserve import WebApp, serve_in_thread

    server, url = serve_in_thread(WebApp(bundle))
    held_out = out / "held-out.csv"  # a few rows: the page evaluates before and after, which is not timed here
    held_out.parent.mkdir(parents=True, exist_ok=True)
    with open(data, encoding="utf-8", newline="") as f, held_out.open("w", encoding="utf-8", newline="") as g:
        rows = list(csv.reader(f))[:9]
        csv.writer(g).writerows(rows)
    try:
        done = subprocess.run(["node", str(WEB / "test" / "browser_train.mjs"), "--url", url, "--data", str(data),
                               "--eval-data", str(held_out), "--out", str(out), "--max-steps", str(steps),
                               "--batch-size", str(batch), "--lr", "2e-3"], capture_output=True, text=True,
                              check=True)  # fmt: skip
    finally:
        server.shutdown()
        server.server_close()
    report = json.loads(done.stdout)
    result = report["result"]
    return {"median_step_ms": float(np.median(result["stepMs"][1:])),
            "cold_start_ms": result["openMs"] + result["firstStepMs"],
            "peak_rss_mb": (report.get("memory") or {}).get("rendererMb")}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--chromium", action="store_true")
    parser.add_argument("--out", type=Path, default=Path("web-bench"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    # web-node first: its peak memory is read from this process's children's largest RSS, before any other child
    node = node_system(args.bundle, args.data, args.batch_size, args.steps)
    rows = {"python": python_system(args.bundle, args.data, args.batch_size, args.steps), "web-node": node}
    if args.chromium:
        rows["web-chromium"] = chromium_system(args.bundle, args.data, args.batch_size, args.steps, args.out / "dl")
    base = rows["python"]["median_step_ms"]
    for row in rows.values():
        row["step_ms_over_python"] = round(row["median_step_ms"] / base, 2)
    (args.out / "web-bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
