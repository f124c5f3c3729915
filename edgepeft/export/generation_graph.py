"""Graph edits that make the KV-cache generation graph cheaper to run, the numbers unchanged.

Generation reads the next-token distribution of the last position only. The exported graph multiplies every
position's hidden state by the 49,152 x 576 lm_head (SmolLM2) when the prompt runs, 112 positions' worth of
work for one row; slicing the hidden states to the last position before that matmul leaves that row exact.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

LOGITS = "logits"
_MATMULS = ("MatMul", "FusedMatMul")


def last_position_logits_(model: onnx.ModelProto) -> bool:
    """Make the graph's `logits` output the last position's only, shape (batch, 1, vocabulary), in place.

    The hidden states entering the matmul that produces `logits` are sliced to their last row on the sequence
    axis (-2). Returns False, changing nothing, when `logits` is not made by a MatMul of 3-D hidden states.
    """
    graph = model.graph
    producer = next((n for n in graph.node if LOGITS in n.output), None)
    if producer is None or producer.op_type not in _MATMULS:
        logger.warning("the generation graph's logits do not come from a matmul: every position's are computed")
        return False
    hidden, sliced = producer.input[0], f"{producer.input[0]}/last_position"
    constants = {
        f"{sliced}/starts": [-1],
        f"{sliced}/ends": [np.iinfo(np.int64).max],
        f"{sliced}/axes": [-2],
    }
    graph.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in constants.items())
    node = helper.make_node("Slice", [hidden, *constants], [sliced], name=sliced)
    position = list(graph.node).index(producer)
    graph.node.insert(position, node)
    producer.input[0] = sliced
    for output in graph.output:
        if output.name == LOGITS and len(output.type.tensor_type.shape.dim) == 3:
            dim = output.type.tensor_type.shape.dim[1]
            dim.Clear()
            dim.dim_value = 1
    return True
