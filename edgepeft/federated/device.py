"""The device side of a federated round: open the bundle with the runtime, train on the local partition.

Torch-free: this module imports only the runtime (numpy + ONNX Runtime's training API). A process keeps its
bundle session and data between messages (Ray's workers and a SuperNode's app process serve many rounds).
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from edgepeft.runtime.ort import training_api

training_api()  # before anything imports onnxruntime: its ORTModule probe would load torch

from edgepeft.errors import InputError  # noqa: E402
from edgepeft.federated.partition import dirichlet_partition  # noqa: E402
from edgepeft.federated.settings import FedSettings  # noqa: E402
from edgepeft.runtime import Dataset, TrainConfig, TrainingSession  # noqa: E402

logger = logging.getLogger(__name__)


def assert_torch_free() -> None:
    """Refuse to run the device side in a process that has imported torch (a device has none)."""
    if sys.modules.get("torch") is not None:  # None: blocked, as on a device
        raise RuntimeError("torch is loaded in the device process: the federated client must run torch-free")


@dataclass
class LocalResult:
    values: dict[str, np.ndarray]
    examples: int
    loss: float
    seconds: float


@lru_cache(maxsize=2)
def _session(bundle: str, threads: int) -> TrainingSession:
    return TrainingSession(bundle, threads=threads)


@lru_cache(maxsize=4)
def _data(bundle: str, path: str, threads: int) -> Dataset:
    return _session(bundle, threads).load_data(path)


@lru_cache(maxsize=4)
def _parts(bundle: str, path: str, threads: int, clients: int, alpha: float, seed: int) -> tuple[np.ndarray, ...]:
    labels = _data(bundle, path, threads).labels
    return tuple(dirichlet_partition(labels, clients, alpha, seed))


def local_data(settings: FedSettings, partition: int) -> Dataset:
    """This client's partition of the training data."""
    if not 0 <= partition < settings.num_partitions:
        raise InputError(f"partition-id {partition} is outside 0..{settings.num_partitions - 1}")
    data = _data(settings.bundle, settings.train_data, settings.threads)
    index = _parts(settings.bundle, settings.train_data, settings.threads, settings.num_partitions,
                   settings.alpha, settings.partition_seed)[partition]  # fmt: skip
    return data.take(index)


def session(settings: FedSettings) -> TrainingSession:
    assert_torch_free()
    return _session(settings.bundle, settings.threads)


def train_round(settings: FedSettings, partition: int, values: dict[str, np.ndarray], server_round: int) -> LocalResult:
    """Start from the global adapter `values`, train on the local partition with the runtime's budgets."""
    s = session(settings)
    data = local_data(settings, partition)
    s.set_trainable(values)
    config = TrainConfig(
        epochs=settings.local_epochs, batch_size=settings.batch_size, learning_rate=settings.learning_rate,
        max_steps=settings.max_steps or None, seed=settings.seed * 100003 + server_round * 1009 + partition,
    )  # fmt: skip
    started = time.perf_counter()
    report = s.train(data, config)
    if report.stopped == "non_finite":
        raise RuntimeError(f"client {partition}: training diverged (non-finite loss) in round {server_round}")
    loss = float(report.epoch_losses[-1]) if report.epoch_losses else float("nan")
    return LocalResult(s.trainable_values(), len(data), loss, time.perf_counter() - started)


def evaluate_local(settings: FedSettings, partition: int, values: dict[str, np.ndarray]) -> tuple[int, float, float]:
    """(examples, loss, accuracy) of the global adapter on this client's partition."""
    s = session(settings)
    data = local_data(settings, partition)
    s.set_trainable(values)
    report = s.evaluate(data, batch_size=max(settings.batch_size, 32))
    return len(data), float(report.loss), float(report.accuracy if report.accuracy is not None else float("nan"))
