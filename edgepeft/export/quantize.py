"""Int8 weight-only quantization of frozen ONNX initializers (symmetric, per output channel).

Each chosen fp32 initializer `W` becomes `W.int8` (int8) and `W.scale` (fp32, one per output channel,
axis 0 in torch's layout for Linear, Conv and Embedding weights) feeding a `DequantizeLinear` whose
output keeps the name `W`, so every consumer is unchanged. No gradient flows through DequantizeLinear,
which is fine: these weights are frozen and not on a path from a trainable parameter to the loss.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

QUANT_SUFFIX = ".int8"
SCALE_SUFFIX = ".scale"
ZERO_SUFFIX = ".zero_point"


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization along axis 0: returns (int8 values, fp32 scales)."""
    flat = weight.reshape(weight.shape[0], -1).astype(np.float32)
    scale = np.abs(flat).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(weight.shape), scale.astype(np.float32)


def quantize_initializers_(model: onnx.ModelProto, names: list[str]) -> list[str]:
    """Replace the named fp32 initializers of `model` in place by int8 + scale + DequantizeLinear.

    Returns the names of the new initializers (the frozen parameters a checkpoint must hold).
    """
    graph = model.graph
    by_name = {init.name: init for init in graph.initializer}
    new_names: list[str] = []
    dq_nodes = []
    for name in names:
        init = by_name[name]
        weight = numpy_helper.to_array(init)
        q, scale = quantize_per_channel(weight)
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(q, name + QUANT_SUFFIX))
        graph.initializer.append(numpy_helper.from_array(scale, name + SCALE_SUFFIX))
        # An explicit int8 zero point: without it ORT's x86 S8->U8 rewrite breaks the training session.
        graph.initializer.append(numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), name + ZERO_SUFFIX))
        inputs = [name + QUANT_SUFFIX, name + SCALE_SUFFIX, name + ZERO_SUFFIX]
        dq_nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=f"dq/{name}", axis=0))
        new_names += inputs
    # Dequantize first so every consumer sees its input defined before it (topological order).
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes)
    logger.info("quantized %d weights to int8", len(names))
    return new_names
