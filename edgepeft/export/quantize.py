"""Int8 weight-only quantization of frozen ONNX initializers (symmetric, per output channel or per block).

Each chosen fp32 initializer `W` becomes `W.int8` (int8) and `W.scale` (fp32, one per output channel,
axis 0 in torch's layout for Linear, Conv and Embedding weights) feeding a `DequantizeLinear` whose
output keeps the name `W`, so every consumer is unchanged. No gradient flows through DequantizeLinear,
which is fine: these weights are frozen and not on a path from a trainable parameter to the loss.

With `block_size`, a 2-D weight whose rows divide into blocks of that many values gets a scale per block instead:
`W.int8` holds the rows cut into blocks (`[rows * blocks, block_size]`), dequantized per axis 0 and reshaped back
to `W` (`DequantizeLinear` + `Reshape`, opset 13). Its rounding error follows each block's range, not the row's:
half the logit error for SmolLM2 (whose GGUF weights are themselves blocks of 32), 12.5% more bytes (fp32 scales).
Only graphs that dequantize their weights (inference) use it: int8 matmuls need one scale per output channel.
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
SHAPE_SUFFIX = ".shape"
BLOCKS_SUFFIX = ".blocks"
BLOCK_SIZE = 32  # the generation graph's: GGUF's Q8_0 / Q4_x blocks, so a GGUF model's Q8_0 weights stay exact


def quantize_per_channel(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization along axis 0: returns (int8 values, fp32 scales)."""
    flat = weight.reshape(weight.shape[0], -1).astype(np.float32)
    scale = np.abs(flat).max(axis=1) / 127.0
    scale[scale == 0] = 1.0
    q = np.clip(np.rint(flat / scale[:, None]), -127, 127).astype(np.int8)
    return q.reshape(weight.shape), scale.astype(np.float32)


def quantize_blocks(weight: np.ndarray, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of a 2-D weight in blocks of `block_size` along its rows: returns the int8
    blocks `[rows * blocks, block_size]` and their fp32 scales `[rows * blocks]`."""
    rows, width = weight.shape
    if width % block_size:
        raise ValueError(f"rows of {width} values do not divide into blocks of {block_size}")
    return quantize_per_channel(weight.reshape(rows * (width // block_size), block_size))


def blockable(weight: np.ndarray, block_size: int) -> bool:
    """Whether `quantize_blocks` takes `weight` (2-D, rows longer than one block and a multiple of it)."""
    return bool(block_size) and weight.ndim == 2 and weight.shape[1] > block_size and weight.shape[1] % block_size == 0


def dequantized(weight: np.ndarray, block_size: int = 0) -> np.ndarray:
    """`weight` as `quantize_initializers_(..., block_size)` stores it, dequantized (the host's reference)."""
    if blockable(weight, block_size):
        q, scale = quantize_blocks(weight, block_size)
    else:
        q, scale = quantize_per_channel(weight)
    flat = q.reshape(q.shape[0], -1).astype(np.float32) * scale[:, None]
    return flat.reshape(weight.shape)


def quantize_initializers_(model: onnx.ModelProto, names: list[str], block_size: int = 0) -> list[str]:
    """Replace the named fp32 initializers of `model` in place by int8 + scale + DequantizeLinear (per output
    channel; with `block_size`, per block where the weight is `blockable`, then a Reshape).

    Returns the names of the new initializers (the frozen parameters a checkpoint must hold).
    """
    graph = model.graph
    by_name = {init.name: init for init in graph.initializer}
    new_names: list[str] = []
    dq_nodes = []
    for name in names:
        init = by_name[name]
        weight = numpy_helper.to_array(init)
        blocks = blockable(weight, block_size)
        q, scale = quantize_blocks(weight, block_size) if blocks else quantize_per_channel(weight)
        graph.initializer.remove(init)
        graph.initializer.append(numpy_helper.from_array(q, name + QUANT_SUFFIX))
        graph.initializer.append(numpy_helper.from_array(scale, name + SCALE_SUFFIX))
        # An explicit int8 zero point: without it ORT's x86 S8->U8 rewrite breaks the training session.
        graph.initializer.append(numpy_helper.from_array(np.zeros_like(scale, dtype=np.int8), name + ZERO_SUFFIX))
        inputs = [name + QUANT_SUFFIX, name + SCALE_SUFFIX, name + ZERO_SUFFIX]
        if blocks:
            shape = name + SHAPE_SUFFIX
            graph.initializer.append(numpy_helper.from_array(np.array(weight.shape, np.int64), shape))
            dq_nodes += [
                helper.make_node("DequantizeLinear", inputs, [name + BLOCKS_SUFFIX], name=f"dq/{name}", axis=0),
                helper.make_node("Reshape", [name + BLOCKS_SUFFIX, shape], [name], name=f"dq/{name}/rows"),
            ]
            inputs = [*inputs, shape]
        else:
            dq_nodes.append(helper.make_node("DequantizeLinear", inputs, [name], name=f"dq/{name}", axis=0))
        new_names += inputs
    # Dequantize first so every consumer sees its input defined before it (topological order).
    nodes = list(graph.node)
    del graph.node[:]
    graph.node.extend(dq_nodes + nodes)
    logger.info("quantized %d weights to int8", len(names))
    return new_names
