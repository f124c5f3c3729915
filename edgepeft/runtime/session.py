"""`TrainingSession`: train, evaluate and predict with a bundle through ONNX Runtime's training API."""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgepeft import manifest as mf
from edgepeft.errors import BundleError, InputError
from edgepeft.fileio import atomic_directory
from edgepeft.runtime.adapter import load_adapter, save_adapter
from edgepeft.runtime.bundle import Bundle, open_bundle
from edgepeft.runtime.data import Dataset, batches, check_features, check_labels, encode_labels, read_text_file
from edgepeft.runtime.ort import training_api

logger = logging.getLogger(__name__)

STATE_CHECKPOINT = "checkpoint"
STATE_PROGRESS = "progress.json"


@dataclass(frozen=True)
class TrainConfig:
    """How to train: epochs, batch size, learning rate, shuffling and its seed."""

    epochs: int = 1
    batch_size: int = 8
    learning_rate: float = 1e-3
    shuffle: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise InputError(f"`epochs` must be positive, got {self.epochs}")
        if self.batch_size <= 0:
            raise InputError(f"`batch_size` must be positive, got {self.batch_size}")
        if not self.learning_rate > 0:
            raise InputError(f"`learning_rate` must be positive, got {self.learning_rate}")


@dataclass
class TrainReport:
    """What a call to `train` did: steps, loss per epoch, and time per step."""

    steps: int
    epoch_losses: list[float]
    step_ms: list[float] = field(repr=False)
    seconds: float

    @property
    def median_step_ms(self) -> float:
        return float(np.median(self.step_ms)) if self.step_ms else float("nan")


@dataclass
class EvalReport:
    loss: float
    accuracy: float | None
    examples: int


@dataclass
class Prediction:
    """Model outputs; for a classifier also class probabilities, indices and names."""

    outputs: np.ndarray
    probabilities: np.ndarray | None = None
    classes: np.ndarray | None = None
    labels: list[str] | None = None


# progress(step, total_steps, loss)
Progress = Callable[[int, int, float], None]


class TrainingSession:
    """A bundle opened for training on the device: parameters, optimizer state, and the step count.

    Resume a saved training state with `TrainingSession(bundle, state=path)`.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, state: str | os.PathLike | None = None, threads: int = 0):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.step = 0
        api = training_api()
        checkpoint = self.bundle.file(mf.CHECKPOINT)
        if state is not None:
            checkpoint = self._read_state(Path(state))
        from onnxruntime import SessionOptions

        options = SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about initializers its eval graph drops
        options.intra_op_num_threads = threads
        try:
            self._state = api.CheckpointState.load_checkpoint(str(checkpoint))
            self._module = api.Module(
                str(self.bundle.file(mf.TRAINING_MODEL)),
                self._state,
                str(self.bundle.file(mf.EVAL_MODEL)),
                session_options=options,
            )
            self._optimizer = api.Optimizer(str(self.bundle.file(mf.OPTIMIZER_MODEL)), self._module)
        except Exception as e:  # ORT raises plain RuntimeErrors/Fail for unreadable models
            raise BundleError(f"ONNX Runtime cannot load bundle {self.bundle.path}: {str(e).splitlines()[0]}") from None
        self._input_names = [spec.name for spec in self.manifest.inputs]
        self._encoder = None

    # ---- data -------------------------------------------------------------------------------------

    def dataset(self, features: dict[str, np.ndarray], labels: np.ndarray | list | None = None) -> Dataset:
        """Check arrays (and labels: class indices or names) against the bundle and pair them up."""
        features = check_features(self.manifest, features)
        rows = len(next(iter(features.values())))
        if labels is not None:
            labels = np.asarray(labels)
            if labels.dtype.kind in "UO":
                labels = encode_labels(self.manifest, [str(v) for v in labels])
            labels = check_labels(self.manifest, labels, rows)
        return Dataset(features, labels)

    def load_data(self, path: str | os.PathLike) -> Dataset:
        """Read a local CSV or JSONL file of `text` (and `label`) and tokenize it with the bundle's tokenizer."""
        texts, labels = read_text_file(path)
        encoded = self.encode(texts)
        return self.dataset(encoded, None if labels is None else encode_labels(self.manifest, labels))

    def encode(self, texts: list[str]) -> dict[str, np.ndarray]:
        """Tokenize texts into the bundle's inputs."""
        if self._encoder is None:
            from edgepeft.runtime.tokenizer import TextEncoder

            self._encoder = TextEncoder(self.bundle)
        return self._encoder(texts)

    # ---- training and evaluation ----------------------------------------------------------------

    def train(
        self, data: Dataset, config: TrainConfig = TrainConfig(), progress: Progress | None = None
    ) -> TrainReport:
        """Train the bundle's trainable parameters on `data` (which must carry labels)."""
        if data.labels is None or len(data) == 0:
            raise InputError("training data is empty or has no labels")
        rng = np.random.default_rng(config.seed + self.step) if config.shuffle else None
        steps_per_epoch = -(-len(data) // config.batch_size)
        total = steps_per_epoch * config.epochs
        self._optimizer.set_learning_rate(config.learning_rate)
        self._module.train()
        step_ms: list[float] = []
        epoch_losses = []
        start = time.perf_counter()
        for _ in range(config.epochs):
            loss_sum = 0.0
            for batch in batches(data, config.batch_size, rng):
                t0 = time.perf_counter()
                loss = float(self._module(*self._feeds(batch))[0])
                self._optimizer.step()
                self._module.lazy_reset_grad()
                step_ms.append((time.perf_counter() - t0) * 1000)
                self.step += 1
                loss_sum += loss * len(batch)
                if progress is not None:
                    progress(len(step_ms), total, loss)
            epoch_losses.append(loss_sum / len(data))
            logger.info("epoch done: mean loss %.4f", epoch_losses[-1])
        return TrainReport(len(step_ms), epoch_losses, step_ms, time.perf_counter() - start)

    def evaluate(self, data: Dataset, batch_size: int = 8) -> EvalReport:
        """Mean loss over `data`, and accuracy for a classifier (or per-output accuracy for BCE)."""
        if data.labels is None or len(data) == 0:
            raise InputError("evaluation data is empty or has no labels")
        self._module.eval()
        loss_sum, correct, seen = 0.0, 0, 0
        for batch in batches(data, batch_size):
            loss, outputs = self._module(*self._feeds(batch))[:2]
            loss_sum += float(loss) * len(batch)
            if self.manifest.loss == "cross_entropy":
                correct += int((outputs.argmax(axis=-1) == batch.labels).sum())
                seen += len(batch)
            elif self.manifest.loss == "bce":
                correct += int(((outputs > 0) == (batch.labels > 0.5)).sum())
                seen += batch.labels.size
        self._module.train()
        accuracy = correct / seen if seen else None
        return EvalReport(loss_sum / len(data), accuracy, len(data))

    def predict(self, features: dict[str, np.ndarray] | list[str], batch_size: int = 8) -> Prediction:
        """Run the model on arrays (or texts, for a bundle with a tokenizer)."""
        if isinstance(features, (list, tuple)):
            features = self.encode(list(features))
        data = self.dataset(features)
        self._module.eval()
        outputs = [self._module(*self._feeds(batch))[1] for batch in batches(data, batch_size)]
        self._module.train()
        output = np.concatenate(outputs)
        if self.manifest.loss == "cross_entropy":
            shifted = np.exp(output - output.max(axis=-1, keepdims=True))
            probabilities = shifted / shifted.sum(axis=-1, keepdims=True)
            classes = probabilities.argmax(axis=-1)
            names = [self.manifest.labels[i] for i in classes] if self.manifest.labels else None
            return Prediction(output, probabilities, classes, names)
        if self.manifest.loss == "bce":
            return Prediction(output, 1.0 / (1.0 + np.exp(-output)))
        return Prediction(output)

    def _feeds(self, batch: Dataset) -> list[np.ndarray]:
        labels = batch.labels if batch.labels is not None else self._dummy_labels(batch)
        return [batch.features[name] for name in self._input_names] + [labels]

    def _dummy_labels(self, batch: Dataset) -> np.ndarray:
        """Labels for a prediction pass: the eval graph computes a loss that is then ignored."""
        spec = self.manifest.label
        rows = len(batch)
        shape = [rows] + [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
        return np.zeros(shape, dtype=spec.dtype)

    # ---- parameters, adapters and training state -------------------------------------------------

    def trainable_values(self) -> dict[str, np.ndarray]:
        """Current values of the trainable parameters, by ONNX name."""
        params = self._state.parameters
        return {spec.name: np.array(params[spec.name].data) for spec in self.manifest.trainable}

    def save_adapter(self, directory: str | os.PathLike) -> Path:
        """Write the trainable parameters as a PEFT adapter (`adapter_config.json` + safetensors)."""
        return save_adapter(self.manifest, self.trainable_values(), directory)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load a PEFT adapter (trained here or on a host) into the trainable parameters."""
        values = load_adapter(self.manifest, directory)
        params = self._state.parameters
        for name, value in values.items():
            params[name] = value

    def save_state(self, directory: str | os.PathLike) -> Path:
        """Save parameters, optimizer state and step count, to resume with `TrainingSession(bundle, state=...)`."""
        api = training_api()
        with atomic_directory(directory, overwrite=True) as tmp:
            api.CheckpointState.save_checkpoint(self._state, str(tmp / STATE_CHECKPOINT), include_optimizer_state=True)
            progress = {"step": self.step, "base_fingerprint": self.manifest.base_fingerprint}
            (tmp / STATE_PROGRESS).write_text(json.dumps(progress) + "\n")
        return Path(directory)

    def _read_state(self, directory: Path) -> Path:
        checkpoint, progress_file = directory / STATE_CHECKPOINT, directory / STATE_PROGRESS
        if not checkpoint.is_file() or not progress_file.is_file():
            raise BundleError(
                f"{directory} is not a saved training state ({STATE_CHECKPOINT} or {STATE_PROGRESS} missing)"
            )
        try:
            progress = json.loads(progress_file.read_text(encoding="utf-8"))
            step, fingerprint = int(progress["step"]), progress["base_fingerprint"]
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise BundleError(f"{progress_file} is malformed: {e}") from None
        if fingerprint != self.manifest.base_fingerprint:
            raise BundleError(f"training state {directory} belongs to a different bundle (base fingerprint differs)")
        self.step = step
        return checkpoint
