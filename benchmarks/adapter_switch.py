"""Switching the active adapter in an open session against reopening the bundle, on the MiniLM int8 bundle.

    python benchmarks/adapter_switch.py [--switches 50] [--bundle DIR]

Without `--bundle` the host exports one first. The device part runs with torch blocked.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

DEVICE = r"""
import json, sys, tempfile, time
sys.modules["torch"] = None
import numpy as np
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.store import AdapterStore

bundle, switches = sys.argv[1], int(sys.argv[2])
t = time.perf_counter()
session = TrainingSession(bundle)
open_ms = (time.perf_counter() - t) * 1000
store = AdapterStore(tempfile.mkdtemp(), session.manifest)
rng = np.random.default_rng(0)
base = session.trainable_values()
for name in ("alice", "bob"):
    store.save(name, {k: v + rng.normal(scale=0.01, size=v.shape).astype(np.float32) for k, v in base.items()}, steps=0)
module = session._module
texts = ["It is a truth universally acknowledged."]
swap, load_and_swap = [], []
for i in range(switches):
    name = ("alice", "bob")[i % 2]
    t = time.perf_counter(); values = store.load(name); t1 = time.perf_counter()
    session.set_trainable(values); t2 = time.perf_counter()
    session.predict(texts)
    swap.append((t2 - t1) * 1000); load_and_swap.append((t2 - t) * 1000)
assert session._module is module
print(json.dumps({"reopen_bundle_ms": open_ms, "swap_in_memory_ms": float(np.median(swap)),
                  "load_from_store_and_swap_ms": float(np.median(load_and_swap)), "switches": switches}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--switches", type=int, default=50)
    parser.add_argument("--bundle", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            from edgepeft.demo import austen_rows, minilm_path
            from edgepeft.export import ExportOptions, LoraSpec, export

            labels = tuple(sorted({row["label"] for row in austen_rows()}))
            bundle = Path(tmp) / "bundle"
            export(minilm_path(), bundle, lora=LoraSpec(), options=ExportOptions(labels=labels))
        run = subprocess.run([sys.executable, "-c", DEVICE, str(bundle), str(args.switches)],
                             capture_output=True, text=True, check=True)  # fmt: skip
    r = json.loads(run.stdout.strip().splitlines()[-1])
    print("| operation | median ms |")
    print("|---|---|")
    print(f"| open the bundle (what a reload costs) | {r['reopen_bundle_ms']:.0f} |")
    print(f"| load an adapter from the store and swap it in | {r['load_from_store_and_swap_ms']:.1f} |")
    print(f"| swap values already in memory | {r['swap_in_memory_ms']:.1f} |")


if __name__ == "__main__":
    main()
