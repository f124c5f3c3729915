"""Training runs an app can control: schedules, budgets, cancellation, seeds, and resuming after SIGKILL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from edgepeft.errors import BundleError, InputError
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.checkpoint import PROGRESS, Progress, read_state


def _data(session: TrainingSession, rows: int = 64):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return session.dataset({"x": x}, x[:, :4].argmax(axis=1))


def test_learning_rate_schedules():
    constant = TrainConfig(learning_rate=1.0)
    assert [constant.learning_rate_at(s, 10) for s in (0, 5, 9)] == [1.0, 1.0, 1.0]
    linear = TrainConfig(learning_rate=1.0, schedule="linear", warmup_steps=3)
    assert [linear.learning_rate_at(s, 13) for s in range(3)] == [0.25, 0.5, 0.75]
    assert linear.learning_rate_at(3, 13) == 1.0 and linear.learning_rate_at(8, 13) == 0.5
    cosine = TrainConfig(learning_rate=2.0, schedule="cosine")
    assert cosine.learning_rate_at(0, 10) == 2.0
    assert cosine.learning_rate_at(5, 10) == pytest.approx(1.0)
    assert cosine.learning_rate_at(10, 10) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [({"schedule": "step"}, "schedule"), ({"grad_accumulation": 0}, "grad_accumulation"), ({"max_steps": 0}, "max_steps"),
     ({"seed": -1}, "seed"), ({"epochs": 1.5}, "epochs"), ({"learning_rate": 0}, "learning_rate")],
)  # fmt: skip
def test_bad_train_config(kwargs, message):
    with pytest.raises(InputError, match=message):
        TrainConfig(**kwargs)


def test_same_seed_same_result_other_seed_other_result(mlp_bundle):
    def run(seed):
        session = TrainingSession(mlp_bundle)
        session.train(_data(session), TrainConfig(epochs=2, learning_rate=1e-2, seed=seed))
        return session.trainable_values()

    a, b, c = run(3), run(3), run(4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not all(np.array_equal(a[k], c[k]) for k in a)


def test_max_steps_and_grad_accumulation_count_optimizer_steps(mlp_bundle):
    session = TrainingSession(mlp_bundle)
    data = _data(session)  # 64 rows, batch 8: 8 batches an epoch
    report = session.train(data, TrainConfig(epochs=3, grad_accumulation=2))
    assert report.steps == 12 and report.stopped == "complete" and len(report.epoch_losses) == 3
    report = session.train(data, TrainConfig(epochs=3, max_steps=5))
    assert report.steps == 5 and report.stopped == "max_steps" and session.step == 17


def test_balanced_sampling_evens_out_skewed_labels(mlp_bundle):
    session = TrainingSession(mlp_bundle)
    rng = np.random.default_rng(0)
    labels = np.where(rng.random(400) < 0.9, 0, rng.integers(1, 4, 400))  # 90% class 0
    data = session.dataset({"x": rng.normal(size=(400, 16)).astype(np.float32)}, labels)
    order = session._epoch_order(data.labels, TrainConfig(balanced=True), Progress())
    shares = np.bincount(labels[order], minlength=4) / len(order)
    assert np.abs(shares - 0.25).max() < 0.07
    plain = session._epoch_order(data.labels, TrainConfig(), Progress())
    assert sorted(plain) == list(range(400))
    report = session.train(data, TrainConfig(epochs=1, balanced=True))
    assert report.steps == 50


def test_cancel_and_time_budget_stop_cleanly_and_resume(mlp_bundle, tmp_path):
    config = TrainConfig(epochs=4)  # 32 steps
    session = TrainingSession(mlp_bundle)
    data = _data(session)
    calls = {"n": 0}

    def cancel_after_ten() -> bool:
        calls["n"] += 1
        return calls["n"] > 10

    report = session.train(data, config, checkpoint_dir=tmp_path / "ck", cancel=cancel_after_ten)
    assert report.stopped == "cancelled" and report.steps == 10
    assert (report.resumed_from, report.run_steps, report.total_steps) == (None, 10, 32)
    assert read_state(tmp_path / "ck", session.manifest.base_fingerprint)[1].step == 10

    resumed = TrainingSession(mlp_bundle)
    report = resumed.train(data, config, checkpoint_dir=tmp_path / "ck", checkpoint_every=4)
    assert report.stopped == "complete" and report.steps == 22 and resumed.step == 32
    assert (report.resumed_from, report.resumed_checkpoint, report.run_steps, report.total_steps) == (10, True, 32, 32)
    assert not report.already_complete and report.median_step_ms > 0
    again = TrainingSession(mlp_bundle)
    report = again.train(data, config, checkpoint_dir=tmp_path / "ck")  # a finished run is not repeated
    assert report.steps == 0 and report.already_complete and report.stopped == "complete"
    assert report.median_step_ms is None and (report.run_steps, report.total_steps) == (32, 32)
    assert _same(again.trainable_values(), resumed.trainable_values())  # the session holds the run's result

    slow = TrainingSession(mlp_bundle)
    report = slow.train(data, TrainConfig(epochs=4, max_seconds=0.1), lambda *_: time.sleep(0.02))
    assert report.stopped == "max_seconds" and 0 < report.steps < 32
    # a budget shorter than anything still takes one step, so calls under it move the run on
    report = slow.train(data, TrainConfig(epochs=4, max_seconds=1e-9))
    assert report.stopped == "max_seconds" and report.steps == 1 and report.resumed_from == report.run_steps - 1


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return set(a) == set(b) and all(np.array_equal(a[k], b[k]) for k in a)


def _files(directory) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


def _cancel_after(steps: int):
    calls = iter(range(10**6))
    return lambda: next(calls) >= steps


def test_a_checkpoint_of_another_run_is_refused_before_anything_is_restored(mlp_bundle, tmp_path):
    config = TrainConfig(epochs=4)
    first = TrainingSession(mlp_bundle)
    data = _data(first)
    first.train(data, config, checkpoint_dir=tmp_path / "ck", cancel=_cancel_after(3))  # a run from the bundle
    on_disk = _files(tmp_path / "ck")

    session = TrainingSession(mlp_bundle)
    session.train(data, TrainConfig(epochs=1, learning_rate=1e-2))  # the caller's own adapter, 8 steps
    session.save_adapter(tmp_path / "adapter")
    mine = session.trainable_values()
    for config_here in (config, TrainConfig(epochs=4, batch_size=16)):  # same settings but other start; other config
        with pytest.raises(BundleError, match="belongs to another run") as error:
            session.train(data, config_here, checkpoint_dir=tmp_path / "ck")
        assert _same(session.trainable_values(), mine) and session.step == 8
        assert _files(tmp_path / "ck") == on_disk
    assert "`batch_size` 8 there, 16 here" in str(error.value) and "started from" in str(error.value)

    loaded = TrainingSession(mlp_bundle)  # as the CLI's `train --adapter A --checkpoint-dir ck`
    loaded.load_adapter(tmp_path / "adapter")
    with pytest.raises(BundleError, match="belongs to another run"):
        loaded.train(data, config, checkpoint_dir=tmp_path / "ck")

    report = loaded.train(data, config, checkpoint_dir=tmp_path / "ck", replace_other_run=True)
    assert report.replaced_run and report.resumed_from is None and report.steps == 32
    assert read_state(tmp_path / "ck", loaded.manifest.base_fingerprint)[1].step == 32


def test_the_same_size_of_other_data_starts_a_new_run(mlp_bundle, tmp_path):
    config = TrainConfig(epochs=4)  # 32 steps
    session = TrainingSession(mlp_bundle)
    data = _data(session)
    other = data.take(np.arange(64)[::-1])  # the same examples in another order: other data, same size
    session.train(data, config, checkpoint_dir=tmp_path / "ck", cancel=_cancel_after(10))
    with pytest.raises(BundleError, match="another run \\(other data\\)"):
        TrainingSession(mlp_bundle).train(other, config, checkpoint_dir=tmp_path / "ck")
    report = session.train(other, config)  # in memory: the cancelled run is not continued on other data
    assert report.steps == 32 and report.resumed_from is None
    session.train(data, config, cancel=_cancel_after(10))
    report = session.train(data, config)  # the same data and config continue the cancelled run
    assert report.steps == 22 and report.resumed_from == 10


def test_resume_refuses_a_different_run_or_a_corrupted_state(mlp_bundle, tmp_path):
    session = TrainingSession(mlp_bundle)
    data = _data(session)
    session.train(data, TrainConfig(epochs=1, max_steps=3), checkpoint_dir=tmp_path / "ck")
    checkpoint = next(p for p in (tmp_path / "ck").iterdir() if p.name.startswith("checkpoint-"))
    blob = bytearray(checkpoint.read_bytes())
    blob[len(blob) // 2] ^= 0x01
    checkpoint.write_bytes(bytes(blob))
    with pytest.raises(BundleError, match="is corrupted"):
        TrainingSession(mlp_bundle, state=tmp_path / "ck")
    (tmp_path / "ck" / PROGRESS).write_text("{}")
    with pytest.raises(BundleError, match="malformed"):
        TrainingSession(mlp_bundle, state=tmp_path / "ck")


KILLABLE = textwrap.dedent(
    """
    import json, sys, time
    import numpy as np
    from edgepeft.runtime import TrainConfig, TrainingSession

    bundle, checkpoints, out = sys.argv[1:4]
    session = TrainingSession(bundle)
    rng = np.random.default_rng(1)
    x = rng.normal(size=(96, 16)).astype(np.float32)
    data = session.dataset({"x": x}, x[:, :4].argmax(axis=1))
    config = TrainConfig(epochs=5, batch_size=8, learning_rate=5e-3, seed=7)
    session.train(data, config, lambda *_: time.sleep(0.03), checkpoint_dir=checkpoints, checkpoint_every=3)
    values = {k: v.tolist() for k, v in session.trainable_values().items()}
    with open(out, "w") as f:
        json.dump({"step": session.step, "values": values}, f)
    """
)
EXPECTED_STEPS = 5 * 12


def _start(bundle, checkpoints, out):
    return subprocess.Popen([sys.executable, "-c", KILLABLE, str(bundle), str(checkpoints), str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # fmt: skip


def test_sigkill_at_random_moments_then_resume_finishes_the_same_run(mlp_bundle, tmp_path):
    reference = _start(mlp_bundle, tmp_path / "reference-ck", tmp_path / "reference.json")
    assert reference.wait(timeout=300) == 0, reference.stderr.read().decode()[-2000:]
    expected = json.loads((tmp_path / "reference.json").read_text())
    assert expected["step"] == EXPECTED_STEPS

    rng = np.random.default_rng(int.from_bytes(os.urandom(4), "little"))
    kills, deadline = 0, time.monotonic() + 240
    out = tmp_path / "killed.json"
    while kills < 20 and time.monotonic() < deadline:
        process = _start(mlp_bundle, tmp_path / "ck", out)
        time.sleep(rng.uniform(0.3, 3.0))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
            if (tmp_path / "ck" / PROGRESS).exists():  # whatever moment it died at, the state verifies
                read_state(tmp_path / "ck", TrainingSession(mlp_bundle).manifest.base_fingerprint)
        elif out.exists():
            out.unlink()  # the run finished before the kill: start over to keep killing mid-run
            for path in (tmp_path / "ck").iterdir():
                path.unlink()
    assert kills >= 20, f"only {kills} kills landed in time"

    final = _start(mlp_bundle, tmp_path / "ck", out)
    assert final.wait(timeout=300) == 0, final.stderr.read().decode()[-2000:]
    result = json.loads(out.read_text())
    assert result["step"] == EXPECTED_STEPS
    for name, value in expected["values"].items():
        np.testing.assert_allclose(result["values"][name], value, rtol=1e-5, atol=1e-6)
