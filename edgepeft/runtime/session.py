"""`TrainingSession`: train, evaluate and predict with a bundle through ONNX Runtime's training API."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from edgepeft import manifest as mf
from edgepeft.errors import BundleError, InputError
from edgepeft.fileio import check_output_file, fsync_directory, fsync_file, is_onnx_model
from edgepeft.runtime.adapter import load_adapter, save_adapter
from edgepeft.runtime.bundle import Bundle, open_bundle
from edgepeft.runtime.checkpoint import PROGRESS as PROGRESS_FILE
from edgepeft.runtime.checkpoint import Progress, read_state, write_state
from edgepeft.runtime.data import (
    Dataset,
    batches,
    check_features,
    check_labels,
    encode_labels,
    read_text_file,
    trim_padding,
)
from edgepeft.runtime.memory import estimate_peak_mb, largest_batch_within, sequence_axis
from edgepeft.runtime.ort import onnxruntime_module, training_api
from edgepeft.runtime.train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What a call to `train` did: optimizer steps, mean loss per epoch finished, time per step, and why it stopped.

    `stopped` is "complete", "max_steps", "max_seconds", "cancelled", or "non_finite" (a NaN or infinite
    loss: training stops and the parameters are restored to the last ones that gave a finite loss).
    """

    steps: int
    epoch_losses: list[float]
    step_ms: list[float] = field(repr=False)
    seconds: float
    stopped: str = "complete"

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


# on_step(step_in_run, total_steps_in_run, loss)
StepCallback = Callable[[int, int, float], None]


class TrainingSession:
    """A bundle opened for training on the device: parameters, optimizer state, and the step count.

    Resume a saved training state with `TrainingSession(bundle, state=path)`.
    """

    def __init__(self, bundle: Bundle | str | os.PathLike, state: str | os.PathLike | None = None, threads: int = 0):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.manifest = self.bundle.manifest
        self.progress = Progress()
        self._threads = threads
        self._input_names = [spec.name for spec in self.manifest.inputs]
        self._encoder = None
        if state is not None:
            self._restore(state)
        else:
            self._open(self.bundle.file(mf.CHECKPOINT))

    @property
    def step(self) -> int:
        """Optimizer steps taken since the bundle was exported (carried across saved states)."""
        return self.progress.step

    def _open(self, checkpoint: Path) -> None:
        """Build the ORT state, training module and optimizer on a checkpoint file."""
        api = training_api()  # first: a plain `import onnxruntime` before it would load torch
        options = onnxruntime_module().SessionOptions()
        options.log_severity_level = 3  # errors only: ORT warns about initializers its eval graph drops
        options.intra_op_num_threads = self._threads
        # ORT's memory pattern keeps a second planned block next to the first step's allocations, and with
        # its planner's buffer reuse on, ~14 MB a layer stays held through the forward pass beyond what the
        # backward reads (measured, the exact chain not traced). With both off, the peak of a MiniLM int8
        # step at 8 x 128 drops from ~500 MB to ~410 MB (pattern) and on to ~250 MB (reuse), same speed.
        options.enable_mem_pattern = False
        options.enable_mem_reuse = False
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
            raise BundleError(
                f"ONNX Runtime cannot load {checkpoint} with bundle {self.bundle.path}: {str(e).splitlines()[0]}"
            ) from None
        params = self._state.parameters
        for spec in self.manifest.trainable:
            if spec.name not in params or tuple(params[spec.name].data.shape) != spec.shape:
                raise BundleError(f"bundle manifest says {spec.name} has shape {spec.shape}; the checkpoint disagrees")

    def _restore(self, directory: str | os.PathLike) -> None:
        checkpoint, progress = read_state(directory, self.manifest.base_fingerprint)
        self._open(checkpoint)
        self.progress = progress

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
        self,
        data: Dataset,
        config: TrainConfig = TrainConfig(),
        on_step: StepCallback | None = None,
        *,
        checkpoint_dir: str | os.PathLike | None = None,
        checkpoint_every: int = 0,
        cancel: Callable[[], bool] | None = None,
    ) -> TrainReport:
        """Train the trainable parameters on `data` (which must carry labels).

        With `checkpoint_dir`, the state is saved there every `checkpoint_every` steps and when the call
        ends, and a state already there is resumed: after a kill, calling `train` again with the same data
        and config finishes the run with the step count it would have reached uninterrupted. A finished
        run is not repeated. `cancel` is called between steps; returning True stops cleanly.
        """
        if data.labels is None or len(data) == 0:
            raise InputError("training data is empty or has no labels")
        if checkpoint_every < 0:
            raise InputError(f"`checkpoint_every` must be >= 0, got {checkpoint_every}")
        if config.memory_budget_mb is not None:
            config = self._fit_memory_budget(data, config)
        run = config.run_identity(len(data))
        if checkpoint_dir is not None and (Path(checkpoint_dir) / PROGRESS_FILE).is_file():
            self._restore(checkpoint_dir)
            if self.progress.complete and self.progress.run == run:
                return TrainReport(0, [], [], 0.0, "complete")
        if self.progress.run != run or self.progress.complete:
            self.progress = Progress(step=self.step, run=run, run_start=self.step)
        p = self.progress
        total = config.total_steps(len(data))
        batches_per_epoch = -(-len(data) // config.batch_size)
        step_ms: list[float] = []
        epoch_losses: list[float] = []
        stopped = "complete"
        last_good: dict[str, np.ndarray] | None = None
        started = time.perf_counter()
        self._module.train()
        while p.epoch < config.epochs and stopped == "complete":
            order = self._epoch_order(data.labels, config, p)
            loss_sum, seen = 0.0, 0
            while p.batch < batches_per_epoch:
                done = p.step - p.run_start
                if config.max_steps is not None and done >= config.max_steps:
                    stopped = "max_steps"
                elif config.max_seconds is not None and time.perf_counter() - started >= config.max_seconds:
                    stopped = "max_seconds"
                elif cancel is not None and cancel():
                    stopped = "cancelled"
                if stopped != "complete":
                    break
                t0 = time.perf_counter()
                self._optimizer.set_learning_rate(config.learning_rate_at(done, total))
                end = min(p.batch + config.grad_accumulation, batches_per_epoch)
                finite = True
                for index in range(p.batch, end):  # gradients add up until the optimizer step
                    batch = trim_padding(data.take(order[index * config.batch_size : (index + 1) * config.batch_size]))
                    loss = float(self._module(*self._feeds(batch))[0])
                    loss_sum, seen = loss_sum + loss * len(batch), seen + len(batch)
                    finite = finite and bool(np.isfinite(loss))
                if not finite:
                    self._module.lazy_reset_grad()
                    if last_good is not None:
                        self.set_trainable(last_good)
                    logger.warning(
                        "loss is %s at step %d: training stopped, last good parameters restored", loss, p.step
                    )
                    stopped = "non_finite"
                    break
                last_good = self.trainable_values()  # these gave a finite loss: restored if a later one is not
                self._optimizer.step()
                self._module.lazy_reset_grad()
                p.batch, p.step = end, p.step + 1
                step_ms.append((time.perf_counter() - t0) * 1000)
                if on_step is not None:
                    on_step(done + 1, total, loss)
                if checkpoint_dir is not None and checkpoint_every and (done + 1) % checkpoint_every == 0:
                    self.save_state(checkpoint_dir)
            if p.batch >= batches_per_epoch:
                epoch_losses.append(loss_sum / max(seen, 1))
                logger.info("epoch %d done: mean loss %.4f", p.epoch + 1, epoch_losses[-1])
                p.epoch, p.batch = p.epoch + 1, 0
        p.complete = stopped in ("complete", "max_steps")
        if checkpoint_dir is not None:
            self.save_state(checkpoint_dir)
        return TrainReport(len(step_ms), epoch_losses, step_ms, time.perf_counter() - started, stopped)

    def _fit_memory_budget(self, data: Dataset, config: TrainConfig) -> TrainConfig:
        """Refuse, or lower the batch size, when the estimated peak memory exceeds the budget."""
        length = 1
        if sequence_axis(self.manifest) is not None:
            length = max(a.shape[1] for a in data.features.values() if a.ndim >= 2)
        budget = config.memory_budget_mb
        estimate = estimate_peak_mb(self.manifest, config.batch_size, length)
        if estimate <= budget:
            return config
        fits = largest_batch_within(self.manifest, budget, config.batch_size, length)
        if config.lower_batch_to_fit and fits:
            logger.warning("batch %d needs ~%.0f MB, over the %.0f MB budget: training with batch %d",
                           config.batch_size, estimate, budget, fits)  # fmt: skip
            return replace(config, batch_size=fits)
        hint = f"batch {fits} fits" if fits else "no batch size fits"
        raise InputError(f"estimated peak memory {estimate:.0f} MB for batch {config.batch_size} x {length} tokens "
                         f"exceeds the {budget:.0f} MB budget ({hint})")  # fmt: skip

    def _epoch_order(self, labels: np.ndarray, config: TrainConfig, progress: Progress) -> np.ndarray:
        """The example order of one epoch: a function of seed, run and epoch only, so a resumed run repeats it."""
        examples = len(labels)
        rng = np.random.default_rng([config.seed, progress.run_start, progress.epoch])
        if config.balanced:
            if not self.manifest.is_classifier:
                raise InputError("`balanced` sampling needs class labels (a cross_entropy bundle)")
            _, inverse, counts = np.unique(labels, return_inverse=True, return_counts=True)
            weights = 1.0 / counts[inverse]
            return rng.choice(examples, size=examples, replace=True, p=weights / weights.sum())
        return rng.permutation(examples) if config.shuffle else np.arange(examples)

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
        """Write the trainable parameters as a PEFT adapter (`adapter_config.json` + safetensors), all at once.

        `directory` must be new, empty, or an adapter (then replaced), and outside the bundle.

        Raises:
            OutputError: `directory` holds something else, or is (or is inside) the bundle.
        """
        return save_adapter(self.manifest, self.trainable_values(), directory, protect=(self.bundle.path,))

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load a PEFT adapter (trained here or on a host) into the trainable parameters."""
        self.set_trainable(load_adapter(self.manifest, directory))

    def set_trainable(self, values: dict[str, np.ndarray]) -> None:
        """Replace the trainable parameters in place (an adapter swap: the base model is not reloaded)."""
        expected = {spec.name: spec.shape for spec in self.manifest.trainable}
        if set(values) != set(expected):
            raise InputError(f"trainable values must name exactly the bundle's {len(expected)} trainable parameters")
        params = self._state.parameters
        for name, value in values.items():
            value = np.ascontiguousarray(value, dtype=np.float32)
            if value.shape != expected[name]:
                raise InputError(f"{name} must have shape {expected[name]}, got {value.shape}")
            params[name] = value

    def export_inference(self, path: str | os.PathLike) -> Path:
        """Write a standalone ONNX model (int8 base + the current adapter) for a plain ORT InferenceSession.

        The file is written beside `path`, synced, then renamed over it; an existing file there is replaced
        only if it is an ONNX model.

        Raises:
            OutputError: `path` is a directory, is inside the bundle, or is a file that is not an ONNX model.
        """
        path = Path(path)
        check_output_file(path, "an ONNX model", is_onnx_model, protect=(self.bundle.path,))
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
        try:
            self._module.export_model_for_inferencing(str(tmp), [spec.name for spec in self.manifest.outputs])
            fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)
        return path

    def save_state(self, directory: str | os.PathLike) -> Path:
        """Save parameters, optimizer state and progress (crash-safe); resume with `TrainingSession(bundle, state=...)`.

        `directory` must be new, empty, or a training state (then updated), and outside the bundle.

        Raises:
            OutputError: `directory` holds something else, or is (or is inside) the bundle.
        """
        api = training_api()

        def save_checkpoint(path: Path) -> None:
            api.CheckpointState.save_checkpoint(self._state, str(path), include_optimizer_state=True)

        return write_state(
            directory, save_checkpoint, self.progress, self.manifest.base_fingerprint, protect=(self.bundle.path,)
        )
