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
    read_examples,
    trim_padding,
)
from edgepeft.runtime.memory import estimate_peak_mb, largest_batch_within, sequence_axis
from edgepeft.runtime.ort import training_api, training_session_options
from edgepeft.runtime.tasks import task_data
from edgepeft.runtime.train_config import TrainConfig, fingerprint

logger = logging.getLogger(__name__)


@dataclass
class TrainReport:
    """What a call to `train` did: optimizer steps, mean loss per epoch finished, time per step, and why it stopped.

    `stopped` is "complete", "max_steps", "max_seconds", "cancelled", or "non_finite" (a NaN or infinite
    loss: training stops and the parameters are restored to the last ones that gave a finite loss; a failure).
    Where the call stands in its run: the run has `total_steps` optimizer steps, `run_steps` of them are done
    when the call ends. `resumed_from` is the run step the call continued from (None: it started the run),
    from the checkpoint directory's state when `resumed_checkpoint`. `already_complete`: the checkpoint
    directory held this run finished, so nothing was trained (the session now holds its result).
    `replaced_run`: the checkpoint directory held another run and `replace_other_run` started a new one there.
    """

    steps: int
    epoch_losses: list[float]
    step_ms: list[float] = field(repr=False)
    seconds: float
    stopped: str = "complete"
    total_steps: int = 0
    run_steps: int = 0
    resumed_from: int | None = None
    resumed_checkpoint: bool = False
    already_complete: bool = False
    replaced_run: bool = False

    @property
    def median_step_ms(self) -> float | None:
        """Median time of one optimizer step in ms; None when the call took no step."""
        return float(np.median(self.step_ms)) if self.step_ms else None


@dataclass
class EvalReport:
    """Mean loss (a causal LM: per scored token), accuracy for a classifier, perplexity for a causal LM."""

    loss: float
    accuracy: float | None
    examples: int
    perplexity: float | None = None
    tokens: int | None = None  # a causal LM: how many tokens were scored


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
        self._task = task_data(self.bundle)  # a causal LM's data and scoring; None for a classifier or regressor
        self._generator = None
        self._optimizer_fresh = True  # no optimizer step taken on the current state: its moments are zero
        self._optimizer_stale = False  # its moments belong to values swapped out: reset before training
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
        self._session_options = training_session_options(self._threads)
        try:
            self._state = api.CheckpointState.load_checkpoint(str(checkpoint))
            self._build_module(evaluation=False)
        except Exception as e:  # ORT raises plain RuntimeErrors/Fail for unreadable models
            raise BundleError(
                f"ONNX Runtime cannot load {checkpoint} with bundle {self.bundle.path}: {str(e).splitlines()[0]}"
            ) from None
        params = self._state.parameters
        for spec in self.manifest.trainable:
            if spec.name not in params or tuple(params[spec.name].data.shape) != spec.shape:
                found = tuple(params[spec.name].data.shape) if spec.name in params else "no such tensor"
                raise BundleError(
                    f"the bundle's {spec.name} has shape {spec.shape}; the checkpoint disagrees ({found})"
                )

    def _build_module(self, evaluation: bool) -> None:
        """The training module and optimizer on the current state; with `evaluation`, the module also holds the
        evaluation graph. Training alone never loads that graph (a second ORT session: ~40 MB for SmolLM2-135M);
        `_evaluation_module` rebuilds the module with it on the same state the first time it is needed, which
        keeps parameters, gradients, AdamW moments and step count (measured: the same losses after)."""
        api = training_api()
        evaluation_model = str(self.bundle.file(mf.EVAL_MODEL)) if evaluation else None
        self._module = self._optimizer = None  # the old sessions go before the new ones are built
        self._module = api.Module(
            str(self.bundle.file(mf.TRAINING_MODEL)), self._state, evaluation_model,
            session_options=self._session_options,
        )  # fmt: skip
        self._optimizer = api.Optimizer(str(self.bundle.file(mf.OPTIMIZER_MODEL)), self._module)
        self._evaluates = evaluation

    def _evaluation_module(self):
        """The module, set to evaluate (loading the evaluation graph if this session has not yet)."""
        if not self._evaluates:
            try:
                self._build_module(evaluation=True)
            except Exception as e:  # ORT raises plain RuntimeErrors/Fail for unreadable models
                raise BundleError(f"ONNX Runtime cannot load the evaluation graph of bundle {self.bundle.path}: "
                                  f"{str(e).splitlines()[0]}") from None  # fmt: skip
        self._module.eval()
        return self._module

    def _restore(self, directory: str | os.PathLike) -> None:
        self._load_state(*read_state(directory, self.manifest.base_fingerprint), directory)

    def _load_state(self, checkpoint: Path, progress: Progress, directory: str | os.PathLike) -> None:
        """Replace parameters, optimizer state and progress with a verified saved state's."""
        try:
            self._open(checkpoint)
        except BundleError as e:  # the same base model, but another bundle's trainable parts (rank, targets)
            raise BundleError(f"training state {directory} was saved with another bundle than {self.bundle.path}: "
                              f"{e}") from None  # fmt: skip
        self.progress = progress
        self._optimizer_fresh = False
        self._optimizer_stale = not progress.run  # saved after a swap, before any training of the values

    def _reset_optimizer(self, values: dict[str, np.ndarray]) -> None:
        """Fresh optimizer state (AdamW moments and its step count) with `values` as the trainable parameters.

        ORT keeps the moments in the checkpoint state and has no call to clear them, so the state, module and
        optimizer are rebuilt from the bundle's checkpoint (about as long as opening the bundle)."""
        self._module = self._optimizer = self._state = None  # release the old state before building the new
        self._open(self.bundle.file(mf.CHECKPOINT))
        self._write_trainable(values)
        self._optimizer_fresh, self._optimizer_stale = True, False

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

    def load_data(
        self, path: str | os.PathLike, *, text_column: str | None = None, label_column: str | None = None
    ) -> Dataset:
        """Read a labelled local data file for training or evaluation, checked against the bundle.

        A bundle with a tokenizer reads a CSV/TSV or JSONL file of `text` and `label` (or the columns named
        by `text_column` / `label_column`) and tokenizes the texts here. A bundle that takes arrays reads a
        .npz (arrays named after its inputs, plus `labels`), or a JSONL/CSV whose fields are its input names
        (see `runtime.data.read_examples` for the layouts). A file that does not fit raises a DataError that
        says what the bundle takes.
        """
        if self._task is not None:  # a causal LM: plain text, JSONL text or chat (runtime/tasks/causal_lm.py)
            return self._task.load(path, text_column=text_column)
        features, labels = read_examples(
            self.bundle, path, self.encode, text_column=text_column, label_column=label_column, labels=True
        )
        return Dataset(features, labels)

    def load_inputs(self, path: str | os.PathLike, *, text_column: str | None = None) -> dict[str, np.ndarray]:
        """Read a data file's model inputs for `predict` (labels are not needed, and not read if present)."""
        features, _ = read_examples(self.bundle, path, self.encode, text_column=text_column, labels=False)
        return features

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
        replace_other_run: bool = False,
    ) -> TrainReport:
        """Train the trainable parameters on `data` (which must carry labels).

        A run is defined by the data (its sha256), the config's run settings and the trainable values it
        started from. With `checkpoint_dir`, the state is saved there every `checkpoint_every` steps and when
        the call ends, and a state of this same run already there is resumed: after a kill, calling `train`
        again with the same data and config finishes the run with the step count and parameters it would have
        reached uninterrupted; a finished run is not repeated. A state of another run there is refused with a
        `BundleError` before anything is restored, or, with `replace_other_run`, left alone while a new run
        starts from this session's values (its first save replaces it). Without a checkpoint directory, a call
        with the data and config of the session's unfinished run (cancelled, or stopped by a budget) continues
        it. `cancel` is called between steps; returning True stops cleanly.
        """
        if data.labels is None or len(data) == 0:
            raise InputError("training data is empty or has no labels")
        if checkpoint_every < 0:
            raise InputError(f"`checkpoint_every` must be >= 0, got {checkpoint_every}")
        if config.memory_budget_mb is not None:
            config = self._fit_memory_budget(data, config)
        identity = config.run_identity(len(data), fingerprint(data.features, data.labels))
        total = config.total_steps(len(data))
        from_checkpoint = replaced = False
        if checkpoint_dir is not None and (Path(checkpoint_dir) / PROGRESS_FILE).is_file():
            from_checkpoint = self._take_checkpoint(Path(checkpoint_dir), identity, replace_other_run)
            replaced = not from_checkpoint
        if self._optimizer_stale:
            self._reset_optimizer(self.trainable_values())
        p = self.progress
        if from_checkpoint and p.complete:
            logger.info("training state %s holds this run finished (%d steps): nothing to train", checkpoint_dir, total)
            return TrainReport(0, [], [], 0.0, "complete", total, p.step - p.run_start, None, True, True)
        if _settings(p.run) != identity or p.complete:
            p = self.progress = Progress(step=self.step, run={**identity, "start": self._values_sha256()},
                                         run_start=self.step)  # fmt: skip
            resumed_from = None
        else:
            resumed_from = p.step - p.run_start
            logger.info("resuming the run at step %d of %d", resumed_from, total)
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
                elif config.max_seconds is not None and step_ms and time.perf_counter() - started >= config.max_seconds:
                    stopped = "max_seconds"
                elif cancel is not None and cancel():
                    stopped = "cancelled"
                if stopped != "complete":
                    break
                t0 = time.perf_counter()
                self._optimizer.set_learning_rate(config.learning_rate_at(done, total))  # per optimizer step
                end = min(p.batch + config.grad_accumulation, batches_per_epoch)
                size = config.batch_size
                micro = [trim_padding(data.take(order[i * size : (i + 1) * size])) for i in range(p.batch, end)]
                loss = self._accumulate_gradients(micro)
                if not np.isfinite(loss):
                    self._module.lazy_reset_grad()
                    if last_good is not None:
                        self._write_trainable(last_good)
                    logger.warning(
                        "loss is %s at step %d: training stopped, last good parameters restored", loss, p.step
                    )
                    stopped = "non_finite"
                    break
                rows = sum(len(batch) for batch in micro)
                loss_sum, seen = loss_sum + loss * rows, seen + rows
                last_good = self.trainable_values()  # these gave a finite loss: restored if a later one is not
                self._optimizer.step()
                self._module.lazy_reset_grad()
                self._optimizer_fresh = False
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
        seconds = time.perf_counter() - started
        return TrainReport(len(step_ms), epoch_losses, step_ms, seconds, stopped, total, p.step - p.run_start,
                           resumed_from, from_checkpoint and resumed_from is not None, False, replaced)  # fmt: skip

    def _take_checkpoint(self, directory: Path, identity: dict, replace_other_run: bool) -> bool:
        """Resume the state in `directory` if it is of this call's run; True if the session now stands in it.

        The progress record is read and verified first and compared with the run this call defines; only a state
        of the same run (same data, settings and starting values, or the run this session is in) is restored.
        """
        checkpoint, found = read_state(directory, self.manifest.base_fingerprint)
        same_settings = _settings(found.run) == identity
        if same_settings and found.run == self.progress.run:  # the session is in that very run
            if found.step > self.step:
                self._load_state(checkpoint, found, directory)  # the directory is further along
            return True
        same_start = found.run.get("start") == self._values_sha256()
        if same_settings and same_start:
            self._load_state(checkpoint, found, directory)
            return True
        differences = []
        for key in sorted(set(_settings(found.run)) | set(identity)):
            there, here = found.run.get(key), identity.get(key)
            if there != here:
                there, here = ("not given" if v is None else repr(v) for v in (there, here))
                differences.append("other data" if key == "data_sha256" else f"`{key}` {there} there, {here} here")
        if not same_start:
            differences.append("the trainable values the run started from (not this session's)")
        message = f"training state {directory} belongs to another run ({'; '.join(differences)})"
        if not replace_other_run:
            raise BundleError(f"{message}: pass another checkpoint directory, or start a new run there, which "
                              "replaces that state (replace_other_run=True)")  # fmt: skip
        logger.warning("%s: starting a new run, which replaces it", message)
        return False

    def _accumulate_gradients(self, micro: list[Dataset]) -> float:
        """Run the forward and backward passes of one optimizer step; return its mean loss.

        The gradient buffers are left holding the gradient of the mean loss over all the step's examples, the
        same as one batch of all of them: ORT adds up each call's mean-loss gradient, so with several batches
        each one's gradient is taken alone and weighted by its share of the examples.
        """
        if len(micro) == 1:
            return self._loss(micro[0])
        params = self._state.parameters
        names = [spec.name for spec in self.manifest.trainable]
        rows = sum(len(batch) for batch in micro)
        summed: dict[str, np.ndarray] = {}
        loss_sum = 0.0
        for batch in micro:
            self._module.lazy_reset_grad()  # the next call overwrites the gradients instead of adding to them
            loss_sum += self._loss(batch) * len(batch)
            weight = np.float32(len(batch) / rows)
            for name in names:
                weighted = params[name].grad * weight
                summed[name] = weighted if name not in summed else summed[name] + weighted
        for name in names:
            params[name]._parameter.grad.update_inplace(summed[name])  # the buffer the optimizer step reads
        return loss_sum / rows

    def _loss(self, batch: Dataset) -> float:
        """The loss of one pass of the module as it is set (training: forward and backward). ORT returns a lone
        array when the loss is the only output (a causal LM's graphs output no logits)."""
        outputs = self._module(*self._feeds(batch))
        return float(outputs if isinstance(outputs, np.ndarray) else outputs[0])

    def _values_sha256(self) -> str:
        return fingerprint(self.trainable_values())

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
        """The example order of one epoch: a function of the seed and the epoch only, so a resumed run repeats it
        and a run does not depend on what the session trained before it."""
        examples = len(labels)
        rng = np.random.default_rng([config.seed, progress.epoch])
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
        self._evaluation_module()
        if self._task is not None:
            return self._evaluate_tokens(data, batch_size)
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

    def _evaluate_tokens(self, data: Dataset, batch_size: int) -> EvalReport:
        """A causal LM's mean loss over every scored token, and its perplexity."""
        from edgepeft.runtime.tasks.causal_lm import perplexity, scored_tokens

        loss_sum, tokens = 0.0, 0
        for batch in batches(data, batch_size):
            count = scored_tokens(batch.labels)
            if count:  # a batch with no scored token has no loss (0 / 0)
                loss_sum += self._loss(batch) * count
                tokens += count
        self._module.train()
        return EvalReport(loss_sum / max(tokens, 1), None, len(data), perplexity(loss_sum, tokens), tokens)

    def generate(
        self,
        prompt: str | list[dict],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ):
        """Continue `prompt` (a text, or chat messages rendered with the bundle's chat template) with the current
        adapter; stops at eos. `temperature` 0 is greedy. Returns a `Generation` (text, token ids, timings)."""
        return self._lm_generator().generate(
            prompt, self.trainable_values(), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
            seed=seed, use_cache=use_cache,
        )  # fmt: skip

    def teacher_forced(self, prompt: str | list[dict], continuation: list[int]) -> list[int]:
        """The greedy token the current adapter picks after `prompt` and after each prefix of `continuation`
        (forced in, as `generate` would run it): how often another model's greedy tokens are this one's choice."""
        return self._lm_generator().teacher_forced(prompt, continuation, self.trainable_values())

    def _lm_generator(self):
        if self._task is None:
            raise InputError(f"bundle {self.bundle.path} is not a causal language model: it cannot generate")
        if self._generator is None:
            from edgepeft.runtime.generation import Generator

            self._generator = Generator(self.bundle, self._task, threads=self._threads)
        return self._generator

    def predict(self, features: dict[str, np.ndarray] | list[str], batch_size: int = 8) -> Prediction:
        """Run the model on arrays (or texts, for a bundle with a tokenizer)."""
        if self._task is not None:
            raise InputError("a causal language model predicts with `generate`, not `predict`")
        if isinstance(features, (list, tuple)):
            features = self.encode(list(features))
        data = self.dataset(features)
        self._evaluation_module()
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
        values = {**self.trainable_values(), **self.frozen_adapter_values()}
        return save_adapter(self.manifest, values, directory, protect=(self.bundle.path,))

    def frozen_adapter_values(self) -> dict[str, np.ndarray]:
        """The adapter tensors the bundle holds fixed (FFA-LoRA's lora_A), by ONNX name; empty for most bundles."""
        params = self._state.parameters
        return {spec.name: np.array(params[spec.name].data) for spec in self.manifest.frozen_adapter}

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Load a PEFT adapter (trained here or on a host) into the trainable parameters."""
        self.set_trainable(load_adapter(self.manifest, directory, self.frozen_adapter_values()))

    def set_trainable(self, values: dict[str, np.ndarray]) -> None:
        """Replace the trainable parameters (an adapter swap: the base model is not reloaded).

        The values swapped in start afresh: the next `train` starts a new run with fresh optimizer state (the
        AdamW moments and step count of the values swapped out are dropped). The swap itself is in place;
        when the session had taken optimizer steps, the next `train` first rebuilds the ORT state, once, about
        as long as opening the bundle (ORT has no call to clear the moments).
        """
        self._write_trainable(values)
        self.progress = Progress(step=self.step)
        self._optimizer_stale = not self._optimizer_fresh

    def _checked_trainable(self, values: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """`values` as contiguous float32 arrays, checked to name and shape exactly the trainable parameters."""
        expected = {spec.name: spec.shape for spec in self.manifest.trainable}
        if set(values) != set(expected):
            raise InputError(f"trainable values must name exactly the bundle's {len(expected)} trainable parameters")
        checked = {}
        for name, value in values.items():
            checked[name] = np.ascontiguousarray(value, dtype=np.float32)
            if checked[name].shape != expected[name]:
                raise InputError(f"{name} must have shape {expected[name]}, got {checked[name].shape}")
        return checked

    def _write_trainable(self, values: dict[str, np.ndarray]) -> None:
        """Write trainable values into the ORT state in place, optimizer state and progress untouched."""
        params = self._state.parameters
        for name, value in self._checked_trainable(values).items():
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
            module = self._evaluation_module()  # ORT exports from the evaluation graph
            module.export_model_for_inferencing(str(tmp), [spec.name for spec in self.manifest.outputs])
            module.train()
            fsync_file(tmp)
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_directory(path.parent)
        return path

    def save_state(self, directory: str | os.PathLike) -> Path:
        """Save parameters, optimizer state and progress (crash-safe); resume with `TrainingSession(bundle, state=)`.

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


def _settings(run: dict) -> dict:
    """A run record without its starting values' fingerprint: what a call's data and config determine."""
    return {key: value for key, value in run.items() if key != "start"}
