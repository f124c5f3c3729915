"""A causal LM's next-token loss and its gradient, written by hand in vocabulary blocks, in the training graph.

ORT's gradient builder differentiates the chunked loss (`chunked_loss.py`) op by op. For SmolLM2 at 1 x 256
tokens that costs 700 ms of a 2,250 ms step (profiled, AVX-512 machine): each of the 8 row chunks multiplies
32 tokens with the whole 49,152 x 576 int8 table (MLAS repacks the table every call), and its input gradient
dequantizes the whole table again, 8192 rows at a time, for a 32-row fp32 product. This pass replaces the loss
and the gradient of the hidden states entering the lm_head (`h`, N tokens by D) with two passes over blocks of
the vocabulary, every token at once:

    pass 1 (forward):  u = h quantized per row to 7 bits, once; for each block b of W (the int8 table, a scale
                       per row), logits_b = u @ W_b^T in int8 and lse_b = max_b + log sum exp(logits_b - max_b);
                       lse = LogSumExp over the blocks' lse_b
                       loss = sum_t w_t (lse_t - h_t . W[y_t]),   w_t = [y_t scored] / max(#scored, 1)
    pass 2 (backward): g_t = w_t dloss; for each block, logits_b again (the same int8 product),
                       dh += (exp(logits_b - lse) g) @ DQ(W_b) in fp32;  dh -= g W[y]

The label's logit and its gradient row are fp32 (its int8 row gathered times its scale); the softmax is the int8
logits', as before. Each pass-2 block starts from a value of the one before (the previous product, or the loss
gradient), so ORT neither merges it with its pass-1 twin (keeping every block's logits alive across the passes)
nor runs two blocks at once. A block is `N x ceil(V / blocks)` logits: `blocks` is chosen from the bundle's
max_length so that one sequence's block holds about `BLOCK_ELEMENTS`, and is at least 2, so no tensor holds a
sequence's whole logits.
"""

from __future__ import annotations

import logging
import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from edgepeft.export.chunked_loss import _PREFIX as CHUNKED
from edgepeft.export.chunked_loss import _live
from edgepeft.export.int8_compute import MS_DOMAIN, _attr
from edgepeft.export.recompute import _topological

logger = logging.getLogger(__name__)

BLOCK_ELEMENTS = 256 * 8192  # logits of one sequence per vocabulary block: 8 MB in fp32
_P = "vocabulary_loss"


def fuse_vocabulary_loss_(
    model: onnx.ModelProto, loss: str, max_length: int, seed: str = "loss_grad"
) -> bool:
    """Replace, in place, the chunked next-token loss `loss` of a training graph (from `generate_artifacts`,
    loss gradient `seed`) and the gradient ORT built for it by the two-pass blockwise graph; False (nothing
    changed) unless the lm_head multiplies a frozen int8 table (`DequantizeLinear` with a scale per row)."""
    graph = model.graph
    nodes = list(graph.node)
    by_name = {n.name: n for n in nodes}
    producer = {out: n for n in nodes for out in n.output}
    rows, count = by_name.get(f"{CHUNKED}/rows"), by_name.get(f"{CHUNKED}/count")
    matmul, sce = producer.get(f"{CHUNKED}/chunk0/logits"), producer.get(f"{CHUNKED}/chunk0/loss")
    if rows is None or count is None or matmul is None or sce is None or loss not in producer:
        return False
    hidden, targets = rows.input[0], count.input[0]
    gradient = f"{hidden}_grad"
    transpose = producer.get(matmul.input[1])
    dq = producer.get(transpose.input[0]) if transpose is not None and transpose.op_type == "Transpose" else None
    if dq is None or dq.op_type != "DequantizeLinear" or _attr(dq, "axis", 1) != 0 or gradient not in producer:
        return False
    readers = [n for n in nodes if hidden in n.input]
    if any(not n.name.startswith(f"{CHUNKED}/") for n in readers):
        return False  # something else reads h: its gradient is not the loss's alone
    shapes = _shapes(graph)
    table = shapes.get(dq.input[0])
    if table is None or len(table) != 2 or shapes.get(dq.input[1]) != [table[0]]:
        return False
    vocabulary, features = table
    ignore = int(_attr(sce, "ignore_index", -100))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    blocks = max(2, math.ceil(vocabulary * max_length / BLOCK_ELEMENTS))
    bounds = [round(vocabulary * b / blocks) for b in range(blocks + 1)]

    new, constants = _graph(hidden, targets, list(dq.input), loss, gradient, seed, bounds, features, ignore, opset)
    replaced = {id(producer[loss]), id(producer[gradient])}
    at = next(i for i, n in enumerate(nodes) if id(n) == id(producer[loss]))
    kept = [n for n in nodes[:at] if id(n) not in replaced] + new + [n for n in nodes[at:] if id(n) not in replaced]
    del graph.node[:]
    graph.node.extend(_live(_topological(kept), {o.name for o in graph.output}))
    read = {name for n in graph.node for name in n.input}
    # the chunked loss's constants go with its nodes
    kept_inits = [i for i in graph.initializer if i.name in read or not i.name.startswith(f"{CHUNKED}/")]
    del graph.initializer[:]
    graph.initializer.extend(kept_inits + [c for c in constants if c.name in read])
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    logger.info("the next-token loss and its gradient run over %d vocabulary blocks", blocks)
    return True


def _graph(
    hidden: str, targets: str, table: list[str], loss: str, gradient: str, seed: str, bounds: list[int],
    features: int, ignore: int, opset: int,
) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto]]:  # fmt: skip
    """The nodes computing `loss` and `gradient` (dloss/dh) and the constants they read."""
    p = _P
    c = {
        "rows_shape": np.array([-1, features], np.int64), "flat": np.array([-1], np.int64),
        "ignore": np.array(ignore, np.int64), "first_id": np.array(0, np.int64), "one": np.array(1.0, np.float32),
        "tiny": np.array(1e-30, np.float32), "u7_scale": np.array(1 / 63, np.float32),
        "u7_zero": np.array(64, np.uint8), "axis0": np.array([0], np.int64), "axis1": np.array([1], np.int64),
        "one_end": np.array([1], np.int64),
    }
    c.update((f"begin{b}", np.array([v], np.int64)) for b, v in enumerate(bounds[:-1]))
    c.update((f"end{b}", np.array([v], np.int64)) for b, v in enumerate(bounds[1:]))
    k = {name: f"{p}/{name}" for name in c}
    constants = [numpy_helper.from_array(v, k[name]) for name, v in c.items()]
    quantized, scale = table[:2]
    h, rng, u7, y, w, label = (f"{p}/{n}" for n in ("h", "range", "u7", "y", "w", "label"))

    def node(op: str, inputs: list[str], output: str, **attrs) -> onnx.NodeProto:
        return helper.make_node(op, inputs, [output], name=output, **attrs)

    def reduce(op: str, x: str, output: str, axis: int, keepdims: int = 1) -> onnx.NodeProto:
        if op == "ReduceSum" or opset >= 18:  # the reduced axes became an input (ReduceSum's in opset 13)
            return node(op, [x, k["axis1"] if axis == 1 else k["flat"]], output, keepdims=keepdims)
        return node(op, [x], output, axes=[axis], keepdims=keepdims)

    out = [
        # each token's row of h, divided by its largest magnitude and quantized to 7 bits (int8_compute._u7_matmul)
        node("Reshape", [hidden, k["rows_shape"]], h),
        node("Abs", [h], f"{p}/abs"),
        reduce("ReduceMax", f"{p}/abs", f"{p}/max", -1),
        node("Max", [f"{p}/max", k["tiny"]], rng),
        node("Div", [h, rng], f"{p}/unit"),
        node("QuantizeLinear", [f"{p}/unit", k["u7_scale"], k["u7_zero"]], u7),
        # the scored targets' weights w and the label rows of the table, exact: W[y] = int8 row x its scale
        node("Reshape", [targets, k["flat"]], y),
        node("Equal", [y, k["ignore"]], f"{p}/ignored"),
        node("Not", [f"{p}/ignored"], f"{p}/scored"),
        node("Cast", [f"{p}/scored"], f"{p}/scored_f", to=onnx.TensorProto.FLOAT),
        node("ReduceSum", [f"{p}/scored_f"], f"{p}/scored_n", keepdims=0),
        node("Max", [f"{p}/scored_n", k["one"]], f"{p}/divisor"),
        node("Div", [f"{p}/scored_f", f"{p}/divisor"], w),
        node("Where", [f"{p}/scored", y, k["first_id"]], f"{p}/safe_y"),
        node("Gather", [quantized, f"{p}/safe_y"], f"{p}/label_int8", axis=0),
        node("Cast", [f"{p}/label_int8"], f"{p}/label_unit", to=onnx.TensorProto.FLOAT),
        node("Gather", [scale, f"{p}/safe_y"], f"{p}/label_scale", axis=0),
        node("Unsqueeze", [f"{p}/label_scale", k["flat"]], f"{p}/label_scale_col"),
        node("Mul", [f"{p}/label_unit", f"{p}/label_scale_col"], label),
        node("Mul", [h, label], f"{p}/h_label"),
        reduce("ReduceSum", f"{p}/h_label", f"{p}/label_logit", -1),
    ]

    def block(q: str, b: int, after: str) -> tuple[list[onnx.NodeProto], str, list[str]]:
        """Block b's logits, its slice of the table starting at an offset of 0 computed from `after`."""
        zero = f"{q}/zero"
        nodes = [
            node("Shape", [after], f"{q}/after"),
            node("Slice", [f"{q}/after", k["axis0"], k["one_end"]], f"{q}/first"),
            node("Sub", [f"{q}/first", f"{q}/first"], zero),
            node("Add", [k[f"begin{b}"], zero], f"{q}/begin"),
            node("Add", [k[f"end{b}"], zero], f"{q}/end"),
        ]
        pieces = [f"{q}/table{j}" for j in range(len(table))]
        nodes += [node("Slice", [t, f"{q}/begin", f"{q}/end", k["axis0"]], s) for t, s in zip(table, pieces)]
        nodes += [
            node("Transpose", [pieces[0]], f"{q}/table_t", perm=[1, 0]),
            helper.make_node("MatMulIntegerToFloat", [u7, f"{q}/table_t", k["u7_scale"], pieces[1], k["u7_zero"]],
                             [f"{q}/unit_logits"], name=f"{q}/matmul", domain=MS_DOMAIN),  # fmt: skip
            node("Mul", [f"{q}/unit_logits", rng], f"{q}/logits"),
        ]
        return nodes, f"{q}/logits", pieces

    lses, after = [], u7
    for b in range(len(bounds) - 1):
        q = f"{p}/pass1/block{b}"
        nodes, logits, _ = block(q, b, after)
        after = f"{q}/lse"
        out += [  # ORT's ReduceLogSumExp takes 7x as long as these (11.7 against 1.7 ms at 256 x 8192)
            *nodes,
            reduce("ReduceMax", logits, f"{q}/max", 1),
            node("Sub", [logits, f"{q}/max"], f"{q}/shifted"),
            node("Exp", [f"{q}/shifted"], f"{q}/exp"),
            reduce("ReduceSum", f"{q}/exp", f"{q}/sum", 1),
            node("Log", [f"{q}/sum"], f"{q}/log"),
            node("Add", [f"{q}/log", f"{q}/max"], after),
        ]
        lses.append(after)
    lse = f"{p}/lse"
    out += [
        node("Concat", lses, f"{p}/lses", axis=1),
        reduce("ReduceLogSumExp", f"{p}/lses", lse, 1),
        node("Sub", [lse, f"{p}/label_logit"], f"{p}/nll_col"),
        node("Reshape", [f"{p}/nll_col", k["flat"]], f"{p}/nll"),
        node("Mul", [f"{p}/nll", w], f"{p}/weighted"),
        node("ReduceSum", [f"{p}/weighted"], loss, keepdims=0),
        # backward: g = w dloss per token, then the softmax's part block by block, then the label's
        node("Unsqueeze", [w, k["flat"]], f"{p}/w_col"),
        node("Mul", [f"{p}/w_col", seed], f"{p}/g"),
    ]
    parts, after = [], f"{p}/g"
    for b in range(len(bounds) - 1):
        q = f"{p}/pass2/block{b}"
        nodes, logits, pieces = block(q, b, after)
        after = f"{q}/product"
        out += [
            *nodes,
            node("Sub", [logits, lse], f"{q}/shifted"),
            node("Exp", [f"{q}/shifted"], f"{q}/probabilities"),
            node("Mul", [f"{q}/probabilities", f"{p}/g"], f"{q}/weighted"),
            node("DequantizeLinear", pieces, f"{q}/weight", axis=0),
            node("MatMul", [f"{q}/weighted", f"{q}/weight"], after),
        ]
        parts.append(after)
    out += [
        node("Sum", parts, f"{p}/softmax_part"),
        node("Mul", [f"{p}/g", label], f"{p}/label_part"),
        node("Sub", [f"{p}/softmax_part", f"{p}/label_part"], f"{p}/dh"),
        node("Shape", [hidden], f"{p}/hidden_shape"),
        node("Reshape", [f"{p}/dh", f"{p}/hidden_shape"], gradient),
    ]
    return out, constants


def _shapes(graph: onnx.GraphProto) -> dict[str, list[int]]:
    """The fixed shape of each initializer and graph input that has one."""
    shapes = {i.name: list(i.dims) for i in graph.initializer}
    for value in graph.input:
        dims = value.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims):
            shapes[value.name] = [d.dim_value for d in dims]
    return shapes
