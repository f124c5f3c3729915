"""Peak-memory estimates for a training step, from a profile measured when the bundle was exported.

The exporter trains the bundle for one step at a few increasing sizes in a fresh device process (torch
blocked) and records peak RSS after each. A line `base + per_token * batch * length` through those points,
with a safety margin, gives an estimate for any batch size and sequence length, which lets the runtime
refuse a batch that would not fit a memory budget, or lower it, before training starts.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import numpy as np

from edgepeft.errors import InputError
from edgepeft.manifest import Manifest

PROFILE_KEY = "memory_profile"
MARGIN = 1.15


def peak_rss_mb() -> float:
    """This process's peak resident memory in MB.

    Linux's `ru_maxrss` survives exec: a child started from a large parent (a host that just ran torch)
    reports the parent's peak. `VmHWM` belongs to the process's own address space, so it is read first.
    """
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def profile_sizes(manifest: Manifest) -> list[tuple[int, int]]:
    """(batch, length) points to measure, smallest first; length is 1 for models without a sequence axis."""
    if sequence_axis(manifest) is None:
        return [(1, 1), (8, 1), (32, 1)]
    top = manifest.max_length or 128
    if manifest.task is not None:  # a language model: one block at a time is its usual step, and 8 x 256 of
        return [(1, max(8, top // 4)), (1, max(8, top // 2)), (2, top)]  # SmolLM2 would take a minute
    return [(1, max(8, top // 8)), (4, max(8, top // 2)), (8, top)]


def sequence_axis(manifest: Manifest) -> str | None:
    """The name of the dynamic sequence dimension of the inputs, if there is one."""
    for spec in manifest.inputs:
        if len(spec.shape) >= 2 and isinstance(spec.shape[1], str):
            return spec.shape[1]
    return None


def fit_profile(points: list[tuple[int, int, float]]) -> dict[str, float]:
    """Least-squares line through the measured points: peak MB = base + per_token * batch * length."""
    tokens = np.array([b * max(s, 1) for b, s, _ in points], dtype=float)
    peaks = np.array([mb for _, _, mb in points], dtype=float)
    slope, base = np.polyfit(tokens, peaks, 1) if len(set(tokens)) > 1 else (0.0, peaks.max())
    return {"base_mb": float(base), "per_token_mb": float(max(slope, 0.0))}


def estimate_peak_mb(manifest: Manifest, batch: int, length: int) -> float:
    """Estimated peak RSS in MB of a device process training `batch` examples of `length` tokens.

    ORT's arena grows in steps, so the fitted line carries a safety margin of `MARGIN`.
    """
    profile = manifest.stats.get(PROFILE_KEY)
    if not isinstance(profile, dict):
        raise InputError("this bundle carries no memory profile: export it with ExportOptions(profile_memory=True)")
    return MARGIN * (profile["base_mb"] + profile["per_token_mb"] * batch * max(length, 1))


def largest_batch_within(manifest: Manifest, budget_mb: float, batch: int, length: int) -> int:
    """The largest batch size <= `batch` whose estimate fits `budget_mb`, or 0 if none does."""
    for size in range(batch, 0, -1):
        if estimate_peak_mb(manifest, size, length) <= budget_mb:
            return size
    return 0


# Run as a script by the exporter: `python -m edgepeft.runtime.memory BUNDLE` prints the measured points.
def _measure(bundle: str) -> list[tuple[int, int, float]]:
    sys.modules["torch"] = None  # type: ignore[assignment]  # measure the device process, not the host's
    from edgepeft.runtime.session import TrainingSession

    session = TrainingSession(bundle)
    manifest = session.manifest
    points = []
    for batch, length in profile_sizes(manifest):
        features = {}
        for spec in manifest.inputs:
            shape = [batch if i == 0 else (length if isinstance(d, str) else d) for i, d in enumerate(spec.shape)]
            features[spec.name] = np.ones(shape, dtype=spec.dtype)
        if manifest.task is not None:  # next-token labels: one per position (the token ids themselves)
            labels = np.ones((batch, length), dtype=manifest.label.dtype)
        else:
            labels = session._dummy_labels(session.dataset(features))
        session._module.train()
        for _ in range(2):
            session._module(*[features[s.name] for s in manifest.inputs], labels)
            session._optimizer.step()
            session._module.lazy_reset_grad()
        points.append((batch, length, peak_rss_mb()))
    return points


if __name__ == "__main__":
    print(json.dumps(_measure(str(Path(sys.argv[1])))))
