"""Time MiniLM's export with the code of two checkouts, interleaved, and compare the bundles' graphs.

    python benchmarks/export_time.py OLD_TREE NEW_TREE [--rounds 3]

Each export runs in its own process with PYTHONPATH at that tree; prints every time, the medians and whether
the training, eval, optimizer and inference graphs and the checkpoint are byte-identical.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ONE = """
import sys, time
from pathlib import Path
from edgepeft.demo import minilm_path
from edgepeft.export import ExportOptions, LoraSpec, export
labels = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")
start = time.perf_counter()
export(minilm_path(), Path(sys.argv[1]), lora=LoraSpec(target_modules=("query", "value")),
       options=ExportOptions(labels=labels))
print(time.perf_counter() - start)
"""
FILES = ("training_model.onnx", "eval_model.onnx", "optimizer_model.onnx", "inference.onnx", "checkpoint")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("trees", nargs=2, type=Path)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="export-time-"))
    times: dict[Path, list[float]] = {tree: [] for tree in args.trees}
    for round_ in range(args.rounds):
        for tree in args.trees:
            out = work / f"{tree.name}-{round_}"
            env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "HF_HUB_OFFLINE": "1"}
            run = subprocess.run([sys.executable, "-c", ONE, str(out)], env=env, capture_output=True, text=True,
                                 check=True)  # fmt: skip
            times[tree].append(float(run.stdout.strip().splitlines()[-1]))
            print(f"{tree}: {times[tree][-1]:.2f} s", flush=True)
    old, new = args.trees
    for tree in args.trees:
        print(f"{tree}: median {statistics.median(times[tree]):.2f} s")
    print(f"new / old: {statistics.median(times[new]) / statistics.median(times[old]):.2f}")
    same = [f for f in FILES if filecmp.cmp(work / f"{old.name}-0" / f, work / f"{new.name}-0" / f, shallow=False)]
    print(f"byte-identical: {', '.join(same) or 'none'}; differ: {', '.join(set(FILES) - set(same)) or 'none'}")


if __name__ == "__main__":
    main()
