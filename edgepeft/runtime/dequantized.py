"""A graph's int8 weights dequantized once, for a session that runs it many times (generation, one token a run).

The bundle stores each frozen weight as int8 + scale behind a `DequantizeLinear`, which ORT runs on every run:
for SmolLM2 that is 135M values dequantized per generated token, ~4x the time of the token's matmuls. Here each
`DequantizeLinear` of constant inputs is computed once with numpy and removed; its output becomes an fp32
initializer that the caller shares with ORT (`SessionOptions.add_initializer`: ORT multiplies from the array
itself, no copy). The graph keeps a data-less placeholder of each, so the weights are never serialized.

The products are those of the dequantized weights, exactly as `DequantizeLinear` computes them (a weight with a
scale per block is a `DequantizeLinear` of its blocks and a `Reshape` back: both are folded). The cost is an
fp32 copy of those weights in memory (430 MB for SmolLM2's decoder, 113 MB for its tied lm_head), held by the
session's owner; int8 tensors another node still reads (an embedding gathered as int8) stay in the graph.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
from onnx import numpy_helper

logger = logging.getLogger(__name__)

_PLACEHOLDER = "edgepeft-shared-initializer"  # the external-data location of a weight handed over in memory


def dequantized_graph(path: Path) -> tuple[bytes, dict[str, np.ndarray]]:
    """The model at `path` serialized with its constant `DequantizeLinear` nodes removed, and their fp32 outputs
    by name: every one must be passed to `SessionOptions.add_initializer` (and kept alive) for a session on it."""
    model = onnx.load(str(path))
    graph = model.graph
    initializers = {init.name: init for init in graph.initializer}
    weights: dict[str, np.ndarray] = {}
    kept = []
    readers = Counter(name for node in graph.node for name in node.input)
    for node in graph.node:
        value = _dequantized(node, initializers)
        if value is None:
            value = _reshaped(node, weights, initializers, readers)
            if value is None:
                kept.append(node)
                continue
            del weights[node.input[0]]  # blocks of scales: only the reshaped weight is read
        weights[node.output[0]] = value
    del graph.node[:]
    graph.node.extend(kept)
    read = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    unread = [init for init in graph.initializer if init.name not in read]
    for init in unread:
        graph.initializer.remove(init)
    graph.initializer.extend(_placeholder(name, value) for name, value in weights.items())
    megabytes = sum(v.nbytes for v in weights.values()) / 2**20
    logger.info("%d weights dequantized once (%.0f MB fp32)", len(weights), megabytes)
    return model.SerializeToString(), weights


def _dequantized(node: onnx.NodeProto, initializers: dict[str, onnx.TensorProto]) -> np.ndarray | None:
    """`node`'s output if it is a `DequantizeLinear` of initializers (int8/uint8, per tensor or per axis)."""
    if node.op_type != "DequantizeLinear" or node.domain not in ("", "ai.onnx"):
        return None
    if not all(name in initializers for name in node.input if name):
        return None
    quantized, scale = (numpy_helper.to_array(initializers[name]) for name in node.input[:2])
    if quantized.dtype not in (np.int8, np.uint8) or scale.dtype != np.float32 or scale.ndim > 1:
        return None
    zero = numpy_helper.to_array(initializers[node.input[2]]) if len(node.input) > 2 and node.input[2] else None
    axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
    shape = [1] * quantized.ndim
    if scale.ndim == 1:
        shape[axis] = -1
    value = quantized.astype(np.float32)
    if zero is not None and zero.any():
        value -= zero.astype(np.float32).reshape(shape)
    value *= scale.reshape(shape)
    return value


def _reshaped(node: onnx.NodeProto, weights: dict[str, np.ndarray], initializers: dict, readers: Counter
              ) -> np.ndarray | None:  # fmt: skip
    """`node`'s output if it is the one reader of a dequantized weight (blocks of scales), a `Reshape` of it to a
    constant shape."""
    if node.op_type != "Reshape" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None
    data, shape = node.input
    if data not in weights or shape not in initializers or readers[data] != 1:
        return None
    return weights[data].reshape(numpy_helper.to_array(initializers[shape]))


def _placeholder(name: str, value: np.ndarray) -> onnx.TensorProto:
    """An fp32 initializer entry with `value`'s shape and no data (ORT takes the data from add_initializer)."""
    tensor = onnx.TensorProto(name=name, data_type=onnx.TensorProto.FLOAT, dims=list(value.shape))
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, entry in (("location", _PLACEHOLDER), ("offset", "0"), ("length", str(value.nbytes))):
        item = tensor.external_data.add()
        item.key, item.value = key, entry
    return tensor
