"""Shared pieces of the federation tests: a tiny FFA-LoRA bundle and separable, labelled array data."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def write_blobs(path: Path, rows: int, seed: int) -> Path:
    """Four Gaussian blobs in 16 dimensions (the tiny MLP's input `x`), labels 0..3, as a .npz data file."""
    centers = np.random.default_rng(123).normal(size=(4, 16)) * 1.5
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 4, rows)
    x = (centers[labels] + rng.normal(size=(rows, 16))).astype(np.float32)
    np.savez(path, x=x, labels=labels.astype(np.int64))
    return path
