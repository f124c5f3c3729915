"""A causal LM's next-token loss over the vocabulary in row chunks: no (tokens x vocabulary) tensor is built whole.

The traced loss is `SoftmaxCrossEntropyLoss(Reshape(MatMul(h, W^T)), targets)`: at SmolLM2's 1 x 256 tokens the
logits, their log-probabilities (kept for the backward pass) and the logits' gradient are 48 MB each, and they
were the peak of a training step. This pass rewrites the joined forward + loss graph, before the gradient graph is
built, into `CHUNKS` slices of the token rows, each with its own `MatMul` against the same (shared) weight and a
summed cross-entropy, and one division by the number of scored targets at the end:

    loss = sum_c SCE_sum(h[rows_c] @ W^T, targets[rows_c]) / max(#targets != ignore_index, 1)

which is the mean loss the traced graph computes (all targets ignored gives 0, not NaN). Each chunk's logits live
only while its loss is computed; the log-probabilities the backward reads are the chunks', 1/CHUNKS of the
vocabulary-wide tensor each, and the gradient is computed chunk by chunk. The rows are cut into `CHUNKS` equal
parts of whatever the batch holds (padded with ignored rows to a multiple of `CHUNKS`), so the saving scales
with the batch. The model's logits output goes: a causal LM bundle's training and evaluation read the loss alone
(generation has its own graph). With an int8 lm_head, `vocabulary_loss.py` then replaces this loss and the
gradient ORT builds for it in the training graph; the evaluation graph and fp32 bundles keep it.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

CHUNKS = 8
_PREFIX = "chunked_loss"


def chunk_vocabulary_loss_(model: onnx.ModelProto, loss: str, chunks: int = CHUNKS) -> bool:
    """Rewrite `model` in place so the loss output `loss` is computed in `chunks` row chunks; False (nothing
    changed) if `loss` is not a mean `SoftmaxCrossEntropyLoss` of reshaped `MatMul` logits."""
    graph = model.graph
    producer = {out: node for node in graph.node for out in node.output}
    sce = producer.get(loss)
    if sce is None or sce.op_type != "SoftmaxCrossEntropyLoss" or len(sce.input) != 2:
        return False
    attrs = {a.name: helper.get_attribute_value(a) for a in sce.attribute}
    if attrs.get("reduction", b"mean") not in (b"mean", "mean"):
        return False
    reshape = producer.get(sce.input[0])
    matmul = producer.get(reshape.input[0]) if reshape is not None and reshape.op_type == "Reshape" else None
    if matmul is None or matmul.op_type != "MatMul":
        return False
    logits = matmul.output[0]
    if any(logits in n.input for n in graph.node if n is not reshape and n.op_type != "Shape"):
        return False  # something else reads the whole logits: nothing to save
    hidden, weight_t = matmul.input
    targets = sce.input[1]
    ignore = int(attrs.get("ignore_index", -100))
    p = _PREFIX
    c = {name: f"{p}/{name}" for name in ("k", "k1", "zero", "zeros", "ignore", "one_f", "minus_one")}
    constants = [
        numpy_helper.from_array(np.array([chunks], np.int64), c["k"]),
        numpy_helper.from_array(np.array([chunks - 1], np.int64), c["k1"]),
        numpy_helper.from_array(np.array([0], np.int64), c["zero"]),
        numpy_helper.from_array(np.array([0, 0], np.int64), c["zeros"]),
        numpy_helper.from_array(np.array(ignore, np.int64), c["ignore"]),
        numpy_helper.from_array(np.array(1.0, np.float32), c["one_f"]),
        numpy_helper.from_array(np.array([-1], np.int64), c["minus_one"]),
    ] + [numpy_helper.from_array(np.array([i], np.int64), f"{p}/index{i}") for i in range(chunks + 1)]
    nodes = [
        # the hidden states as (rows, features) and the targets, padded (zeros; ignored targets) to `chunks`
        # parts of ceil(rows / chunks): an empty part would not run (ORT's int8 matmul on 0 rows)
        helper.make_node("Shape", [hidden], [f"{p}/features"], name=f"{p}/features", start=-1),
        helper.make_node("Concat", [c["minus_one"], f"{p}/features"], [f"{p}/shape"], name=f"{p}/shape", axis=0),
        helper.make_node("Reshape", [hidden, f"{p}/shape"], [f"{p}/rows"], name=f"{p}/rows"),
        helper.make_node("Shape", [targets], [f"{p}/count"], name=f"{p}/count"),
        helper.make_node("Add", [f"{p}/count", c["k1"]], [f"{p}/rounded"], name=f"{p}/rounded"),
        helper.make_node("Div", [f"{p}/rounded", c["k"]], [f"{p}/size"], name=f"{p}/size"),
        helper.make_node("Mul", [f"{p}/size", c["k"]], [f"{p}/padded"], name=f"{p}/padded"),
        helper.make_node("Sub", [f"{p}/padded", f"{p}/count"], [f"{p}/extra"], name=f"{p}/extra"),
        helper.make_node("Concat", [c["zero"], f"{p}/extra"], [f"{p}/target_pads"], name=f"{p}/target_pads", axis=0),
        helper.make_node("Concat", [c["zeros"], f"{p}/extra", c["zero"]], [f"{p}/row_pads"], name=f"{p}/row_pads",
                         axis=0),  # fmt: skip
        helper.make_node("Pad", [f"{p}/rows", f"{p}/row_pads"], [f"{p}/rows_padded"], name=f"{p}/rows_padded"),
        helper.make_node("Pad", [targets, f"{p}/target_pads", c["ignore"]], [f"{p}/targets_padded"],
                         name=f"{p}/targets_padded"),  # fmt: skip
    ]
    for i in range(chunks + 1):  # chunk boundaries: i * size
        nodes.append(helper.make_node("Mul", [f"{p}/size", f"{p}/index{i}"], [f"{p}/bound{i}"], name=f"{p}/bound{i}"))
    losses = []
    for i in range(chunks):
        q, bounds = f"{p}/chunk{i}", [f"{p}/bound{i}", f"{p}/bound{i + 1}", c["zero"]]
        nodes += [
            helper.make_node("Slice", [f"{p}/rows_padded", *bounds], [f"{q}/hidden"], name=f"{q}/hidden"),
            helper.make_node("Slice", [f"{p}/targets_padded", *bounds], [f"{q}/targets"], name=f"{q}/targets"),
            helper.make_node("MatMul", [f"{q}/hidden", weight_t], [f"{q}/logits"], name=f"{matmul.name}/chunk{i}"),
            helper.make_node("SoftmaxCrossEntropyLoss", [f"{q}/logits", f"{q}/targets"], [f"{q}/loss"],
                             name=f"{q}/loss", reduction="sum", ignore_index=ignore),  # fmt: skip
        ]
        losses.append(f"{q}/loss")
    nodes += [
        *(helper.make_node("Add", [a, b], [out], name=out)  # ORT has no gradient for Sum
          for a, b, out in zip([losses[0]] + [f"{p}/total{i}" for i in range(1, chunks - 1)], losses[1:],
                               [f"{p}/total{i}" for i in range(1, chunks - 1)] + [f"{p}/total"])),
        helper.make_node("Equal", [targets, c["ignore"]], [f"{p}/ignored"], name=f"{p}/ignored"),
        helper.make_node("Not", [f"{p}/ignored"], [f"{p}/scored"], name=f"{p}/scored"),
        helper.make_node("Cast", [f"{p}/scored"], [f"{p}/scored_f"], name=f"{p}/scored_f", to=onnx.TensorProto.FLOAT),
        helper.make_node("ReduceSum", [f"{p}/scored_f"], [f"{p}/scored_n"], name=f"{p}/scored_n", keepdims=0),
        helper.make_node("Max", [f"{p}/scored_n", c["one_f"]], [f"{p}/divisor"], name=f"{p}/divisor"),
        helper.make_node("Div", [f"{p}/total", f"{p}/divisor"], [loss], name=f"{p}/mean"),
    ]
    dropped = {id(matmul), id(reshape), id(sce)}
    kept = [n for n in graph.node if id(n) not in dropped]
    makers = {id(producer[t]) for t in (targets, hidden) if t in producer}
    at = max((i for i, n in enumerate(kept) if id(n) in makers), default=-1)  # after both inputs: topological
    outputs = [o for o in graph.output if o.name != logits]
    del graph.output[:]
    graph.output.extend(outputs)
    del graph.node[:]
    graph.node.extend(_live(kept[: at + 1] + nodes + kept[at + 1 :], {o.name for o in outputs}))
    graph.initializer.extend(constants)
    logger.info("the next-token loss is computed in %d row chunks", chunks)
    return True


def _live(nodes: list[onnx.NodeProto], outputs: set[str]) -> list[onnx.NodeProto]:
    """`nodes` without those nothing reads any more (what computed the logits' shape for the old loss)."""
    needed = set(outputs)
    kept = []
    for node in reversed(nodes):
        if any(out in needed for out in node.output):
            kept.append(node)
            needed.update(node.input)
    return kept[::-1]
