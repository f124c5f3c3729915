"""Finite attention masks, so the NaN guard after each attention softmax can go.

PyTorch exports `scaled_dot_product_attention` with a boolean mask as

    scores = QK^T * scale + Where(mask, 0, -inf)
    probs = Softmax(scores)
    probs = Where(IsNaN(probs), 0, probs)    # a row with every key masked is NaN: made 0

The guard runs on every (heads x tokens x tokens) probability tensor, and again in the recomputed pass and in the
gradient: SmolLM2's training step spent ~4% of its time in it. With the mask's -inf made float32's lowest finite
value, a row with some key unmasked gives exactly the same probabilities (its exp(lowest - max) is 0, as
exp(-inf) is), and a row with every key masked (a padded query with no real key before it) gives a uniform row
instead of NaN: never NaN, so the guard is removed. Such rows are padding, whose loss is ignored and whose
outputs no unmasked query reads.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

LOWEST = float(np.finfo(np.float32).min)


def finite_attention_masks_(model: onnx.ModelProto) -> int:
    """Rewrite every guarded attention softmax of `model` in place as above; return how many were rewritten."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    rename: dict[str, str] = {}
    removed: set[int] = set()
    constants: list[onnx.NodeProto] = []
    for guard in graph.node:
        found = _guarded_softmax(guard, producer, graph)
        if found is None:
            continue
        is_nan, mask_where, infinity_index = found
        lowest = f"{mask_where.name or mask_where.output[0]}/lowest"
        constants.append(helper.make_node("Constant", [], [lowest], name=lowest,
                                          value=numpy_helper.from_array(np.array(LOWEST, np.float32))))  # fmt: skip
        mask_where.input[infinity_index] = lowest
        rename[guard.output[0]] = guard.input[2]
        removed.add(id(guard))
        if all(id(r) in removed or r is guard for r in readers.get(is_nan.output[0], [])):
            removed.add(id(is_nan))
    if not rename:
        return 0
    kept = constants + [node for node in graph.node if id(node) not in removed]
    for node in kept:
        node.input[:] = [rename.get(name, name) for name in node.input]
    for output in graph.output:
        if output.name in rename:  # a graph output keeps its name: an Identity of the unguarded probabilities
            kept.append(helper.make_node("Identity", [rename[output.name]], [output.name]))
    del graph.node[:]
    graph.node.extend(kept)
    logger.info("%d attention softmax NaN guards removed (finite masks)", len(rename))
    return len(rename)


def _guarded_softmax(guard: onnx.NodeProto, producer: dict, graph: onnx.GraphProto):
    """For `Where(IsNaN(s), 0, s)` with `s = Softmax(x + Where(m, 0, -inf))`: (IsNaN, the mask's Where, the index
    of its -inf input); otherwise None."""
    if guard.op_type != "Where" or len(guard.input) != 3:
        return None
    is_nan, probs = producer.get(guard.input[0]), guard.input[2]
    softmax = producer.get(probs)
    if is_nan is None or is_nan.op_type != "IsNaN" or is_nan.input[0] != probs or _scalar(guard.input[1], producer, graph) != 0:
        return None
    if softmax is None or softmax.op_type != "Softmax":
        return None
    add = producer.get(softmax.input[0])
    if add is None or add.op_type != "Add":
        return None
    for term in add.input:
        where = producer.get(term)
        if where is None or where.op_type != "Where":
            continue
        values = [_scalar(name, producer, graph) for name in where.input[1:]]
        if values[0] == 0 and values[1] == -np.inf:
            return is_nan, where, 2
        if values[1] == 0 and values[0] == -np.inf:
            return is_nan, where, 1
    return None


def _scalar(name: str, producer: dict, graph: onnx.GraphProto) -> float | None:
    """The value of a one-element constant (a Constant node or an initializer), else None."""
    node = producer.get(name)
    array = None
    if node is not None and node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
        array = numpy_helper.to_array(node.attribute[0].t)
    elif node is None:
        array = next((numpy_helper.to_array(i) for i in graph.initializer if i.name == name), None)
    if array is None or array.size != 1:
        return None
    return float(array.reshape(()))
