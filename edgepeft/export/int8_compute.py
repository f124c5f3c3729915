"""Compute with the int8 weights themselves, and keep no fp32 copy of a frozen weight alive across a step.

`quantize.py` stores each frozen weight as int8 + per-output-channel scale behind a `DequantizeLinear`,
and ORT's gradient builder then holds every dequantized fp32 weight from the forward pass until the
backward pass needs it. This pass rewrites the graphs `generate_artifacts` wrote:

- Linear, forward: `MatMul(x, Transpose(DQ(Wq)))` becomes a `MatMulIntegerToFloat` of `x`, quantized on the fly,
  with `Transpose(Wq)` and the weight's scales (MLAS multiplies u8 x s8, faster than an fp32 MatMul here). `x`
  is divided by its largest magnitude (per tensor, or per row with `row_inputs`) and quantized to 7-bit uint8
  (`_u7_matmul`: full-range uint8 overflows the AVX2 kernel).
- Linear, input gradient: `FusedMatMul(dy, Transpose(DQ(Wq)), transB=1)` (or the 2-D `Gemm(dy, DQ(Wq))`)
  becomes the same int8 product of `dy` on `Wq` itself, with `dy` quantized per row (`row_int8_matmul`).
  Per row, not per tensor: gradients are concentrated on a few tokens (at MiniLM's
  top layers max/mean is ~500), and a per-tensor uint8 `dy` lost most of them (17% error per matmul,
  and training no longer learned); per row the error is 1-3% and LoRA gradients keep cosine 0.92-0.99
  against an fp32 backbone. With `gradients=False` it becomes `MatMul(dy, DQ(Wq))` instead, with its own
  `DequantizeLinear` right before it, so each fp32 weight lives for one backward matmul.
- Embedding: `Gather(DQ(Wq), ids)` becomes `Gather(Wq, ids) * Gather(s, ids)`: the fp32 table (47 MB for
  MiniLM) is never built for the few rows a batch reads.

Weights are symmetric (zero point 0), as `quantize.py` writes them. Any other use of a dequantized weight
keeps its `DequantizeLinear`.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

MS_DOMAIN = "com.microsoft"


def use_int8_compute_(
    model: onnx.ModelProto, *, matmuls: bool = True, gradients: bool = True, row_inputs: bool = False
) -> int:
    """Rewrite `model` in place to gather (and, if `matmuls`, multiply) int8 weights directly.

    Returns the number of rewritten uses. Gathering int8 rows is exact; int8 matmuls quantize activations:
    per tensor, or with `row_inputs` each token's row with its own scale (`row_int8_forward`).
    Without `matmuls`, a frozen Linear multiplies its dequantized weight with `transB` instead of after a
    `Transpose`: the same numbers, and no per-run requantization by ORT's transpose optimizer.
    """
    graph = model.graph
    original = list(graph.node)  # one list of node objects: the id()s below refer to these
    consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in original:
        for name in node.input:
            consumers[name].append(node)

    vectors = _vectors(graph)
    _ROWS.clear()
    _ROWS.update(_row_counts(graph))
    _SOFTMAX_GRADIENTS.clear()
    _SOFTMAX_GRADIENTS.update(_softmax_gradients(graph))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    replaced: dict[int, list[onnx.NodeProto]] = {}  # id(old node) -> nodes in its place
    removed: set[int] = set()
    for dq in original:
        if dq.op_type != "DequantizeLinear" or _attr(dq, "axis", 1) != 0 or len(dq.input) < 2:
            continue
        weight, (quantized, scale) = dq.output[0], dq.input[:2]
        users = consumers[weight]
        # A scale per block (`quantize.py`'s block_size) is DequantizeLinear + Reshape, an inference graph's fp32
        # weight: int8 matmuls and gathers need a scale per row, so only the Transpose before its matmuls goes.
        blocked = len(users) == 1 and users[0].op_type == "Reshape" and users[0].input[0] == weight
        if blocked and matmuls:
            continue
        if blocked:
            weight = users[0].output[0]
            users = consumers[weight]
        done = 0
        for user in users:
            if not blocked and user.op_type == "Gather" and user.input[0] == weight and _attr(user, "axis", 0) == 0:
                replaced[id(user)] = _gather(user, quantized, scale)
                done += 1
            elif user.op_type == "Transpose" and list(_attr(user, "perm", [])) == [1, 0]:
                transposed = user.output[0]
                uses = consumers[transposed]
                if matmuls:
                    swaps = {id(use): _matmul(use, transposed, dq, opset, gradients, row_inputs) for use in uses}
                else:
                    swaps = {id(use): _transposed_matmul(use, transposed, weight) for use in uses}
                replaced.update((key, nodes) for key, nodes in swaps.items() if nodes)
                if all(swaps.values()):
                    removed.add(id(user))
                    done += matmuls  # exact products still read the dequantized weight
            elif matmuls and user.op_type == "Gemm":
                nodes = _gemm(user, dq, vectors, opset, gradients, row_inputs)
                if nodes:
                    replaced[id(user)] = nodes
                    done += 1
        if users and done == len(users):
            removed.add(id(dq))

    if not replaced:
        return 0
    nodes = []
    for node in original:
        if id(node) in removed:
            continue
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(_share_transposes(nodes))
    read = {name for node in graph.node for name in node.input}
    graph.initializer.extend(c for c in _constants(opset) if c.name in read)
    if not any(op.domain == MS_DOMAIN for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    logger.info("%d uses of frozen int8 weights rewritten", len(replaced))
    return len(replaced)


def _matmul(
    node: onnx.NodeProto, transposed: str, dequantize: onnx.NodeProto, opset: int, gradients: bool, rows: bool
) -> list[onnx.NodeProto] | None:
    """The replacement of a forward MatMul or an input-gradient FusedMatMul on `Transpose(DQ(W))`, or None."""
    name = node.name or node.output[0]
    if node.op_type == "MatMul" and list(node.input[1:]) == [transposed]:
        if rows:
            return row_int8_forward(name, node.input[0], dequantize, node.output[0], opset)
        return _int8_forward(name, node.input[0], dequantize, list(node.output))
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    plain = {"transA": 0, "transB": 1, "alpha": 1.0, "transBatchA": 0, "transBatchB": 0}
    if node.op_type == "FusedMatMul" and list(node.input[1:]) == [transposed] and attrs == {**plain, **attrs} == plain:
        return _input_gradient(name, node.input[0], dequantize, node.output[0], opset, gradients)
    gemm = {"transA": 0, "transB": 1, "alpha": 1.0, "beta": attrs.get("beta", 1.0)}  # a 2-D MatMul's gradient
    if node.op_type == "Gemm" and list(node.input[1:]) == [transposed] and attrs == {**gemm, **attrs} == gemm:
        return _input_gradient(name, node.input[0], dequantize, node.output[0], opset, gradients)
    return None


def _int8_forward(
    name: str, x: str, dequantize: onnx.NodeProto, outputs: list[str], bias: Sequence[str] = ()
) -> list[onnx.NodeProto]:
    """`x @ DQ(W)^T (+ bias)` in int8 on the transposed int8 weight, `x` quantized with one scale for the tensor."""
    quantized, scale = dequantize.input[:2]
    p, weight_t, output = f"{name}/int8", f"{name}/weight_t", outputs[0]
    product = f"{p}/rescaled" if bias else output
    nodes = [
        helper.make_node("Transpose", [quantized], [weight_t], name=f"{name}/transpose_int8", perm=[1, 0]),
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
        helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/max"], name=f"{p}/max", keepdims=1),  # all axes
        helper.make_node("Max", [f"{p}/max", _TINY], [f"{p}/range"], name=f"{p}/range"),
        helper.make_node("Div", [x, f"{p}/range"], [f"{p}/unit"], name=f"{p}/unit"),
        *_u7_matmul(p, f"{p}/unit", weight_t, scale, f"{p}/product"),
        helper.make_node("Mul", [f"{p}/product", f"{p}/range"], [product], name=name),
    ]
    return nodes + ([helper.make_node("Add", [product, bias[0]], [output], name=f"{name}/bias")] if bias else [])


def _u7_matmul(p: str, unit: str, weight: str, weight_scale: str, output: str) -> list[onnx.NodeProto]:
    """`unit @ DQ(weight, weight_scale)` for `unit` in [-1, 1], in int8: `unit` is quantized to uint8 in [1, 127]
    around 64 (7 bits) and MLAS multiplies u8 x s8 (`MatMulIntegerToFloat`).

    7 bits, not 8: without AVX-512 VNNI (an AVX2 machine) MLAS's kernel adds pairs of u8 x s8 products in int16
    with saturation, and uint8 values up to 255 overflow it. Measured here on AVX2, 64 x 576 x 1536:
    `DynamicQuantizeMatMul` (8-bit) 10% max error, 8-bit `MatMulIntegerToFloat` 12%, 7-bit 1.8%, and the 7-bit one
    the fastest (0.93 ms against 1.04 ms, fp32 1.65 ms).
    """
    return [
        helper.make_node("QuantizeLinear", [unit, _U7_SCALE, _U7_ZERO], [f"{p}/u7"], name=f"{p}/quantize"),
        helper.make_node("MatMulIntegerToFloat", [f"{p}/u7", weight, _U7_SCALE, weight_scale, _U7_ZERO], [output],
                         name=f"{p}/matmul", domain=MS_DOMAIN),  # fmt: skip
    ]


def row_int8_forward(
    name: str, x: str, dequantize: onnx.NodeProto, output: str, opset: int, bias: Sequence[str] = ()
) -> list[onnx.NodeProto]:
    """`x @ DQ(W)^T (+ bias)` in int8 with each row of `x` (a token) quantized with its own scale.

    A language model's activations carry a few tokens hundreds of times larger than the rest (SmolLM2's first
    token); one uint8 scale for the whole tensor rounds the others to a handful of levels, and over 30 layers
    the training step's loss was 4.16 where fp32's is 3.67 (per row: 3.71, on the same block). Each row is
    divided by its largest magnitude, quantized (`_u7_matmul`), and the product scaled back.
    """
    quantized, scale = dequantize.input[:2]
    p, weight_t = f"{name}/row_int8", f"{name}/weight_t"
    product = f"{p}/rescaled" if bias else output
    nodes = [
        helper.make_node("Transpose", [quantized], [weight_t], name=f"{name}/transpose_int8", perm=[1, 0]),
        *_row_range(p, x, opset),
        helper.make_node("Div", [x, f"{p}/range"], [f"{p}/unit"], name=f"{p}/unit"),
        *_u7_matmul(p, f"{p}/unit", weight_t, scale, f"{p}/product"),
        helper.make_node("Mul", [f"{p}/product", f"{p}/range"], [product], name=name),
    ]
    return nodes + ([helper.make_node("Add", [product, bias[0]], [output], name=f"{name}/bias")] if bias else [])


def _row_range(p: str, x: str, opset: int) -> list[onnx.NodeProto]:
    """Nodes computing `{p}/range`: each row's largest magnitude of `x` (at least 1e-30, so no 0 / 0)."""
    if opset >= 18:  # the reduced axes became an input in opset 18
        row_max = helper.make_node("ReduceMax", [f"{p}/abs", _LAST_AXIS], [f"{p}/max"], name=f"{p}/max", keepdims=1)
    else:
        row_max = helper.make_node("ReduceMax", [f"{p}/abs"], [f"{p}/max"], name=f"{p}/max", axes=[-1], keepdims=1)
    return [
        helper.make_node("Abs", [x], [f"{p}/abs"], name=f"{p}/abs"),
        row_max,
        helper.make_node("Max", [f"{p}/max", _TINY], [f"{p}/range"], name=f"{p}/range"),
    ]


def _input_gradient(
    name: str, gradient: str, dequantize: onnx.NodeProto, output: str, opset: int, gradients: bool
) -> list[onnx.NodeProto]:
    """`gradient @ DQ(W)`: in int8 with per-row gradient scales if `gradients`, else in fp32.

    A softmax cross-entropy's gradient (into a tied or frozen lm_head) is always multiplied in fp32: its row is
    one value near -1 and tens of thousands of small probabilities, which per-row 7-bit rounding sets to 0, and
    their sum (the push away from every predicted token) is lost. Measured on SmolLM2, 30 steps: held-out
    perplexity 46.9 -> 304 with it in int8, 46.9 -> 39.6 with it in fp32 and the layers' gradients in int8
    (all fp32: 39.4)."""
    if gradients and gradient not in _SOFTMAX_GRADIENTS:
        return row_int8_matmul(name, gradient, *dequantize.input[:2], output, opset)
    return _dequantized_matmul(name, gradient, dequantize, output)


def row_int8_matmul(
    name: str, gradient: str, quantized: str, scale: str, output: str, opset: int
) -> list[onnx.NodeProto]:
    """`gradient @ DQ(quantized, scale)` in int8, each row of `gradient` quantized with its own scale.

    The weight's per-output-channel scale lies on the contracted axis, so it is folded into the gradient
    first; each row is then divided by its largest magnitude and quantized (`_u7_matmul`), and the product is
    scaled back per row.
    """
    p = f"{name}/row_int8"
    return [
        helper.make_node("Mul", [gradient, scale], [f"{p}/scaled"], name=f"{p}/scale"),
        *_row_range(p, f"{p}/scaled", opset),
        helper.make_node("Div", [f"{p}/scaled", f"{p}/range"], [f"{p}/unit"], name=f"{p}/unit"),
        *_u7_matmul(p, f"{p}/unit", quantized, _ONE, f"{p}/product"),
        helper.make_node("Mul", [f"{p}/product", f"{p}/range"], [output], name=name),
    ]


def _dequantized_matmul(name: str, gradient: str, dequantize: onnx.NodeProto, output: str) -> list[onnx.NodeProto]:
    """`gradient @ DQ(W)` in fp32, with a `DequantizeLinear` of its own, so the fp32 weight lives for one matmul.

    A weight of more than `CHUNK_ROWS` rows (a tied lm_head: SmolLM2's 49,152 x 576 is 113 MB in fp32, at the
    backward's start, when the most is alive) is dequantized and multiplied `CHUNK_ROWS` rows at a time.
    """
    rows = _ROWS.get(dequantize.input[0], 0)
    if rows > CHUNK_ROWS:
        return chunked_dequantized_matmul(name, gradient, list(dequantize.input), output, rows)
    weight = f"{name}/weight"
    return [
        helper.make_node("DequantizeLinear", dequantize.input, [weight], name=f"{name}/dequantize", axis=0),
        helper.make_node("MatMul", [gradient, weight], [output], name=name),
    ]


CHUNK_ROWS = 8192
_ROWS: dict[str, int] = {}  # quantized weight -> its rows, for the rewrite under way
_SOFTMAX_GRADIENTS: set[str] = set()  # tensors holding a softmax cross-entropy's gradient, in the rewrite under way
_SHAPE_ONLY = {"Reshape", "Identity", "Squeeze", "Unsqueeze", "Flatten"}


def _softmax_gradients(graph: onnx.GraphProto) -> set[str]:
    """The outputs of `SoftmaxCrossEntropyLossGrad`, and what only reshapes them."""
    found: set[str] = set()
    for node in graph.node:  # topologically sorted: producers first
        if node.op_type == "SoftmaxCrossEntropyLossGrad" or (node.op_type in _SHAPE_ONLY and node.input[0] in found):
            found.update(node.output[:1])
    return found


def chunked_dequantized_matmul(
    name: str, gradient: str, dq_inputs: list[str], output: str, rows: int, chunk: int = CHUNK_ROWS
) -> list[onnx.NodeProto]:
    """`gradient @ DQ(W)` as the sum over row blocks `gradient[..., a:b] @ DQ(W[a:b])`: exact up to float
    summation order, and no fp32 block larger than `chunk` rows of W exists at once.

    Each block's slice of W starts at an offset of 0 computed from the shape of what came before (the gradient,
    then the previous block's product): ORT orders nodes itself, and a `DequantizeLinear` of weights alone could
    otherwise run as early as it likes, all blocks at once (113 MB for SmolLM2's tied lm_head).
    """
    nodes, parts, after = [], [], gradient
    for i, begin in enumerate(range(0, rows, chunk)):
        p = f"{name}/chunk{i}"
        nodes += [
            helper.make_node("Shape", [after], [f"{p}/after"], name=f"{p}/after"),
            helper.make_node("Slice", [f"{p}/after", _FIRST_AXIS, _ONE_END], [f"{p}/first"], name=f"{p}/first"),
            helper.make_node("Sub", [f"{p}/first", f"{p}/first"], [f"{p}/zero"], name=f"{p}/zero"),
        ]
        bounds = [f"{p}/begin", f"{p}/end"]
        for bound, value in zip(bounds, (begin, min(begin + chunk, rows))):
            array = numpy_helper.from_array(np.array([value], np.int64))
            nodes.append(helper.make_node("Constant", [], [f"{bound}_at"], name=f"{bound}_at", value=array))
            nodes.append(helper.make_node("Add", [f"{bound}_at", f"{p}/zero"], [bound], name=bound))
        pieces = []
        for j, tensor in enumerate(dq_inputs):
            pieces.append(f"{p}/w{j}")
            nodes.append(helper.make_node("Slice", [tensor, *bounds, _FIRST_AXIS], [pieces[-1]], name=pieces[-1]))
        nodes.append(helper.make_node("DequantizeLinear", pieces, [f"{p}/weight"], name=f"{p}/dequantize", axis=0))
        nodes.append(helper.make_node("Slice", [gradient, *bounds, _LAST_AXIS], [f"{p}/gradient"], name=f"{p}/g"))
        nodes.append(helper.make_node("MatMul", [f"{p}/gradient", f"{p}/weight"], [f"{p}/product"], name=p))
        parts.append(after := f"{p}/product")
    nodes.append(helper.make_node("Sum", parts, [output], name=name))
    return nodes


def _share_transposes(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """One `Transpose` of each int8 weight however many matmuls read it (a chunked loss's `MatMul`s share the
    tied embedding): the first one's output replaces the others'."""
    first: dict[tuple[str, tuple[int, ...]], str] = {}
    renamed: dict[str, str] = {}
    kept = []
    for node in nodes:
        node.input[:] = [renamed.get(name, name) for name in node.input]
        if node.op_type == "Transpose" and node.name.endswith("/transpose_int8"):
            key = (node.input[0], tuple(_attr(node, "perm", [])))
            if key in first:
                renamed[node.output[0]] = first[key]
                continue
            first[key] = node.output[0]
        kept.append(node)
    return kept


def _row_counts(graph: onnx.GraphProto) -> dict[str, int]:
    """The first dimension of each graph input and initializer that has a fixed one."""
    counts = {i.name: int(i.dims[0]) for i in graph.initializer if i.dims}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            counts[value.name] = int(dims[0].dim_value)
    return counts


def _constants(opset: int) -> list[onnx.TensorProto]:
    """The initializers the rewritten nodes may read (only those read are added)."""
    constants = [
        numpy_helper.from_array(np.array(1.0, np.float32), _ONE),
        numpy_helper.from_array(np.array(1e-30, np.float32), _TINY),
        numpy_helper.from_array(np.array([-1], np.int64), _LAST_AXIS),
        numpy_helper.from_array(np.array([0], np.int64), _FIRST_AXIS),
        numpy_helper.from_array(np.array([1], np.int64), _ONE_END),
        numpy_helper.from_array(np.array(1 / 63, np.float32), _U7_SCALE),
        numpy_helper.from_array(np.array(64, np.uint8), _U7_ZERO),
    ]
    return constants


_ONE, _TINY, _LAST_AXIS, _FIRST_AXIS = "row_int8/one", "row_int8/tiny", "row_int8/last_axis", "row_int8/first_axis"
_U7_SCALE, _U7_ZERO, _ONE_END = "int8/u7_scale", "int8/u7_zero", "int8/one_end"


def _transposed_matmul(node: onnx.NodeProto, transposed: str, weight: str) -> list[onnx.NodeProto] | None:
    """`MatMul(x, Transpose(W))` as `FusedMatMul(x, W, transB=1)`: the same product, with no `Transpose` after
    the `DequantizeLinear`, which ORT's transpose optimizer would otherwise answer with a slow
    per-channel QuantizeLinear/DequantizeLinear pair on every run (700 ms for one MiniLM prediction)."""
    if node.op_type != "MatMul" or list(node.input[1:]) != [transposed]:
        return None
    name = node.name or node.output[0]
    return [
        helper.make_node(
            "FusedMatMul", [node.input[0], weight], list(node.output), name=name, domain=MS_DOMAIN, transB=1
        )
    ]


def _gemm(
    node: onnx.NodeProto, dequantize: onnx.NodeProto, vectors: set[str], opset: int, gradients: bool, rows: bool
) -> list[onnx.NodeProto] | None:
    """The replacement of a 2-D Linear's `Gemm(x, DQ(W), b, transB=1)` or its input gradient
    `Gemm(dy, DQ(W))`, or None."""
    name, weight = node.name or node.output[0], dequantize.output[0]
    attrs = {"alpha": 1.0, "beta": 1.0, "transA": 0, "transB": 0}
    attrs.update((a.name, helper.get_attribute_value(a)) for a in node.attribute)
    if list(node.input[1:2]) != [weight] or attrs["alpha"] != 1.0 or attrs["transA"] != 0:
        return None
    bias = list(node.input[2:3]) if len(node.input) > 2 and node.input[2] and attrs["beta"] == 1.0 else []
    if bias and bias[0] not in vectors:
        return None
    if attrs["transB"] == 1 and (len(node.input) < 3 or not node.input[2] or bias):
        if rows:
            return row_int8_forward(name, node.input[0], dequantize, node.output[0], opset, bias)
        return _int8_forward(name, node.input[0], dequantize, list(node.output), bias)
    if attrs["transB"] == 0 and (len(node.input) < 3 or not node.input[2] or attrs["beta"] == 0.0):
        return _input_gradient(name, node.input[0], dequantize, node.output[0], opset, gradients)
    return None


def _vectors(graph: onnx.GraphProto) -> set[str]:
    """Names of the graph's 1-D inputs and initializers: the biases a matmul can add itself."""
    names = {init.name for init in graph.initializer if len(init.dims) == 1}
    names |= {value.name for value in graph.input if len(value.type.tensor_type.shape.dim) == 1}
    return names


def _gather(node: onnx.NodeProto, quantized: str, scale: str) -> list[onnx.NodeProto]:
    """`Gather(DQ(Wq), ids)` as `Cast(Gather(Wq, ids)) * Unsqueeze(Gather(s, ids), -1)`."""
    name, ids = node.name or node.output[0], node.input[1]
    rows, row_scales, axes = f"{name}/rows_int8", f"{name}/row_scales", f"{name}/axes"
    return [
        helper.make_node("Gather", [quantized, ids], [rows], name=f"{name}/int8", axis=0),
        helper.make_node("Cast", [rows], [f"{rows}_f"], name=f"{name}/cast", to=onnx.TensorProto.FLOAT),
        helper.make_node("Gather", [scale, ids], [row_scales], name=f"{name}/scales", axis=0),
        helper.make_node("Constant", [], [axes], name=f"{name}/axes", value=numpy_helper.from_array(np.array([-1]))),
        helper.make_node("Unsqueeze", [row_scales, axes], [f"{row_scales}_u"], name=f"{name}/unsqueeze"),
        helper.make_node("Mul", [f"{rows}_f", f"{row_scales}_u"], list(node.output), name=name),
    ]


def _attr(node: onnx.NodeProto, name: str, default: object) -> object:
    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == name), default)
