"""int8 arithmetic on the frozen backbone: the graphs it writes, and what it changes in outputs and gradients."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import tiny_models

from edgepeft import manifest as mf
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.ort import training_api

# The training step's dynamic per-tensor uint8 activations on top of int8 weights: its logits move by at
# most 15% of the largest on these tiny random models (measured 8% on both). Gradients, with per-row uint8
# gradients in the backward as well, keep their direction (measured cosine 0.94-0.99 here, 0.92-0.99 on
# MiniLM's LoRA matrices against an fp32 backbone).
OUTPUT_RTOL_OF_MAX = 0.15
GRADIENT_COSINE = 0.9


def _ops(path, graph: str) -> list[onnx.NodeProto]:
    return list(onnx.load(str(path / graph), load_external_data=False).graph.node)


def _export(name: str, out, int8_compute: bool):
    model, example = getattr(tiny_models, name)()
    targets = {"mlp": ("fc1", "fc2"), "textnet": ("proj", "embed")}[name]
    lora = LoraSpec(target_modules=targets, modules_to_save=("head",))
    export(model, out, example_inputs=example, lora=lora, options=ExportOptions(int8_compute=int8_compute))
    return {k: v.numpy() for k, v in example.items()}


@pytest.mark.parametrize("name", ["mlp", "textnet"])  # 2-D Linears (Gemm) and 3-D ones (MatMul)
def test_training_graph_multiplies_int8_weights_forward_and_backward(tmp_path, name):
    _export(name, tmp_path / "b", int8_compute=True)
    nodes = _ops(tmp_path / "b", mf.TRAINING_MODEL)
    producers = {out: node for node in nodes for out in node.output}
    consumers = {}
    for node in nodes:
        for name_ in node.input:
            consumers.setdefault(name_, []).append(node)
    assert not [n.name for n in nodes if n.op_type == "DequantizeLinear"], "no fp32 copy of a frozen weight is made"
    int8 = [n for n in nodes if n.op_type == "MatMulIntegerToFloat"]
    forward = [n for n in int8 if n.input[1].endswith("/weight_t")]
    backward = [n for n in int8 if n.name.endswith("/row_int8/matmul")]
    assert forward and backward and len(forward) + len(backward) == len(int8)
    for node in backward:
        # each row of the gradient is divided by its own range before the per-tensor quantization, and
        # the product is multiplied back by it
        quantize = producers[node.input[0]]  # to 7-bit uint8 (full-range uint8 overflows AVX2's u8 x s8 kernel)
        assert quantize.op_type == "QuantizeLinear" and node.input[4] == quantize.input[2], quantize
        unit = producers[quantize.input[0]]
        assert unit.op_type == "Div" and producers[unit.input[1]].op_type == "Max", unit
        assert [c.op_type for c in consumers[node.output[0]]] == ["Mul"]
        assert consumers[node.output[0]][0].input[1] == unit.input[1]
    stats = TrainingSession(tmp_path / "b").manifest.stats
    assert stats["int8_compute"] is True and stats["int8_gradients"] is True


def test_embedding_rows_are_gathered_as_int8(tmp_path):
    _export("textnet", tmp_path / "b", int8_compute=True)
    for graph in (mf.TRAINING_MODEL, mf.EVAL_MODEL, mf.INFERENCE_MODEL):
        nodes = _ops(tmp_path / "b", graph)
        gathers = [n for n in nodes if n.op_type == "Gather" and n.input[0].endswith(".int8")]
        assert gathers, f"{graph}: no Gather reads the int8 embedding table"
        assert not any(n.op_type == "DequantizeLinear" and "embed" in n.output[0] for n in nodes), graph


@pytest.mark.parametrize("name", ["mlp", "textnet"])
def test_training_forward_is_close_to_dequantized_weights_and_evaluation_is_exact(tmp_path, name):
    example = _export(name, tmp_path / "int8", int8_compute=True)
    _export(name, tmp_path / "dq", int8_compute=False)
    labels = np.array([0, 1, 2, 3])
    predictions, logits, grads = {}, {}, {}
    for kind in ("int8", "dq"):
        session = TrainingSession(tmp_path / kind)
        predictions[kind] = session.predict(example).outputs
        logits[kind], grads[kind] = _training_pass(tmp_path / kind, session, example, labels)
    # evaluation and prediction multiply the dequantized weights: the same numbers as without int8 compute
    np.testing.assert_allclose(predictions["int8"], predictions["dq"], rtol=0, atol=1e-6)
    largest = np.abs(logits["dq"]).max()
    assert np.abs(logits["int8"] - logits["dq"]).max() <= OUTPUT_RTOL_OF_MAX * largest
    assert not np.array_equal(logits["int8"], logits["dq"]), "int8 activations should change the step a little"
    assert set(grads["dq"]) == {spec.name for spec in session.manifest.trainable}
    for key, expected in grads["dq"].items():
        got = grads["int8"][key]
        assert np.linalg.norm(expected) > 0 and np.linalg.norm(got) > 0, f"{key}: no gradient to compare"
        cosine = float((got * expected).sum() / (np.linalg.norm(got) * np.linalg.norm(expected)))
        assert cosine >= GRADIENT_COSINE, (key, cosine)


def _training_pass(bundle, session: TrainingSession, example: dict, labels: np.ndarray):
    """One forward and backward pass of the bundle's training graph with ORT's API: logits and gradients.

    The LoRA matrix that starts at zero (lora_B; an embedding's lora_embedding_A) is set nonzero first, the
    same values in every bundle: at zero, its partner would get no gradient to compare.
    """
    api = training_api()
    state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    module = api.Module(str(bundle / mf.TRAINING_MODEL), state)
    rng = np.random.default_rng(0)
    for spec in session.manifest.trainable:
        if not np.array(state.parameters[spec.name].data).any():
            state.parameters[spec.name] = (0.1 * rng.standard_normal(spec.shape)).astype(np.float32)
    module.train()
    _, logits = module(*[example[spec.name] for spec in session.manifest.inputs], labels)[:2]
    return logits, {spec.name: np.array(state.parameters[spec.name].grad) for spec in session.manifest.trainable}


def test_evaluation_graphs_multiply_dequantized_weights_without_a_transpose(tmp_path):
    """A Transpose after a DequantizeLinear makes ORT requantize the weight on every run (700 ms a prediction)."""
    _export("textnet", tmp_path / "b", int8_compute=True)  # its Linear reads 3-D input: MatMul, not Gemm
    for graph in (mf.EVAL_MODEL, mf.INFERENCE_MODEL):
        nodes = _ops(tmp_path / "b", graph)
        dequantized = {n.output[0] for n in nodes if n.op_type == "DequantizeLinear"}
        assert dequantized, graph
        assert not [n.name for n in nodes if n.op_type == "Transpose" and n.input[0] in dequantized], graph


def test_int8_gradients_follow_the_opset(tmp_path):
    """ReduceMax takes its axes as an input from opset 18 on: a bundle exported at 18 must still train."""
    model, example = tiny_models.mlp()
    lora = LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",))
    export(model, tmp_path / "b", example_inputs=example, lora=lora, options=ExportOptions(opset=18))
    reduce_max = [n for n in _ops(tmp_path / "b", mf.TRAINING_MODEL) if n.op_type == "ReduceMax"]
    assert reduce_max and not [n.name for n in reduce_max if any(a.name == "axes" for a in n.attribute)]
    assert any(len(n.input) == 2 for n in reduce_max)  # a row's maximum: the axes as an input
    session = TrainingSession(tmp_path / "b")
    rng = np.random.default_rng(0)
    data = session.dataset({"x": rng.standard_normal((32, 16)).astype(np.float32)}, rng.integers(0, 4, 32))
    before = session.evaluate(data).loss
    session.train(data, TrainConfig(epochs=10, batch_size=8, learning_rate=1e-2))
    assert session.evaluate(data).loss < 0.5 * before  # measured 1.40 -> 0.17


def test_fp32_gradients_dequantize_each_weight_for_its_one_backward_matmul(tmp_path):
    model, example = tiny_models.mlp()
    lora = LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",))
    export(model, tmp_path / "b", example_inputs=example, lora=lora, options=ExportOptions(int8_gradients=False))
    nodes = _ops(tmp_path / "b", mf.TRAINING_MODEL)
    assert not [n.name for n in nodes if "/row_int8/" in n.name]
    dequantized = [n for n in nodes if n.op_type == "DequantizeLinear"]
    assert dequantized
    for dq in dequantized:
        users = [n for n in nodes if dq.output[0] in n.input]
        assert [u.op_type for u in users] == ["MatMul"] and "_Grad" in users[0].name, (dq.name, users)
    stats = TrainingSession(tmp_path / "b").manifest.stats
    assert stats["int8_compute"] is True and stats["int8_gradients"] is False


@pytest.mark.parametrize("opset", [17, 18])
def test_row_inputs_keep_the_small_tokens_next_to_an_outlier_token(opset):
    """A language model's Linear input has a token hundreds of times larger than the rest: one uint8 scale for
    the tensor flattens the others, a scale per row (`row_inputs`, causal LMs) keeps them (ORT runs both)."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.export.int8_compute import use_int8_compute_

    rng = np.random.default_rng(0)
    weight = rng.normal(size=(24, 16)).astype(np.float32)  # (out, in), as a Linear stores it
    scale = np.abs(weight).max(axis=1) / 127
    quantized = np.round(weight / scale[:, None]).astype(np.int8)
    x = rng.normal(size=(1, 6, 16)).astype(np.float32)
    x[0, 0] *= 300  # the outlier token (SmolLM2's first one)
    exact = x @ (quantized * scale[:, None]).T

    def run(row_inputs: bool) -> np.ndarray:
        graph = helper.make_graph(
            [helper.make_node("DequantizeLinear", ["w.int8", "w.scale"], ["w"], axis=0),
             helper.make_node("Transpose", ["w"], ["w_t"], perm=[1, 0]),
             helper.make_node("MatMul", ["x", "w_t"], ["y"], name="linear")],
            "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 16])],
            [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 6, 24])],
            [numpy_helper.from_array(quantized, "w.int8"), numpy_helper.from_array(scale, "w.scale")],
        )  # fmt: skip
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        assert use_int8_compute_(model, matmuls=True, gradients=False, row_inputs=row_inputs) == 1
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        return session.run(["y"], {"x": x})[0]

    def error(y: np.ndarray) -> float:  # of the ordinary tokens, relative to their size
        return float(np.abs(y - exact)[0, 1:].max() / np.abs(exact[0, 1:]).max())

    assert error(run(row_inputs=True)) < 0.03
    assert error(run(row_inputs=False)) > 0.2
