"""Training step time of several causal LM bundles, side by side in one process, steps interleaved.

    python benchmarks/lm_step_compare.py --steps 12 BUNDLE [BUNDLE ...]

Each bundle gets a `TrainingSession` (torch blocked, 2 threads) on one fixed random block of the bundle's
max_length; the sessions take one training step each in turn, so load from elsewhere slows them alike. Prints
each bundle's median ms per step (the first round left out) and its ratio to the first bundle's.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundles", nargs="+")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    sys.modules["torch"] = None  # type: ignore[assignment]  # a device has no torch
    import numpy as np

    from edgepeft.runtime import TrainConfig, TrainingSession

    sessions = [TrainingSession(b, threads=args.threads) for b in args.bundles]
    length = sessions[0].manifest.task.max_length
    ids = np.random.default_rng(0).integers(0, 10_000, (1, length)).astype(np.int64)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(length)[None]}
    data = [s.dataset({i.name: features[i.name] for i in s.manifest.inputs}, ids) for s in sessions]
    times: list[list[float]] = [[] for _ in sessions]
    for step in range(args.steps + 1):
        for k, (session, batch) in enumerate(zip(sessions, data)):
            start = time.perf_counter()
            session.train(batch, TrainConfig(batch_size=1, max_steps=1))
            if step:
                times[k].append((time.perf_counter() - start) * 1e3)
    first = statistics.median(times[0])
    for bundle, t in zip(args.bundles, times):
        print(f"{bundle}: median {statistics.median(t):.0f} ms a step ({statistics.median(t) / first:.3f}x the first)")


if __name__ == "__main__":
    main()
