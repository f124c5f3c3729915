"""`fit` does what it says: stops after `patience` evaluations without improvement, leaves the best parameters in
the session, and keeps to its time budget across all its evaluation pauses."""

from __future__ import annotations

import time

import numpy as np
import pytest

from edgepeft.errors import InputError
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.fit import fit


def _task(session: TrainingSession, rows: int, seed: int, shift: int = 0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return session.dataset({"x": x}, (x[:, :4].argmax(axis=1) + shift) % 4)


@pytest.mark.parametrize("patience", [1, 3])
def test_fit_stops_after_patience_evaluations_and_keeps_the_best(mlp_bundle, patience):
    session = TrainingSession(mlp_bundle)
    train = _task(session, 64, seed=1)
    validation = _task(session, 32, seed=2, shift=1)  # labels the training contradicts: the score falls
    snapshots = {session.step: session.trainable_values()}

    def snapshot(*_) -> None:
        snapshots[session.step] = session.trainable_values()

    report = fit(session, train, validation, TrainConfig(epochs=20, learning_rate=1e-2), eval_every=2,
                 patience=patience, on_step=snapshot)  # fmt: skip
    best = report.scores.index(max(report.scores))  # the first best: a tie is no improvement
    assert report.stopped == report.training.stopped == "early_stopped"
    assert len(report.scores) - 1 - best == patience  # exactly `patience` evaluations without improvement
    assert report.training.steps == 2 * (len(report.scores) - 1) < report.training.total_steps
    assert report.best_score == report.scores[best] and report.best_step == 2 * best
    held = session.trainable_values()
    assert all(np.array_equal(held[k], v) for k, v in snapshots[report.best_step].items())  # the best, restored
    assert not all(np.array_equal(held[k], v) for k, v in snapshots[max(snapshots)].items())
    assert session.evaluate(validation).accuracy == report.best_score


def test_fit_time_budget_spans_the_whole_fit(mlp_bundle):
    session = TrainingSession(mlp_bundle)
    train, validation = _task(session, 64, seed=1), _task(session, 32, seed=2)
    config = TrainConfig(epochs=25, learning_rate=1e-3, max_seconds=0.3)  # 200 steps of at least 20 ms
    report = fit(session, train, validation, config, eval_every=2, patience=1000,
                 on_step=lambda *_: time.sleep(0.02))  # fmt: skip
    assert report.stopped == report.training.stopped == "max_seconds"
    assert report.training.steps <= 15  # 0.3 s holds at most 15 steps of 20 ms, evaluations included


def test_fit_patience_must_be_positive(mlp_bundle):
    session = TrainingSession(mlp_bundle)
    data = _task(session, 16, seed=1)
    with pytest.raises(InputError, match="patience"):
        fit(session, data, data, TrainConfig(), patience=0)
