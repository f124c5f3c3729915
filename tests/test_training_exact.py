"""The training loop does exactly what it says: accumulated steps are big-batch steps, the schedule advances per
optimizer step, and a swapped-in adapter trains as it would in a fresh session. Checked on fp32 bundles, where
ORT's arithmetic is exact enough to compare parameters to 1e-6, and on the default int8 + AdamW bundle.

Accumulation is not compared on the int8 bundle: its activations are quantized with a scale taken over the
whole batch, so a batch's gradient depends on which examples share it (the mean gradient of 2 x 4 differs
from that of 1 x 8 by up to ~1% on the tiny MLP), and no runtime arithmetic can make them equal."""

from __future__ import annotations

import numpy as np
import pytest

from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.store import AdapterStore


def _export_fp32(out, optimizer: str):
    import tiny_models

    from edgepeft.export import ExportOptions, LoraSpec, export

    model, example = tiny_models.mlp()
    lora = LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",))
    options = ExportOptions(quantization="fp32", optimizer=optimizer)
    export(model, out, example_inputs=example, lora=lora, options=options)
    return out


@pytest.fixture(scope="module")
def sgd_bundle(tmp_path_factory):
    return _export_fp32(tmp_path_factory.mktemp("sgd") / "bundle", "sgd")


@pytest.fixture(scope="module")
def adamw_fp32_bundle(tmp_path_factory):
    return _export_fp32(tmp_path_factory.mktemp("adamw") / "bundle", "adamw")


def _data(session: TrainingSession, rows: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return session.dataset({"x": x}, x[:, :4].argmax(axis=1))


def _trained(bundle, config: TrainConfig, rows: int = 60) -> dict[str, np.ndarray]:
    session = TrainingSession(bundle)
    session.train(_data(session, rows), config)
    return session.trainable_values()


def _max_difference(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> float:
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


SCHEDULE = {"epochs": 2, "learning_rate": 0.05, "schedule": "linear", "warmup_steps": 2, "seed": 3}


@pytest.mark.parametrize("bundle", ["sgd_bundle", "adamw_fp32_bundle"])
@pytest.mark.parametrize(
    "micro, big",
    [((4, 2), 8),  # 60 rows: 7 steps of 4 + 4 and a last one of a single 4, against batches of 8 (the last 4)
     ((8, 2), 16)],  # the last step is 8 + 4 (a short micro-batch, weighted by its examples) against one of 12
)  # fmt: skip
def test_accumulated_micro_batches_make_the_big_batch_step(bundle, micro, big, request):
    bundle = request.getfixturevalue(bundle)
    size, accumulation = micro
    accumulated = _trained(bundle, TrainConfig(batch_size=size, grad_accumulation=accumulation, **SCHEDULE))
    one_batch = _trained(bundle, TrainConfig(batch_size=big, **SCHEDULE))
    moved = _max_difference(one_batch, TrainingSession(bundle).trainable_values())
    assert moved > 1e-2  # the comparison below means something
    assert _max_difference(accumulated, one_batch) < 1e-6


def test_the_schedule_advances_once_per_optimizer_step(sgd_bundle):
    """With SGD, a step moves the parameters by -lr * gradient: the deltas reveal each learning rate applied."""
    config = TrainConfig(batch_size=4, grad_accumulation=2, learning_rate=0.1, schedule="linear", warmup_steps=2,
                         shuffle=False)  # fmt: skip
    session = TrainingSession(sgd_bundle)
    data = _data(session, 64)  # 16 batches of 4: 8 optimizer steps of 8 examples
    snapshots = [session.trainable_values()]
    report = session.train(data, config, lambda *_: snapshots.append(session.trainable_values()))
    assert report.steps == report.total_steps == 8
    applied = []
    for step in range(8):
        probe = TrainingSession(sgd_bundle)  # the gradient of the step's 8 examples, at the step's parameters
        probe.set_trainable(snapshots[step])
        probe.train(data.take(np.arange(step * 8, step * 8 + 8)), TrainConfig(batch_size=8, learning_rate=1.0))
        gradient = np.concatenate([(snapshots[step][k] - v).ravel() for k, v in probe.trainable_values().items()])
        delta = np.concatenate([(snapshots[step][k] - snapshots[step + 1][k]).ravel() for k in snapshots[step]])
        lr = float(delta @ gradient / (gradient @ gradient))
        np.testing.assert_allclose(delta, lr * gradient, atol=1e-6)  # the whole step is along that gradient
        applied.append(lr)
    np.testing.assert_allclose(applied, [config.learning_rate_at(s, 8) for s in range(8)], rtol=1e-4)


@pytest.mark.parametrize("bundle", ["mlp_bundle", "adamw_fp32_bundle"])
def test_a_swapped_in_adapter_trains_as_in_a_fresh_session(bundle, request, tmp_path):
    bundle = request.getfixturevalue(bundle)
    session = TrainingSession(bundle)
    store = AdapterStore(tmp_path / "store", session.manifest)
    rng = np.random.default_rng(5)
    store.save("b", {k: v + rng.normal(scale=0.05, size=v.shape).astype(np.float32)
                     for k, v in session.trainable_values().items()}, steps=0)  # fmt: skip
    data = _data(session, 64)
    config = TrainConfig(epochs=1, learning_rate=1e-2, max_steps=5)
    calls = iter(range(100))
    session.train(data, config, cancel=lambda: next(calls) >= 3)  # adapter A: 3 steps, AdamW moments, run unfinished
    session.set_trainable(store.load("b"))
    swapped = session.train(data, config)
    fresh = TrainingSession(bundle)
    fresh.set_trainable(store.load("b"))
    fresh.train(data, config)
    assert swapped.steps == 5 and swapped.resumed_from is None  # a new run, not the tail of A's
    assert _max_difference(session.trainable_values(), fresh.trainable_values()) < 1e-6
