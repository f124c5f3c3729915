"""edgepeft's runtime as a benchmarked system, through the public `TrainingSession` API only (no torch)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.runtime import TrainConfig, TrainingSession


class OrtSystem:
    """A bundle opened for training; one step is one `TrainingSession.train` call on a one-batch dataset."""

    def __init__(self, bundle: str | os.PathLike, threads: int):
        self.session = TrainingSession(bundle, threads=threads)
        self._inputs = [spec.name for spec in self.session.manifest.inputs]

    def _features(self, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: features[name] for name in self._inputs}

    def step_function(
        self, features: dict[str, np.ndarray], labels: np.ndarray, learning_rate: float
    ) -> Callable[[], Any]:
        """A function that takes one optimizer step on this fixed batch."""
        data = self.session.dataset(self._features(features), labels)
        config = TrainConfig(epochs=1, batch_size=len(labels), learning_rate=learning_rate, shuffle=False)
        return lambda: self.session.train(data, config)

    def predict(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities for a batch of arrays."""
        return self.session.predict(self._features(features)).probabilities

    def fit_and_evaluate(
        self, train_csv: Path, test_csv: Path, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        max_steps: int | None,
    ) -> dict[str, Any]:  # fmt: skip
        """Train on a CSV with the runtime's own loader and loop, then evaluate on the test CSV."""
        train = self.session.load_data(train_csv)
        test = self.session.load_data(test_csv)
        config = TrainConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, seed=seed,
                             max_steps=max_steps)  # fmt: skip
        report = self.session.train(train, config)
        result = self.session.evaluate(test, batch_size=batch_size)
        last_loss = report.epoch_losses[-1] if report.epoch_losses else None
        return {"accuracy": result.accuracy, "test_loss": result.loss, "steps": report.steps,
                "train_seconds": report.seconds, "last_epoch_loss": last_loss}  # fmt: skip

    def save_adapter(self, directory: Path) -> Path:
        """Write the trained adapter (PEFT format) with `TrainingSession.save_adapter`."""
        self.session.save_adapter(directory)
        return directory
