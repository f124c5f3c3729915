"""The exporter on small torch models: Linear, Conv (with BatchNorm), Embedding + LayerNorm."""

from __future__ import annotations

import copy
import json

import numpy as np
import onnx
import pytest
import tiny_models
import torch
from conftest import export_tiny
from torch import nn

from edgepeft import manifest as mf
from edgepeft.errors import ExportError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.ort import onnxruntime_module, training_api

# Tolerances, ORT eval output against torch's eval output of the same fp32 model:
FP32_ATOL = 1e-4
# int8 symmetric per-channel weights: the logits move by at most 1% of their largest magnitude.
INT8_RTOL_OF_MAX = 1e-2

MODELS = ["mlp", "convnet", "textnet"]


def _reference(name: str):
    model, example = getattr(tiny_models, name)()
    return model.eval(), example


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("quantization", ["fp32", "int8"])
def test_ort_eval_output_matches_torch(tmp_path, name, quantization):
    model, example = _reference(name)
    with torch.no_grad():
        expected = model(*example.values()).numpy()
    export_tiny(name, tmp_path / "b", quantization=quantization)
    session = TrainingSession(tmp_path / "b")
    got = session.predict({k: v.numpy() for k, v in example.items()}).outputs
    if quantization == "fp32":
        np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0)
    else:
        assert np.abs(got - expected).max() <= INT8_RTOL_OF_MAX * np.abs(expected).max()
        assert not np.allclose(got, expected, atol=1e-7), "int8 weights should change the output a little"


@pytest.mark.parametrize("name", MODELS)
def test_training_lowers_the_loss(tmp_path, name):
    _, example = _reference(name)
    export_tiny(name, tmp_path / "b")
    session = TrainingSession(tmp_path / "b")
    data = session.dataset({k: v.numpy() for k, v in example.items()}, np.array([0, 1, 2, 3]))
    before = session.evaluate(data).loss
    frozen_before = session.trainable_values()
    session.train(data, TrainConfig(epochs=40, batch_size=4, learning_rate=1e-2))
    assert session.evaluate(data).loss < 0.8 * before
    changed = [n for n, v in session.trainable_values().items() if not np.array_equal(v, frozen_before[n])]
    assert changed, "no trainable parameter moved"


def test_only_adapter_parts_are_trainable_and_the_backbone_is_int8(tmp_path):
    manifest = export_tiny("mlp", tmp_path / "b")
    names = {p.name for p in manifest.trainable}
    assert names == {
        "fc1.lora_A.default.weight", "fc1.lora_B.default.weight",
        "fc2.lora_A.default.weight", "fc2.lora_B.default.weight",
        "head.modules_to_save.default.weight", "head.modules_to_save.default.bias",
    }  # fmt: skip
    keys = {p.adapter_key for p in manifest.trainable}
    assert "base_model.model.fc1.lora_A.weight" in keys and "base_model.model.head.weight" in keys
    inference = onnx.load(str(tmp_path / "b" / mf.INFERENCE_MODEL))
    dtypes = {i.name: i.data_type for i in inference.graph.initializer}
    assert dtypes["fc1.base_layer.weight.int8"] == onnx.TensorProto.INT8
    assert "fc1.base_layer.weight" not in dtypes  # no fp32 copy of a frozen weight is stored
    assert manifest.stats["quantized_weights"] == 2
    # lora_B starts at zero: the adapted model equals the base at step 0 (not merged by the exporter)
    session = TrainingSession(tmp_path / "b")
    values = session.trainable_values()
    assert not values["fc1.lora_B.default.weight"].any() and values["fc1.lora_A.default.weight"].any()


def test_manifest_records_inputs_versions_and_checksums(tmp_path):
    manifest = export_tiny("textnet", tmp_path / "b")
    assert manifest.inputs == (mf.TensorSpec("tokens", "int64", ("batch", 10)),)
    assert manifest.outputs[0].name == "output" and manifest.outputs[0].shape == ("batch", 4)
    assert manifest.versions["onnxruntime"] == "1.19.2" and manifest.versions["onnx"] == "1.17.0"
    assert set(manifest.files) >= {
        mf.TRAINING_MODEL,
        mf.EVAL_MODEL,
        mf.OPTIMIZER_MODEL,
        mf.CHECKPOINT,
        mf.INFERENCE_MODEL,
    }
    assert len(manifest.base_fingerprint) == 64
    on_disk = json.loads((tmp_path / "b" / mf.MANIFEST_FILE).read_text())
    assert mf.Manifest.from_dict(on_disk) == manifest


def test_export_is_reproducible(tmp_path):
    first, second = export_tiny("mlp", tmp_path / "a"), export_tiny("mlp", tmp_path / "b")
    # Same sha256 for every file holding weights or graphs (lora_A and head init included); ORT gives
    # the optimizer graph's nodes fresh unique names on each build, so that file alone differs.
    for name in (mf.CHECKPOINT, mf.TRAINING_MODEL, mf.EVAL_MODEL, mf.INFERENCE_MODEL):
        assert first.files[name] == second.files[name], name


def test_fingerprint_is_the_same_for_int8_and_fp32_and_differs_between_bases(tmp_path):
    a = export_tiny("mlp", tmp_path / "a", quantization="int8")
    b = export_tiny("mlp", tmp_path / "b", quantization="fp32")
    assert a.base_fingerprint == b.base_fingerprint
    model, example = tiny_models.mlp()
    with torch.no_grad():
        model.fc2.weight.add_(0.01)
    c = export(
        model, tmp_path / "c", example_inputs=example, lora=LoraSpec(target_modules=("fc1",), modules_to_save=("head",))
    )
    assert c.base_fingerprint != a.base_fingerprint


@pytest.mark.parametrize(
    "bias, expected",
    [("none", set()), ("all", {"fc1.base_layer.bias", "fc2.bias"}), ("lora_only", {"fc1.base_layer.bias"})],
)
def test_bias_modes(tmp_path, bias, expected):
    manifest = export_tiny("mlp", tmp_path / "b", target_modules=("fc1",), bias=bias)
    biases = {p.name for p in manifest.trainable if p.name.endswith("bias") and not p.name.startswith("head")}
    assert biases == expected


def test_lora_dropout_trains_but_no_inference_graph_applies_it(tmp_path):
    export_tiny("mlp", tmp_path / "b", quantization="fp32", dropout=0.3)
    training = onnx.load(str(tmp_path / "b" / mf.TRAINING_MODEL))
    assert sum(node.op_type == "Dropout" for node in training.graph.node) == 2  # one per LoRA layer
    session = TrainingSession(tmp_path / "b")
    values = session.trainable_values()
    rng = np.random.default_rng(0)
    for name in values:  # lora_B nonzero: with it at zero, dropout on and off give the same output
        if "lora_B" in name:
            values[name] = rng.standard_normal(values[name].shape).astype(np.float32)
    session.set_trainable(values)
    x = {"x": rng.standard_normal((4, 16)).astype(np.float32)}
    predicted = session.predict(x).outputs  # the eval graph
    np.testing.assert_array_equal(session.predict(x).outputs, predicted)
    session.export_inference(tmp_path / "exported.onnx")
    inference = onnx.load(str(tmp_path / "b" / mf.INFERENCE_MODEL))
    for init in inference.graph.initializer:  # the bundle's inference.onnx with the trained values written in
        if init.name in values:
            init.CopyFrom(onnx.numpy_helper.from_array(values[init.name], init.name))
    for model in (str(tmp_path / "exported.onnx"), inference.SerializeToString()):
        runs = [onnxruntime_module().InferenceSession(model).run(None, x)[0] for _ in range(2)]
        np.testing.assert_allclose(runs[0], predicted, atol=1e-6, rtol=0)
        np.testing.assert_array_equal(runs[1], runs[0])
    # ... while training, it is on: two forward passes of the training graph differ
    api = training_api()
    module = api.Module(str(tmp_path / "b" / mf.TRAINING_MODEL), session._state)
    module.train()
    labels = np.zeros(4, dtype=np.int64)
    assert not np.array_equal(module(x["x"], labels)[1], module(x["x"], labels)[1])


def test_export_leaves_the_callers_model_untouched(tmp_path):
    model, example = tiny_models.mlp()
    model.train()
    before = {name: value.clone() for name, value in model.state_dict().items()}
    export(model, tmp_path / "b", example_inputs=example, lora=LoraSpec(target_modules=("fc1", "fc2")))
    assert model.training
    assert all(p.requires_grad for p in model.parameters())
    assert not [name for name, _ in model.named_modules() if "lora" in name]
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize(
    "trained", [{"bias": "all"}, {"modules_to_save": ("head", "norm")}], ids=["bias_all", "norm_saved"]
)
def test_batchnorm_uses_its_running_statistics_in_training_too(tmp_path, trained):
    """Whichever BatchNorm parameters train, training and evaluation normalise with the same statistics."""
    model, example = tiny_models.convnet()
    lora = LoraSpec(target_modules=("conv1", "conv2"), **{"modules_to_save": ("head",), **trained})
    manifest = export(model, tmp_path / "b", example_inputs=example, lora=lora,
                      options=ExportOptions(quantization="fp32"))  # fmt: skip
    assert {p.name for p in manifest.trainable if p.name.startswith("norm.")}, "a BatchNorm parameter trains"
    session = TrainingSession(tmp_path / "b")
    image = example["image"].numpy()
    with torch.no_grad():
        np.testing.assert_allclose(session.predict({"image": image}).outputs, model.eval()(example["image"]).numpy(),
                                   atol=FP32_ATOL, rtol=0)  # fmt: skip
    api = training_api()
    module = api.Module(str(tmp_path / "b" / mf.TRAINING_MODEL), session._state)
    module.train()
    training_logits = module(image, np.arange(4))[1]
    np.testing.assert_allclose(training_logits, session.predict({"image": image}).outputs, atol=1e-5, rtol=0)
    data = session.dataset({"image": image}, np.arange(4))
    report = session.train(data, TrainConfig(epochs=20, batch_size=4, learning_rate=1e-2))
    assert session.evaluate(data).loss == pytest.approx(report.epoch_losses[-1], rel=0.5)


def test_regex_target_modules(tmp_path):
    manifest = export_tiny("mlp", tmp_path / "b", target_modules=r"fc\d")
    assert {p.name.split(".")[0] for p in manifest.trainable} == {"fc1", "fc2", "head"}


@pytest.mark.parametrize("loss, labels", [("mse", np.zeros((4, 4), np.float32)), ("bce", np.eye(4, dtype=np.float32))])
def test_regression_and_multilabel_losses_with_sgd(tmp_path, loss, labels):
    model, example = tiny_models.mlp()
    export(model, tmp_path / "b", example_inputs=example, lora=LoraSpec(target_modules=("fc1", "fc2")),
           options=ExportOptions(loss=loss, optimizer="sgd"))  # fmt: skip
    session = TrainingSession(tmp_path / "b")
    data = session.dataset({"x": example["x"].numpy()}, labels)
    before = session.evaluate(data).loss
    session.train(data, TrainConfig(epochs=30, batch_size=4, learning_rate=0.1))
    assert session.evaluate(data).loss < before
    prediction = session.predict({"x": example["x"].numpy()})
    if loss == "bce":
        assert ((prediction.probabilities > 0) & (prediction.probabilities < 1)).all()


class ElasticLoss(nn.Module):
    """A user's own loss module: squared plus absolute error."""

    def forward(self, output: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        error = output - target
        return (error**2).mean() + 0.5 * error.abs().mean()


def test_custom_torch_loss_module(tmp_path):
    model, example = tiny_models.mlp()
    reference = copy.deepcopy(model).eval()
    target = torch.ones(4, 4)
    export(model, tmp_path / "b", example_inputs=example, lora=LoraSpec(target_modules=("fc1",)),
           options=ExportOptions(loss="custom", quantization="fp32"), loss_fn=ElasticLoss(), example_labels=target)  # fmt: skip
    session = TrainingSession(tmp_path / "b")
    data = session.dataset({"x": example["x"].numpy()}, target.numpy())
    with torch.no_grad():
        expected = ElasticLoss()(reference(example["x"]), target).item()
    assert session.evaluate(data).loss == pytest.approx(expected, abs=1e-5)
    session.train(data, TrainConfig(epochs=20, batch_size=4, learning_rate=1e-2))
    assert session.evaluate(data).loss < expected


def test_a_loss_onnx_cannot_express_is_a_clear_error(tmp_path):
    model, example = tiny_models.mlp()
    with pytest.raises(ExportError, match="smooth_l1_loss"):
        export(model, tmp_path / "b", example_inputs=example, lora=LoraSpec(target_modules=("fc1",)),
               options=ExportOptions(loss="custom"), loss_fn=nn.SmoothL1Loss(), example_labels=torch.ones(4, 4))  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_target_pattern_that_matches_nothing_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ExportError, match="attention"):
        export_tiny("mlp", tmp_path / "b", target_modules=("attention",))
    assert not (tmp_path / "b").exists()
    assert list(tmp_path.iterdir()) == []


def test_unknown_train_module_is_a_clear_error(tmp_path):
    model, example = tiny_models.mlp()
    with pytest.raises(ExportError, match="classifier"):
        export(
            model,
            tmp_path / "b",
            example_inputs=example,
            lora=LoraSpec(target_modules=("fc1",), modules_to_save=("classifier",)),
        )
    assert list(tmp_path.iterdir()) == []


def test_existing_bundle_is_not_overwritten_unless_asked(tmp_path):
    export_tiny("mlp", tmp_path / "b")
    before = (tmp_path / "b" / mf.MANIFEST_FILE).read_text()
    with pytest.raises(FileExistsError):
        export_tiny("mlp", tmp_path / "b")
    assert (tmp_path / "b" / mf.MANIFEST_FILE).read_text() == before


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "rank"),
        ({"bias": "some"}, "bias"),
        ({"dropout": 1.5}, "dropout"),
        ({"target_modules": ()}, "target_modules"),
    ],
)
def test_bad_lora_spec(kwargs, message):
    with pytest.raises(ExportError, match=message):
        LoraSpec(**kwargs)


def test_bad_export_options(tmp_path):
    with pytest.raises(ExportError, match="loss"):
        ExportOptions(loss="hinge")
    with pytest.raises(ExportError, match="quantization"):
        ExportOptions(quantization="int4")
    with pytest.raises(ExportError, match="int8_gradients"):
        ExportOptions(int8_gradients="yes")
    with pytest.raises(ExportError, match="custom"):
        model, example = tiny_models.mlp()
        export(model, tmp_path / "b", example_inputs=example, options=ExportOptions(loss="custom"))
    assert list(tmp_path.iterdir()) == []
