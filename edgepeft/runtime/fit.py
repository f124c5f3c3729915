"""`fit`: train with a validation split, stop early, keep the best adapter, never store a worse one."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace

import numpy as np

from edgepeft.errors import InputError
from edgepeft.runtime.data import Dataset
from edgepeft.runtime.session import StepCallback, TrainingSession, TrainReport
from edgepeft.runtime.store import AdapterStore
from edgepeft.runtime.train_config import TrainConfig

logger = logging.getLogger(__name__)


@dataclass
class FitReport:
    """Validation score per evaluation (accuracy for classifiers, else minus the loss), and what was kept.

    `stopped`: "complete", "early_stopped" (`patience` evaluations in a row without improvement), "max_steps",
    "max_seconds" (the budget of the whole fit), or "non_finite" (a NaN or infinite loss: a failure).
    `best_step` is the session step of the best parameters, which the session holds after the fit.
    `stored_score`: the score the adapter already in the store had on the same validation data (None: there
    was none), which `best_score` had to beat to replace it.
    """

    scores: list[float]
    best_score: float
    best_step: int
    stopped: str
    stored: bool
    training: TrainReport  # all steps taken, across the evaluation pauses; its `stopped` is the fit's
    stored_score: float | None = None


def split_validation(data: Dataset, fraction: float = 0.1, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Hold out a seeded `fraction` of `data` (at least one example) for validation."""
    if not 0 < fraction < 1 or len(data) < 2:
        raise InputError(f"cannot hold out {fraction} of {len(data)} examples for validation")
    order = np.random.default_rng(seed).permutation(len(data))
    cut = max(1, int(round(len(data) * fraction)))
    return data.take(order[cut:]), data.take(order[:cut])


def fit(
    session: TrainingSession,
    train: Dataset,
    validation: Dataset,
    config: TrainConfig,
    *,
    eval_every: int = 50,
    patience: int = 3,
    store: AdapterStore | None = None,
    name: str = "default",
    on_step: StepCallback | None = None,
) -> FitReport:
    """Train, evaluating on `validation` every `eval_every` steps; stop after `patience` evaluations in a row
    without improvement; leave the best parameters in the session; and, with a `store`, replace adapter `name`
    only if the best score beats the stored adapter's score on the same validation data.
    `config.max_seconds` bounds the whole fit, evaluations included."""
    if eval_every <= 0 or patience < 1:
        raise InputError(f"`eval_every` and `patience` must be positive, got {eval_every}, {patience}")
    started = time.perf_counter()
    scores: list[float] = []
    best_score, best_values, best_step = _score(session, validation), session.trainable_values(), session.step
    scores.append(best_score)
    stale = 0
    training = TrainReport(0, [], [], 0.0)
    first = True
    while True:
        taken = {"steps": 0}

        def pause() -> bool:
            taken["steps"] += 1
            return taken["steps"] > eval_every

        chunk = config
        if config.max_seconds is not None:
            left = config.max_seconds - (time.perf_counter() - started)
            if left <= 0:
                stopped = "max_seconds"
                break
            chunk = replace(config, max_seconds=left)
        report = session.train(train, chunk, on_step, cancel=pause)
        if first:
            training.resumed_from, first = report.resumed_from, False
        training.steps += report.steps
        training.epoch_losses += report.epoch_losses
        training.step_ms += report.step_ms
        training.seconds += report.seconds
        training.total_steps, training.run_steps = report.total_steps, report.run_steps
        if report.stopped == "non_finite":
            stopped = "non_finite"
            break
        score = _score(session, validation)
        scores.append(score)
        if score > best_score:
            best_score, best_values, best_step, stale = score, session.trainable_values(), session.step, 0
        else:
            stale += 1
        if report.stopped != "cancelled":
            stopped = report.stopped
            break
        if stale >= patience:
            stopped = "early_stopped"
            break
    training.stopped = stopped
    session.set_trainable(best_values)
    logger.info("fit: best validation score %.4f at step %d (%s)", best_score, best_step, stopped)
    stored, incumbent = False, []

    def rescore(values: dict[str, np.ndarray]) -> float:
        incumbent.append(_score_of(session, values, validation))
        return incumbent[-1]

    if store is not None:  # compare and save under the store's lock: a concurrent save is never replaced by worse
        stored = store.save(name, best_values, steps=best_step, score=best_score, only_if_better=True,
                            rescore=rescore)  # fmt: skip
        if not stored:
            logger.info("fit: kept stored adapter %r (it scores >= %.4f on this validation set)", name, best_score)
    return FitReport(scores, best_score, best_step, stopped, stored, training, incumbent[-1] if incumbent else None)


def _score_of(session: TrainingSession, values: dict[str, np.ndarray], validation: Dataset) -> float:
    """The score of other trainable `values` on the same validation data (scores from other data do not compare)."""
    current = session.trainable_values()
    session.set_trainable(values)
    try:
        return _score(session, validation)
    finally:
        session.set_trainable(current)


def _score(session: TrainingSession, data: Dataset) -> float:
    result = session.evaluate(data)
    return result.accuracy if result.accuracy is not None else -result.loss
