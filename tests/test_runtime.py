"""The device runtime on small bundles: bad input, broken files, adapters, and resuming training."""

from __future__ import annotations

import json
import platform
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_models
import torch
from conftest import export_tiny

from edgepeft import manifest as mf
from edgepeft.errors import AdapterError, BundleError, DataError, InputError
from edgepeft.export import LoraSpec, export
from edgepeft.runtime import TrainConfig, TrainingSession, open_bundle
from edgepeft.runtime.data import read_text_file


@pytest.fixture(scope="module")
def text_bundle(tmp_path_factory):
    out = tmp_path_factory.mktemp("text") / "bundle"
    export_tiny("textnet", out)
    return out


def _data(seed: int = 0, rows: int = 32):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(rows, 16)).astype(np.float32)
    return x, (x[:, :4].argmax(axis=1)).astype(np.int64)


# ---- bad arrays ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "features, message",
    [
        ({"x": np.zeros((2, 15), np.float32)}, r"'x' dimension 1 must be 16"),
        ({"x": np.zeros((2, 16, 1), np.float32)}, r"'x' must have 2 dimensions"),
        ({"x": np.zeros((2, 16), np.int64)}, r"'x' must be float32, got int64"),
        ({"x": np.full((2, 16), np.nan, np.float32)}, r"NaN"),
        ({"y": np.zeros((2, 16), np.float32)}, r"missing \['x'\], unknown \['y'\]"),
    ],
)
def test_wrong_inputs_are_named(mlp_bundle, features, message):
    session = TrainingSession(mlp_bundle)
    with pytest.raises(InputError, match=message):
        session.predict(features)


def test_float_tokens_are_refused(text_bundle):
    session = TrainingSession(text_bundle)
    with pytest.raises(InputError, match="'tokens' must be int64, got float32"):
        session.predict({"tokens": np.zeros((2, 10), np.float32)})


def test_float64_features_are_accepted_as_float32(mlp_bundle):
    x, _ = _data()
    session = TrainingSession(mlp_bundle)
    np.testing.assert_allclose(session.predict({"x": x.astype(np.float64)}).outputs, session.predict({"x": x}).outputs)


def test_labels_out_of_range_or_miscounted(mlp_bundle):
    x, y = _data()
    session = TrainingSession(mlp_bundle)
    with pytest.raises(InputError, match="label 4 is out of range: the bundle has 4 classes"):
        session.dataset({"x": x}, np.full(len(x), 4))
    with pytest.raises(InputError, match="31 labels for 32 examples"):
        session.dataset({"x": x}, y[:-1])
    with pytest.raises(InputError, match="training data is empty or has no labels"):
        session.train(session.dataset({"x": x}))
    with pytest.raises(InputError, match="evaluation data is empty"):
        session.evaluate(session.dataset({"x": x[:0]}, y[:0]))


# ---- data files ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("empty.csv", "text,label\n", "holds no examples"),
        ("empty.jsonl", "\n\n", "holds no examples"),
        ("nocol.csv", "words,label\nhello,a\n", "no `text` column"),
        ("bad.jsonl", '{"text": "a", "label": "x"}\n{"text": oops}\n', "line 2 is not valid JSON"),
        ("list.jsonl", '["a", "b"]\n', "line 1 is not an object with a `text` field"),
        ("blank.csv", "text,label\n ,emma\n", "row 1: `text` is missing or empty"),
        ("half.csv", "text,label\nhello,emma\nworld\n", "row 2: `label` is missing"),
        ("data.txt", "hello\n", "unknown data format"),
    ],
)
def test_malformed_data_files(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        read_text_file(path)


def test_invalid_utf8_and_missing_data_file(tmp_path):
    path = tmp_path / "latin1.csv"
    path.write_bytes("text,label\ncaf\xe9,emma\n".encode("latin-1"))
    with pytest.raises(DataError, match="not UTF-8"):
        read_text_file(path)
    with pytest.raises(DataError, match="does not exist"):
        read_text_file(tmp_path / "absent.csv")


def test_a_text_file_needs_a_tokenizer(mlp_bundle, tmp_path):
    path = tmp_path / "d.csv"
    path.write_text("text,label\nhello,0\n")
    with pytest.raises(BundleError, match="has no tokenizer.json"):
        TrainingSession(mlp_bundle).load_data(path)


# ---- broken bundles -----------------------------------------------------------------------------


def test_missing_bundle_file(mlp_bundle, tmp_path):
    broken = shutil.copytree(mlp_bundle, tmp_path / "b")
    (broken / mf.EVAL_MODEL).unlink()
    with pytest.raises(BundleError, match="eval_model.onnx is missing"):
        TrainingSession(broken)


def test_corrupted_bundle_file(mlp_bundle, tmp_path):
    broken = shutil.copytree(mlp_bundle, tmp_path / "b")
    data = bytearray((broken / mf.CHECKPOINT).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (broken / mf.CHECKPOINT).write_bytes(bytes(data))
    with pytest.raises(BundleError, match="checkpoint is corrupted"):
        open_bundle(broken)


def test_not_a_bundle_and_malformed_manifest(mlp_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        open_bundle(tmp_path / "nowhere")
    with pytest.raises(BundleError, match="manifest.json is missing"):
        open_bundle(tmp_path)
    broken = shutil.copytree(mlp_bundle, tmp_path / "b")
    (broken / mf.MANIFEST_FILE).write_text("{not json")
    with pytest.raises(BundleError, match="not valid JSON"):
        open_bundle(broken)
    manifest = json.loads((mlp_bundle / mf.MANIFEST_FILE).read_text())
    del manifest["trainable"]
    (broken / mf.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="malformed: KeyError: 'trainable'"):
        open_bundle(broken)
    manifest = json.loads((mlp_bundle / mf.MANIFEST_FILE).read_text())
    manifest["files"]["../../etc/passwd"] = "0" * 64
    (broken / mf.MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(BundleError, match="points outside the bundle"):
        open_bundle(broken)


# ---- adapters -----------------------------------------------------------------------------------


def test_adapter_round_trip(mlp_bundle, tmp_path):
    x, y = _data()
    session = TrainingSession(mlp_bundle)
    session.train(session.dataset({"x": x}, y), TrainConfig(epochs=3, learning_rate=1e-2))
    trained = session.predict({"x": x}).outputs
    session.save_adapter(tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]

    fresh = TrainingSession(mlp_bundle)
    assert not np.allclose(fresh.predict({"x": x}).outputs, trained)
    fresh.load_adapter(tmp_path / "adapter")
    np.testing.assert_array_equal(fresh.predict({"x": x}).outputs, trained)


def test_adapter_for_a_different_base_is_refused(mlp_bundle, tmp_path):
    TrainingSession(mlp_bundle).save_adapter(tmp_path / "adapter")
    model, example = tiny_models.mlp()
    with torch.no_grad():
        model.fc2.weight.mul_(1.01)
    export(model, tmp_path / "other", example_inputs=example,
           lora=LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",)))  # fmt: skip
    other = TrainingSession(tmp_path / "other")
    before = other.trainable_values()
    with pytest.raises(AdapterError, match="made for a different base model"):
        other.load_adapter(tmp_path / "adapter")
    after = other.trainable_values()
    assert all(np.array_equal(before[k], after[k]) for k in before)


def test_adapter_with_other_shapes_or_broken_files_is_refused(mlp_bundle, tmp_path):
    export_tiny("mlp", tmp_path / "r4", r=4)
    TrainingSession(tmp_path / "r4").save_adapter(tmp_path / "adapter4")
    session = TrainingSession(mlp_bundle)
    with pytest.raises(AdapterError, match="made for a different base model|has shape|r is 4"):
        session.load_adapter(tmp_path / "adapter4")

    session.save_adapter(tmp_path / "adapter")
    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(AdapterError, match="cannot be read"):
        session.load_adapter(tmp_path / "adapter")
    (tmp_path / "adapter" / "adapter_config.json").write_text("[1, 2]")
    with pytest.raises(AdapterError, match="does not hold a JSON object"):
        session.load_adapter(tmp_path / "adapter")
    with pytest.raises(AdapterError, match="config .* is missing"):
        session.load_adapter(tmp_path / "nowhere")


# ---- training state -----------------------------------------------------------------------------


def test_resumed_training_continues_exactly(mlp_bundle, tmp_path):
    """Optimizer moments and step count survive save_state: split training equals straight training."""
    x, y = _data(rows=16)
    config = TrainConfig(epochs=2, batch_size=4, learning_rate=5e-3, shuffle=False)
    straight = TrainingSession(mlp_bundle)
    data = straight.dataset({"x": x}, y)
    straight.train(data, config)
    straight.train(data, config)

    first = TrainingSession(mlp_bundle)
    first.train(data, config)
    first.save_state(tmp_path / "state")
    resumed = TrainingSession(mlp_bundle, state=tmp_path / "state")
    assert resumed.step == first.step == 8
    resumed.train(data, config)
    for name, value in straight.trainable_values().items():
        np.testing.assert_allclose(resumed.trainable_values()[name], value, rtol=1e-5, atol=1e-7)

    restarted = TrainingSession(mlp_bundle)  # no optimizer state: a different result, so the test can fail
    restarted.load_adapter(first.save_adapter(tmp_path / "adapter"))
    restarted.train(data, config)
    differs = [
        not np.allclose(restarted.trainable_values()[n], v, atol=1e-7) for n, v in straight.trainable_values().items()
    ]
    assert any(differs)


def test_state_from_another_bundle_is_refused(mlp_bundle, text_bundle, tmp_path):
    TrainingSession(text_bundle).save_state(tmp_path / "state")
    with pytest.raises(BundleError, match="belongs to a different bundle"):
        TrainingSession(mlp_bundle, state=tmp_path / "state")
    with pytest.raises(BundleError, match="is not a saved training state"):
        TrainingSession(mlp_bundle, state=tmp_path / "nowhere")


_DENORMAL_PROBE = """
import sys
import numpy as np
from edgepeft.runtime import TrainConfig, TrainingSession
tiny = np.float32(1e-39)  # a denormal float32
assert tiny * np.float32(1.0) != 0  # kept before any session
session = TrainingSession(sys.argv[1], threads=1)
rng = np.random.default_rng(0)
x = rng.normal(size=(8, 16)).astype(np.float32)
session.train(session.dataset({"x": x}, x[:, :4].argmax(axis=1)), TrainConfig(batch_size=4, max_steps=1))
print(float(tiny * np.float32(1.0)))
"""


@pytest.mark.skipif(platform.machine().lower() not in ("x86_64", "amd64"), reason="ORT flushes denormals on x86")
def test_training_flushes_denormal_floats_to_zero(mlp_bundle):
    """A training session makes ORT treat denormals as 0 (`runtime.ort.session_options`: a causal mask's softmax
    produces them, and x86 computes on them at a fraction of its speed). ORT sets the flags on its threads and,
    for a process's first session, on the calling thread too, which a fresh process shows through numpy."""
    done = subprocess.run([sys.executable, "-c", _DENORMAL_PROBE, str(mlp_bundle)], capture_output=True, text=True,
                          timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert float(done.stdout.split()[-1]) == 0.0
