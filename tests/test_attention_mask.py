"""Finite attention masks (`export/attention_mask.py`): the softmax NaN guard goes, the probabilities stay."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from edgepeft.export.attention_mask import finite_attention_masks_
from edgepeft.runtime.ort import onnxruntime_module


def _guarded_attention() -> onnx.ModelProto:
    """probs = Where(IsNaN(s), 0, s), s = Softmax(scores + Where(mask, 0, -inf)): PyTorch's SDPA export."""
    const = lambda name, value: helper.make_node(  # noqa: E731
        "Constant", [], [name], value=numpy_helper.from_array(np.array([value], np.float32)))
    nodes = [
        const("zero", 0.0), const("minus_inf", -np.inf), const("zero2", 0.0),
        helper.make_node("Where", ["mask", "zero", "minus_inf"], ["bias"], name="mask_where"),
        helper.make_node("Add", ["scores", "bias"], ["x"]),
        helper.make_node("Softmax", ["x"], ["s"], axis=-1),
        helper.make_node("IsNaN", ["s"], ["nan"]),
        helper.make_node("Where", ["nan", "zero2", "s"], ["guarded"]),
        helper.make_node("Mul", ["guarded", "scores"], ["probs"]),
    ]
    graph = helper.make_graph(nodes, "attention",
                              [helper.make_tensor_value_info("scores", TensorProto.FLOAT, [3, 4]),
                               helper.make_tensor_value_info("mask", TensorProto.BOOL, [3, 4])],
                              [helper.make_tensor_value_info("probs", TensorProto.FLOAT, [3, 4])])  # fmt: skip
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _run(model: onnx.ModelProto, scores, mask) -> np.ndarray:
    ort = onnxruntime_module()
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {"scores": scores, "mask": mask})[0]


def test_guard_goes_and_rows_with_a_key_keep_their_probabilities():
    model = _guarded_attention()
    scores = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    mask = np.array([[1, 0, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], bool)  # the last row: every key masked
    before = _run(model, scores, mask)
    assert finite_attention_masks_(model) == 1
    assert not [n for n in model.graph.node if n.op_type in ("IsNaN",) or n.name == "guarded"]
    assert [n.op_type for n in model.graph.node].count("Where") == 1  # the mask's, now with a finite value
    after = _run(model, scores, mask)
    np.testing.assert_array_equal(after[:2], before[:2])  # exactly: exp(lowest - max) is 0 as exp(-inf) is
    assert np.isfinite(after).all()  # the fully masked row: uniform probabilities, not NaN
    np.testing.assert_allclose(after[2], scores[2] / 4, rtol=1e-6)


def test_other_wheres_are_left_alone():
    model = _guarded_attention()
    model.graph.node[1].attribute[0].t.CopyFrom(numpy_helper.from_array(np.array([-1e4], np.float32)))
    assert finite_attention_masks_(model) == 0  # not an -inf mask: the guard may be needed, it stays
    assert any(n.op_type == "IsNaN" for n in model.graph.node)
