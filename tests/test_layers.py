"""Every building block of tests/layer_zoo.py compiles, computes what torch computes, and trains on the device.

Per zoo entry: the fp32 bundle's eval outputs (the training session's `predict` and the bundle's inference.onnx)
equal torch's eval output within FP32_ATOL; the int8 bundle's within INT8_REL of the largest |output|; 20 steps
on the int8 bundle lower the loss. LoRA sits on the block itself wherever PEFT can adapt it (the entry's
`targets`). Each model is exported once per quantization (a module-scoped cache).
"""

from __future__ import annotations

import copy
from pathlib import Path

import layer_zoo
import unsupported_models
import numpy as np
import onnx
import pytest
import torch

from edgepeft import manifest as mf
from edgepeft.errors import ExportError, InputError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.export.lora import add_lora
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.ort import onnxruntime_module

FP32_ATOL = 1e-4
INT8_REL = 2e-2  # int8 per-channel weights: max |error| within 2% of the largest |output|
STEPS = 20

NAMES = list(layer_zoo.ZOO)


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """`bundle(name, quantization, optimizer="adamw")`: the zoo entry exported once per module."""
    cache: dict[tuple[str, str, str], Path] = {}

    def get(name: str, quantization: str, optimizer: str = "adamw") -> Path:
        key = (name, quantization, optimizer)
        if key not in cache:
            entry = layer_zoo.ZOO[name]
            model, example = entry()
            out = tmp_path_factory.mktemp(name) / f"{quantization}-{optimizer}"
            lora = LoraSpec(target_modules=entry.targets, modules_to_save=entry.head)
            options = ExportOptions(quantization=quantization, optimizer=optimizer)
            export(model, out, example_inputs=example, lora=lora, options=options)
            cache[key] = out
        return cache[key]

    return get


def _reference(name: str) -> tuple[dict[str, np.ndarray], np.ndarray]:
    model, example = layer_zoo.ZOO[name]()
    with torch.no_grad():
        expected = model.eval()(*example.values()).numpy()
    return {k: v.numpy() for k, v in example.items()}, expected


def _outputs(bundle: Path, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The eval output of the training session and of the bundle's inference.onnx."""
    predicted = TrainingSession(bundle).predict(features).outputs
    session = onnxruntime_module().InferenceSession(str(bundle / mf.INFERENCE_MODEL), providers=["CPUExecutionProvider"])
    inference = session.run(None, {i.name: features[i.name] for i in session.get_inputs()})[0]
    return {"predict": predicted, "inference.onnx": inference}


@pytest.mark.parametrize("name", NAMES)
def test_fp32_eval_output_equals_torch(bundle, name):
    features, expected = _reference(name)
    for kind, got in _outputs(bundle(name, "fp32"), features).items():
        np.testing.assert_allclose(got, expected, atol=FP32_ATOL, rtol=0, err_msg=kind)


@pytest.mark.parametrize("name", NAMES)
def test_int8_eval_output_within_tolerance(bundle, name):
    features, expected = _reference(name)
    for kind, got in _outputs(bundle(name, "int8"), features).items():
        assert np.abs(got - expected).max() <= INT8_REL * np.abs(expected).max(), kind


@pytest.mark.parametrize("name", NAMES)
def test_training_on_the_device_lowers_the_loss(bundle, name):
    features, expected = _reference(name)
    session = TrainingSession(bundle(name, "int8"))
    rows = len(expected)
    labels = np.random.default_rng(0).integers(0, expected.shape[-1], rows).astype(np.int64)
    data = session.dataset(features, labels)
    before = session.evaluate(data).loss
    report = session.train(data, TrainConfig(epochs=STEPS, batch_size=rows, learning_rate=1e-2, shuffle=False))
    assert report.steps == STEPS
    assert session.evaluate(data).loss < 0.98 * before  # falls (by 2% at least: not a rounding wobble)


# Shared and tied parameters: one SGD step on the device moves every trainable tensor as torch's gradient does.
EXACT_STEP = {
    "shared_module_x3": ("block", "head"),  # the shared block trained in full: one LayerNorm scale used 3 times
    "weight_tying": ("embed",),  # PEFT trains a copy of the tied embedding; the output layer keeps the original
    "identical_values_x3": ("head",),
    "multihead_attention": ("head",),  # PEFT's LoRA on nn.MultiheadAttention: in_proj and out_proj adapted
}


@pytest.mark.parametrize("name", list(EXACT_STEP))
def test_one_sgd_step_equals_torch_for_shared_parameters(tmp_path, name):
    entry = layer_zoo.ZOO[name]
    model, example = entry()
    lora = LoraSpec(target_modules=entry.targets, modules_to_save=EXACT_STEP[name])
    export(copy.deepcopy(model), tmp_path / "b", example_inputs=example, lora=lora,
           options=ExportOptions(quantization="fp32", optimizer="sgd"))  # fmt: skip
    session = TrainingSession(tmp_path / "b")
    features = {k: v.numpy() for k, v in example.items()}
    labels = np.arange(len(next(iter(features.values())))) % layer_zoo.classes_of(copy.deepcopy(model), example)
    before = session.trainable_values()
    lr = 0.1
    session.train(session.dataset(features, labels), TrainConfig(batch_size=len(labels), learning_rate=lr, shuffle=False))
    after = session.trainable_values()

    module = add_lora(copy.deepcopy(model), lora).module.eval()
    with torch.no_grad():
        for n, value in before.items():
            module.get_parameter(n).copy_(torch.from_numpy(value))
    torch.nn.functional.cross_entropy(module(*example.values()), torch.from_numpy(labels)).backward()
    moved = 0
    for n in before:
        grad = module.get_parameter(n).grad
        grad = np.zeros_like(before[n]) if grad is None else grad.numpy()
        np.testing.assert_allclose((before[n] - after[n]) / lr, grad, atol=1e-5, rtol=0, err_msg=n)
        moved += bool(np.abs(grad).max() > 0)
    assert moved >= 2  # lora_B and the trained module's tensors


@pytest.mark.parametrize("name", [n for n in NAMES if n.startswith("batchnorm")])
def test_every_batchnorm_is_frozen_to_its_running_statistics(bundle, name):
    """A fresh model's BatchNorms hold equal statistics: each must still become a frozen scale and shift."""
    training = onnx.load(str(bundle(name, "fp32") / mf.TRAINING_MODEL))
    assert not [n.name for n in training.graph.node if n.op_type.startswith("BatchNormalization")]


def test_attention_weights_are_quantized_and_fingerprinted(bundle):
    """PEFT's LoRA on nn.MultiheadAttention merges the frozen in_proj/out_proj weights in its forward: they must
    still be named initializers, stored as int8 and part of the base fingerprint, not anonymous constants."""
    manifest = mf.Manifest.load(bundle("multihead_attention", "int8"))
    inference = onnx.load(str(bundle("multihead_attention", "int8") / mf.INFERENCE_MODEL))
    names = {i.name for i in inference.graph.initializer}
    for weight in ("attn.base_layer.in_proj_weight", "attn.base_layer.out_proj.base_layer.weight"):
        assert f"{weight}.int8" in names and weight not in names
    large = [n.output[0] for n in inference.graph.node if n.op_type == "Constant" and len(n.attribute[0].t.dims) >= 2]
    assert not large, f"frozen weights traced as constants: {large}"
    assert manifest.stats["quantized_weights"] == 3
    assert mf.Manifest.load(bundle("multihead_attention", "fp32")).base_fingerprint == manifest.base_fingerprint


@pytest.mark.parametrize("name", ["gru", "lstm"])
def test_an_unrolled_recurrent_layer_fixes_the_sequence_length(bundle, name):
    manifest = mf.Manifest.load(bundle(name, "int8"))
    assert manifest.inputs[0].shape == ("batch", layer_zoo.SEQ, 16)
    session = TrainingSession(bundle(name, "int8"))
    with pytest.raises(InputError, match=f"dimension 1 must be {layer_zoo.SEQ}"):
        session.predict({"x": np.zeros((2, layer_zoo.SEQ + 1, 16), np.float32)})


@pytest.mark.parametrize("name", list(layer_zoo.REFUSED_TARGETS))
def test_lora_targets_that_do_nothing_are_refused(tmp_path, name):
    entry, message = layer_zoo.REFUSED_TARGETS[name]
    model, example = entry()
    with pytest.raises(ExportError, match=message):
        export(model, tmp_path / "b", example_inputs=example, lora=LoraSpec(target_modules=entry.targets))
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("name", list(unsupported_models.REFUSED))
def test_what_cannot_compile_is_one_error_naming_module_and_op(tmp_path, name):
    model, example = getattr(unsupported_models, name)()
    lora = LoraSpec(target_modules=("stem",), modules_to_save=("head",))
    with pytest.raises(ExportError) as caught:
        export(model, tmp_path / "b", example_inputs=example, lora=lora)
    message = str(caught.value)
    module, cls, op = unsupported_models.REFUSED[name]
    assert f"{module} ({cls})" in message and op in message and "\n" not in message, message
    assert not (tmp_path / "b").exists()


# docs/supported.md is rendered from this list (tests/support_table.py): each row names the tests that prove it.
_PER_ENTRY = [
    "test_fp32_eval_output_equals_torch",
    "test_int8_eval_output_within_tolerance",
    "test_training_on_the_device_lowers_the_loss",
]
_EXTRA = {
    **{n: ["test_one_sgd_step_equals_torch_for_shared_parameters"] for n in EXACT_STEP},
    **{n: ["test_every_batchnorm_is_frozen_to_its_running_statistics"] for n in NAMES if n.startswith("batchnorm")},
    "multihead_attention": ["test_one_sgd_step_equals_torch_for_shared_parameters",
                            "test_attention_weights_are_quantized_and_fingerprinted"],  # fmt: skip
    "gru": ["test_an_unrolled_recurrent_layer_fixes_the_sequence_length"],
    "lstm": ["test_an_unrolled_recurrent_layer_fixes_the_sequence_length"],
}
SUPPORTED = [
    {
        "what": layer_zoo.LAYER[name],
        "kind": "torch layer",
        "status": "supported",
        "lora": ", ".join(layer_zoo.ZOO[name].targets),
        "note": layer_zoo.ZOO[name].note,
        "tests": [f"tests/test_layers.py::{t}[{name}]" for t in _PER_ENTRY + _EXTRA.get(name, [])],
    }
    for name in NAMES
] + [
    {
        "what": "LoRA on nn.MultiheadAttention's out_proj alone",
        "kind": "torch layer",
        "status": "refused",
        "lora": "",
        "note": "does nothing in torch (the attention reads the weight itself): target the MultiheadAttention",
        "tests": [f"tests/test_layers.py::test_lora_targets_that_do_nothing_are_refused[{n}]"
                  for n in layer_zoo.REFUSED_TARGETS],  # fmt: skip
    }
] + [
    {
        "what": unsupported_models.DESCRIPTION[name],
        "kind": "torch layer",
        "status": "refused",
        "lora": "",
        "note": f"one ExportError naming the module and {unsupported_models.REFUSED[name][2]}",
        "tests": [f"tests/test_layers.py::test_what_cannot_compile_is_one_error_naming_module_and_op[{name}]"],
    }
    for name in unsupported_models.REFUSED
]
