"""The benchmark harness: edgepeft against ORT with an fp32 backbone and PyTorch eager + PEFT, in one run.

    python benchmarks/harness.py [--out DIR] [--batches 1,8,16] [--seqs 64,128] [--steps 20] [--seeds 0,1,2]
                                 [--epochs 2] [--systems edgepeft,ort-fp32,pytorch-peft] [--threads N] [--smoke]

The same as `edgepeft bench`; the code lives in `edgepeft/bench/`. Writes results.json, results.md and
chart.png into --out (default edgepeft-bench/).
"""

from __future__ import annotations

import sys

from edgepeft.cli import main

if __name__ == "__main__":
    main(["bench", *sys.argv[1:]], prog_name="harness.py")
