"""The adapter store, hot swapping, standalone inference export, early stopping, and never storing worse."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import numpy as np
import onnxruntime
import pytest

from edgepeft.errors import AdapterError, InputError
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.fit import fit, split_validation
from edgepeft.runtime.store import AdapterStore


def _task(session, rows=256, seed=1, shuffled=False):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    y = x[:, :4].argmax(axis=1)
    if shuffled:
        y = rng.permutation(y)
    return session.dataset({"x": x}, y)


def test_store_save_list_activate_delete(mlp_bundle, tmp_path):
    session = TrainingSession(mlp_bundle)
    store = AdapterStore(tmp_path / "store", session.manifest)
    assert store.list() == [] and store.active is None
    assert store.save("alice", session.trainable_values(), steps=0, score=0.5)
    session.train(_task(session), TrainConfig(epochs=1, learning_rate=1e-2))
    assert store.save("bob", session.trainable_values(), steps=session.step, score=0.7)
    assert [(i.name, i.steps, i.score) for i in store.list()] == [("alice", 0, 0.5), ("bob", 32, 0.7)]
    assert store.info("bob").base_fingerprint == session.manifest.base_fingerprint
    store.activate("bob")
    assert store.active == "bob"
    store.delete("bob")
    assert store.active is None and [i.name for i in store.list()] == ["alice"]
    for bad in ("../escape", "/etc", "a/b", "", "." * 3):
        with pytest.raises(AdapterError, match="is not allowed"):
            store.save(bad, session.trainable_values(), steps=0)
    with pytest.raises(AdapterError, match="no adapter named 'carol'"):
        store.load("carol")


def test_hot_swap_changes_predictions_without_reopening(mlp_bundle, tmp_path):
    session = TrainingSession(mlp_bundle)
    store = AdapterStore(tmp_path / "store", session.manifest)
    x = _task(session).features
    store.save("base", session.trainable_values(), steps=0)
    base_out = session.predict(x).outputs
    session.train(_task(session), TrainConfig(epochs=2, learning_rate=1e-2))
    store.save("tuned", session.trainable_values(), steps=session.step)
    tuned_out = session.predict(x).outputs
    assert not np.allclose(base_out, tuned_out)
    module = session._module
    session.set_trainable(store.load("base"))
    np.testing.assert_array_equal(session.predict(x).outputs, base_out)
    session.set_trainable(store.load("tuned"))
    np.testing.assert_array_equal(session.predict(x).outputs, tuned_out)
    assert session._module is module  # same ORT module: the base was not reloaded
    with pytest.raises(InputError, match="must have shape"):
        session.set_trainable({k: v[..., :1] for k, v in session.trainable_values().items()})


def test_standalone_inference_model_runs_in_a_plain_session(mlp_bundle, tmp_path):
    session = TrainingSession(mlp_bundle)
    data = _task(session)
    session.train(data, TrainConfig(epochs=1, learning_rate=1e-2))
    path = session.export_inference(tmp_path / "model.onnx")
    plain = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (output,) = plain.run(None, data.features)
    np.testing.assert_allclose(output, session.predict(data.features).outputs, atol=1e-6)
    assert path.stat().st_size < 0.5 * (mlp_bundle / "checkpoint").stat().st_size + 50_000


LOCK_HOLDER = textwrap.dedent(
    """
    import sys, time
    from edgepeft.runtime import open_bundle
    from edgepeft.runtime.store import AdapterStore
    store = AdapterStore(sys.argv[2], open_bundle(sys.argv[1]).manifest)
    with store.lock():
        print("locked", flush=True)
        time.sleep(30)
    """
)


def test_a_second_writer_gets_a_clear_error(mlp_bundle, tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(mlp_bundle), str(tmp_path / "store")],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        session = TrainingSession(mlp_bundle)
        store = AdapterStore(tmp_path / "store", session.manifest)
        with pytest.raises(AdapterError, match="is in use by another process"):
            store.save("alice", session.trainable_values(), steps=0)
        assert store.list() == []
    finally:
        holder.kill()
        holder.wait()
    store.save("alice", session.trainable_values(), steps=0)  # free again once the other process is gone


def test_fit_keeps_the_best_and_bad_data_never_replaces_a_better_adapter(mlp_bundle, tmp_path):
    session = TrainingSession(mlp_bundle)
    store = AdapterStore(tmp_path / "store", session.manifest)
    train, validation = split_validation(_task(session, rows=320), fraction=0.2)
    good = fit(
        session, train, validation, TrainConfig(epochs=6, learning_rate=1e-2), eval_every=10, store=store, name="me"
    )
    assert good.stored and good.best_score > 0.6 and good.best_score > good.scores[0]
    assert session.evaluate(validation).accuracy == good.best_score  # the best parameters are left in the session
    stored_values = store.load("me")
    check = TrainingSession(mlp_bundle)
    check.set_trainable(stored_values)
    assert check.evaluate(validation).accuracy == good.best_score == store.info("me").score  # and stored

    for seed in range(3):  # deliberately bad data: shuffled labels, validated on the app's trusted split
        noisy = TrainingSession(mlp_bundle)
        noisy.set_trainable(store.load("me"))
        bad = _task(noisy, rows=320, seed=10 + seed, shuffled=True)
        report = fit(noisy, bad, validation, TrainConfig(epochs=4, learning_rate=3e-2, seed=seed), eval_every=5,
                     patience=1, store=store, name="me")  # fmt: skip
        assert not report.stored
        assert all(np.array_equal(store.load("me")[k], v) for k, v in stored_values.items())
        assert store.info("me").score == good.best_score


def test_non_finite_loss_stops_and_keeps_the_last_good_parameters(mlp_bundle):
    session = TrainingSession(mlp_bundle)
    data = _task(session)
    report = session.train(data, TrainConfig(epochs=50, learning_rate=1e30))
    assert report.stopped == "non_finite"
    report = TrainingSession(mlp_bundle).train(data, TrainConfig(epochs=50, learning_rate=1e30, grad_accumulation=3))
    assert report.stopped == "non_finite"
    assert all(np.isfinite(v).all() for v in session.trainable_values().values())
    assert np.isfinite(session.evaluate(data).loss)


def test_fit_rejects_bad_arguments(mlp_bundle):
    session = TrainingSession(mlp_bundle)
    data = _task(session)
    with pytest.raises(InputError, match="eval_every"):
        fit(session, data, data, TrainConfig(), eval_every=0)
    with pytest.raises(InputError, match="cannot hold out"):
        split_validation(data.take(np.arange(1)))


FIT_WRITER = textwrap.dedent(
    """
    import json, pathlib, sys, time
    import numpy as np
    from edgepeft.runtime import TrainConfig, TrainingSession
    from edgepeft.runtime.fit import fit, split_validation
    from edgepeft.runtime.store import AdapterStore
    bundle, root, comparing, go = sys.argv[1:5]
    session = TrainingSession(bundle)
    store = AdapterStore(root, session.manifest)
    load = store.load

    def load_then_wait(name):  # the stored adapter is read for the comparison: let the other writer go now
        values = load(name)
        pathlib.Path(comparing).touch()
        while not pathlib.Path(go).exists():
            time.sleep(0.01)
        return values

    store.load = load_then_wait
    rng = np.random.default_rng(1)
    x = rng.normal(size=(320, 16)).astype(np.float32)
    train, validation = split_validation(session.dataset({"x": x}, x[:, :4].argmax(axis=1)), fraction=0.2)
    report = fit(session, train, validation, TrainConfig(epochs=1, max_steps=4, learning_rate=1e-2), eval_every=2,
                 store=store, name="me")
    print(json.dumps({"stored": report.stored, "best": report.best_score}))
    """
)


def test_compare_and_save_is_one_locked_step_so_a_concurrent_better_save_is_not_replaced(mlp_bundle, tmp_path):
    """Process A compares its adapter with the stored one; meanwhile process B (here) stores a much better one.
    B must either be refused (the store is busy) or keep its adapter: A may not replace it with a worse one."""
    import json

    session = TrainingSession(mlp_bundle)
    store = AdapterStore(tmp_path / "store", session.manifest)
    store.save("me", session.trainable_values(), steps=0)  # untrained: A's short run beats it
    train, validation = split_validation(_task(session, rows=320), fraction=0.2)
    fit(session, train, validation, TrainConfig(epochs=6, learning_rate=1e-2), eval_every=10)
    better = session.evaluate(validation).accuracy
    comparing, go = tmp_path / "comparing", tmp_path / "go"
    writer = subprocess.Popen([sys.executable, "-c", FIT_WRITER, str(mlp_bundle), str(tmp_path / "store"),
                               str(comparing), str(go)], stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        for _ in range(3000):
            if comparing.exists() or writer.poll() is not None:
                break
            time.sleep(0.02)
        assert comparing.exists(), "the other writer never compared"
        try:
            store.save("me", session.trainable_values(), steps=session.step, score=better)
            refused = None
        except AdapterError as e:
            refused = str(e)
    finally:
        go.touch()
        out, _ = writer.communicate(timeout=120)
    assert writer.returncode == 0
    a = json.loads(out.strip().splitlines()[-1])
    assert a["stored"] and a["best"] < better  # A's adapter is worse than B's, and A stored it over the untrained
    final = TrainingSession(mlp_bundle)
    final.set_trainable(store.load("me"))
    kept = final.evaluate(validation).accuracy
    assert refused is not None or kept >= better, f"B's adapter ({better}) was replaced by A's worse one ({kept})"
    assert refused is None or ("is in use by another process" in refused and kept == a["best"])


def test_a_store_refuses_a_bundle_it_does_not_belong_to(tmp_path):
    """Same base model, another rank: `adapters list/activate` with the wrong --bundle are refused."""
    from click.testing import CliRunner
    from conftest import export_tiny

    from edgepeft.cli import main

    rank4, rank8 = tmp_path / "rank4", tmp_path / "rank8"
    export_tiny("mlp", rank4, r=4)
    export_tiny("mlp", rank8, r=8)
    session = TrainingSession(rank8)
    store = AdapterStore(tmp_path / "store", session.manifest)
    store.save("me", session.trainable_values(), steps=0)
    with pytest.raises(AdapterError, match="belongs to another bundle: fc1.lora_A.default.weight has shape"):
        AdapterStore(tmp_path / "store", TrainingSession(rank4).manifest)
    for command in (["list", str(tmp_path / "store")], ["activate", str(tmp_path / "store"), "me"]):
        result = CliRunner().invoke(main, ["adapters", *command, "--bundle", str(rank4)])
        assert result.exit_code == 1 and "belongs to another bundle" in result.output
    assert AdapterStore(tmp_path / "store", session.manifest).list()[0].name == "me"  # the right bundle opens it
