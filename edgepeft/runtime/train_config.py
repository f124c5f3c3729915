"""`TrainConfig`: how a training run goes (epochs, batches, learning-rate schedule, budgets), validated."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepeft.errors import InputError

SCHEDULES = ("constant", "linear", "cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How to train.

    `schedule` decays the learning rate over the run after `warmup_steps` of linear warm-up.
    `grad_accumulation` batches make one optimizer step, with the gradient of their examples' mean loss (the
    same step as one batch of all their examples). `max_steps` caps the run's optimizer steps;
    `max_seconds` caps one call's wall-clock time, checked after each step, so a call takes at least one and a
    resumed run always moves on. `balanced` draws each epoch's examples with equal weight
    per class (with replacement), for skewed labels. With `memory_budget_mb`, training refuses to start
    when the bundle's memory profile estimates a higher peak, or lowers the batch size to fit if
    `lower_batch_to_fit`. A run stopped by a budget or a cancel request resumes
    where it stopped.
    """

    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-3
    schedule: str = "constant"
    warmup_steps: int = 0
    grad_accumulation: int = 1
    shuffle: bool = True
    balanced: bool = False
    seed: int = 0
    max_steps: int | None = None
    max_seconds: float | None = None
    memory_budget_mb: float | None = None
    lower_batch_to_fit: bool = False

    def __post_init__(self) -> None:
        for name in ("epochs", "batch_size", "grad_accumulation"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}")
        if not self.learning_rate > 0:
            raise InputError(f"`learning_rate` must be positive, got {self.learning_rate}")
        if self.schedule not in SCHEDULES:
            raise InputError(f"`schedule` must be one of {SCHEDULES}, got {self.schedule!r}")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise InputError(f"`seed` must be a non-negative integer, got {self.seed!r}")
        if self.warmup_steps < 0:
            raise InputError(f"`warmup_steps` must be >= 0, got {self.warmup_steps}")
        if self.max_steps is not None and self.max_steps <= 0:
            raise InputError(f"`max_steps` must be positive, got {self.max_steps}")
        if self.memory_budget_mb is not None and not self.memory_budget_mb > 0:
            raise InputError(f"`memory_budget_mb` must be positive, got {self.memory_budget_mb}")
        if self.max_seconds is not None and not self.max_seconds > 0:
            raise InputError(f"`max_seconds` must be positive, got {self.max_seconds}")

    def steps_per_epoch(self, examples: int) -> int:
        batches = -(-examples // self.batch_size)
        return -(-batches // self.grad_accumulation)

    def total_steps(self, examples: int) -> int:
        total = self.steps_per_epoch(examples) * self.epochs
        return min(total, self.max_steps) if self.max_steps else total

    def learning_rate_at(self, step: int, total: int) -> float:
        """Learning rate for optimizer step `step` (0-based) of a run of `total` steps."""
        if step < self.warmup_steps:
            return self.learning_rate * (step + 1) / (self.warmup_steps + 1)
        if self.schedule == "constant":
            return self.learning_rate
        progress = (step - self.warmup_steps) / max(1, total - self.warmup_steps)
        if self.schedule == "linear":
            return self.learning_rate * max(0.0, 1.0 - progress)
        return self.learning_rate * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    def run_identity(self, examples: int, data_sha256: str) -> dict[str, Any]:
        """What defines a run, and so what a resumed run must share with the run it continues: the data (its
        size and fingerprint) and every setting that shapes the steps. Budgets of one call (`max_seconds`,
        the memory budget) are not part of it; the batch size is the one actually trained with."""
        return {
            "examples": examples,
            "data_sha256": data_sha256,
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "grad_accumulation": self.grad_accumulation,
            "learning_rate": self.learning_rate,
            "schedule": self.schedule,
            "warmup_steps": self.warmup_steps,
            "shuffle": self.shuffle,
            "balanced": self.balanced,
            "seed": self.seed,
            "max_steps": self.max_steps,
        }


def fingerprint(*arrays: Mapping[str, np.ndarray] | np.ndarray | None) -> str:
    """sha256 over arrays (or dicts of named arrays): names, dtypes, shapes and bytes. Cheap next to a step."""
    digest = hashlib.sha256()
    for item in arrays:
        named = sorted(item.items()) if isinstance(item, Mapping) else [("", item)]
        for name, array in named:
            if array is None:
                digest.update(b"none;")
                continue
            array = np.ascontiguousarray(array)
            digest.update(f"{name};{array.dtype.str};{array.shape};".encode())
            digest.update(array.tobytes())
    return digest.hexdigest()
