"""Training-step time and peak memory of the MiniLM bundle, int8 backbone against fp32, each in its own process.

    python benchmarks/train_step.py [--steps 30] [--batch 8] [--seq 128] [--out results.json]

The host exports both bundles; each device process (torch blocked) opens one, trains on a fixed batch of
Austen passages padded to `--seq` tokens, and reports the median step time after warm-up and its peak RSS.
This machine is shared and noisy: compare the two rows of one run, not figures across runs.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICE = r"""
import json, sys, time
sys.modules["torch"] = None
import numpy as np
from edgepeft.demo import austen_rows
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.memory import peak_rss_mb

bundle, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
session = TrainingSession(bundle)
rows = austen_rows()[:batch]
features = session.encode([r["text"] * 3 for r in rows])          # long enough to fill `seq` tokens
features = {k: v[:, :seq] for k, v in features.items()}
labels = [r["label"] for r in rows]
data = session.dataset(features, labels)
config = TrainConfig(epochs=1, batch_size=batch, shuffle=False)
session.train(data, config)
first_step = time.perf_counter() - start
for _ in range(2):
    session.train(data, config)
times = [session.train(data, config).step_ms[0] for _ in range(steps)]
print(json.dumps({"median_step_ms": float(np.median(times)), "p90_step_ms": float(np.percentile(times, 90)),
                  "cold_start_to_first_step_s": first_step, "tokens": int(features["input_ids"].size),
                  "peak_rss_mb": peak_rss_mb()}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from edgepeft.demo import austen_rows, minilm_path
    from edgepeft.export import ExportOptions, LoraSpec, export

    labels = tuple(sorted({row["label"] for row in austen_rows()}))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in ("int8", "fp32"):
            bundle = Path(tmp) / quantization
            export(
                minilm_path(), bundle, lora=LoraSpec(), options=ExportOptions(labels=labels, quantization=quantization)
            )
            size = sum(f.stat().st_size for f in bundle.iterdir())
            run = subprocess.run(
                [sys.executable, "-c", DEVICE, str(bundle), str(args.steps), str(args.batch), str(args.seq)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            results[quantization] = {**json.loads(run.stdout.strip().splitlines()[-1]), "bundle_mb": size / 1e6}
    print(f"all-MiniLM-L6-v2, LoRA r=8 query/value + head, batch {args.batch}, seq {args.seq}, {args.steps} steps")
    print("| backbone | median ms/step | p90 ms/step | cold start to 1st step (s) | peak RSS (MB) | bundle (MB) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r['median_step_ms']:.0f} | {r['p90_step_ms']:.0f} | {r['cold_start_to_first_step_s']:.2f} "
            f"| {r['peak_rss_mb']:.0f} | {r['bundle_mb']:.1f} |"
        )
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
