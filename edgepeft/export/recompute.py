"""Recompute each transformer block's activations in the backward pass instead of keeping them (checkpointing).

ORT training 1.19.2 keeps every forward tensor the gradient graph reads from the forward pass until the backward
uses it: for SmolLM2-135M at 1 x 256 that is ~25 MB per block, ~750 MB over 30 blocks, more than the int8
weights. ORT's own memory optimizer (`optimization.memory_optimizer_config`) plans recomputation at ORTModule's
forward/backward boundary (a YieldOp) and does nothing for a training graph built by `generate_artifacts`
(measured: same peak). This pass rewrites the training graph itself:

- a block is the forward nodes whose name holds `/layers.N/` (Llama), `/h.N/` (GPT-2), `/layer.N/` or
  `/blocks.N/`, as torch.onnx names them;
- every tensor a block computes from an activation and the backward reads (but what it passes on to the rest of
  the forward: its output, shared rotary tables) is computed a second time by a copy of the block's nodes, and
  the backward reads the copy; the block's first-pass tensors then die in the forward;
- the copy starts from the block's inputs (the hidden state entering the block, the attention mask, rotary
  tables: kept, they are the checkpoint) passed through a `Slice` whose start is 0 computed from the shape of a
  gradient of that block's backward, so the copy cannot run before the backward reaches the block (ORT orders
  nodes itself; without the dependency it may compute the copy early and keep it);
- shape arithmetic (Shape, Constant and what derives from them and from initializers alone) is not copied;
- what a block derives from its weights alone (the int8 weight transposed for `DynamicQuantizeMatMul`, LoRA's
  transposed matrices) is derived again by the copy, from the weights passed through the same gate: kept, those
  tensors held a transposed copy of every frozen weight from the forward pass to the backward (~100 MB for
  SmolLM2).

The copy computes the same ops on the same inputs: the gradients are bit-identical (`tests/test_causal_lm.py`).
The cost is one more forward pass of the blocks (about a third of a step).
"""

from __future__ import annotations

import heapq
import logging
import re
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

logger = logging.getLogger(__name__)

BLOCK = re.compile(r"/(?:layers|h|layer|blocks)\.(\d+)/")
SUFFIX = "/recompute"
_STATIC_OPS = {"Shape", "Size", "Constant", "ConstantOfShape"}
_END, _AXIS = "recompute/end", "recompute/axis"


def recompute_blocks_(model: onnx.ModelProto, data_inputs: list[str], seed: str = "loss_grad") -> int:
    """Rewrite `model` (a training graph from `generate_artifacts`, loss gradient input `seed`, fed the
    examples as `data_inputs`) in place so each block's activations are recomputed for its backward pass.
    Returns the number of blocks rewritten."""
    graph = model.graph
    forward, backward = split_passes(list(graph.node), seed)
    if not backward:
        logger.info("no backward pass found (%s): nothing recomputed", seed)
        return 0
    static = _static_tensors(graph, forward, set(data_inputs))
    weights = {i.name for i in graph.input} - set(data_inputs)  # parameters, trainable or frozen
    producer = {out: node for node in forward for out in node.output}
    backward_reads: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in backward:
        for name in node.input:
            backward_reads[name].append(node)
    backward_made = {out for node in backward for out in node.output}
    position = {id(node): i for i, node in enumerate(backward)}

    blocks: dict[int, list[onnx.NodeProto]] = defaultdict(list)
    for node in forward:
        match = BLOCK.search(node.name)
        if match:
            blocks[int(match.group(1))].append(node)
    forward_reads: dict[str, set[int]] = defaultdict(set)  # tensor -> ids of the forward nodes reading it
    for node in forward:
        for name in node.input:
            forward_reads[name].add(id(node))
    insert: dict[int, list[onnx.NodeProto]] = defaultdict(list)  # backward position -> copies to run before it
    rewritten = 0
    for index, members in sorted(blocks.items()):
        inside = {out for node in members for out in node.output}
        members_ids = {id(node) for node in members}
        # what the block passes on (its output, shared tables) lives on anyway: the backward reads it as it is
        saved = [t for t in inside if t in backward_reads and t not in static and forward_reads[t] <= members_ids]
        if not saved:
            continue
        needed = _ancestors(saved, producer, inside, static)
        copies = [node for node in members if id(node) in needed]
        readers = sorted({id(r): r for t in saved for r in backward_reads[t]}.values(), key=lambda n: position[id(n)])
        first = readers[0]  # the copies go before it (the order is made topological again at the end)
        # the gate: a gradient the first reader that takes one reads (a weight gradient's Reshape of the
        # block's input may come before any gradient)
        gradient = next((name for r in readers for name in r.input if name in backward_made), None)
        if gradient is None:  # the first reader takes no gradient: no tensor to order the copy after
            continue
        prefix = f"recompute/block{index}"
        gate_nodes, gate = _zero_from_shape(prefix, gradient)
        renamed: dict[str, str] = {}
        clones: list[onnx.NodeProto] = list(gate_nodes)
        for node in copies:
            inputs = []
            from_weights = all(not name or name in static for name in node.input)  # gate its weights instead
            for name in node.input:
                if name in renamed:
                    inputs.append(renamed[name])
                elif name and (name not in inside and name not in static or from_weights and name in weights):
                    # a block input (the checkpoint), or a weight something is derived from
                    gated = f"{prefix}/in/{name}"
                    clones.append(helper.make_node("Slice", [name, gate, _END, _AXIS], [gated],
                                                   name=f"{prefix}/gate/{name}"))  # fmt: skip
                    renamed[name] = gated
                    inputs.append(gated)
                else:
                    inputs.append(name)
            outputs = [f"{out}{SUFFIX}" if out else "" for out in node.output]
            renamed.update((old, new) for old, new in zip(node.output, outputs) if old)
            clone = onnx.NodeProto()
            clone.CopyFrom(node)
            clone.name = f"{node.name}{SUFFIX}"
            del clone.input[:], clone.output[:]
            clone.input.extend(inputs)
            clone.output.extend(outputs)
            clones.append(clone)
        for name in saved:
            for reader in backward_reads[name]:
                reader.input[:] = [renamed[i] if i == name else i for i in reader.input]
        insert[position[id(first)]].extend(clones)
        rewritten += 1
    if not rewritten:
        return 0
    ordered = list(forward)
    for i, node in enumerate(backward):
        ordered.extend(insert.get(i, ()))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(_topological(ordered))
    graph.initializer.extend([
        numpy_helper.from_array(np.array([np.iinfo(np.int64).max], np.int64), _END),
        numpy_helper.from_array(np.array([0], np.int64), _AXIS),
        numpy_helper.from_array(np.array([1], np.int64), _ONE_END),
    ])  # fmt: skip
    logger.info("%d blocks recompute their activations in the backward pass", rewritten)
    return rewritten


def split_passes(nodes: list[onnx.NodeProto], seed: str) -> tuple[list[onnx.NodeProto], list[onnx.NodeProto]]:
    """The forward pass and the backward pass (what descends from the loss gradient `seed`, and what only the
    backward reads: a weight gradient's Reshape of a forward activation, a weight dequantized for an input
    gradient), each in the graph's order.

    ORT's gradient builder may write backward nodes among the forward ones (the gradient of a division by the
    count of scored tokens needs only the labels).
    """
    reached = {seed}
    for node in nodes:  # the graph's order is topological: a node's inputs are made before it
        if reached.intersection(node.input):
            reached.update(out for out in node.output if out)
    readers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
    for node in nodes:
        for name in node.input:
            readers[name].append(node)
    backward: set[int] = set()
    for node in reversed(nodes):  # a Shape is the forward's (a gradient's shape may come from it: no cycle)
        users = [user for out in node.output for user in readers[out]]
        only_backward = users and all(id(user) in backward for user in users) and node.op_type not in _STATIC_OPS
        if reached.intersection(node.output) or only_backward:
            backward.add(id(node))
    return [n for n in nodes if id(n) not in backward], [n for n in nodes if id(n) in backward]


def _topological(nodes: list[onnx.NodeProto]) -> list[onnx.NodeProto]:
    """`nodes` in an order where each comes after what it reads, as close to the given order as that allows."""
    made = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    waits = [{made[name] for name in node.input if name in made} for node in nodes]
    users: dict[int, list[int]] = defaultdict(list)
    for i, producers in enumerate(waits):
        for j in producers:
            users[j].append(i)
    left = [len(w) for w in waits]
    ready = [i for i, n in enumerate(left) if n == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(nodes[i])
        for j in users[i]:
            left[j] -= 1
            if not left[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError("the recomputed graph has a cycle")
    return order


def _static_tensors(graph: onnx.GraphProto, forward: list[onnx.NodeProto], data: set[str]) -> set[str]:
    """Initializers, parameters (graph inputs but the data), and forward tensors computed from shapes and those
    alone (cheap, small), but what a block derives from a parameter (as large as the weight)."""
    parameters = {i.name for i in graph.input if i.name not in data}
    static = {i.name for i in graph.initializer} | parameters
    for node in forward:
        if node.op_type in _STATIC_OPS or all(not name or name in static for name in node.input):
            if node.op_type not in _STATIC_OPS and BLOCK.search(node.name) and parameters.intersection(node.input):
                continue
            static.update(out for out in node.output if out)
    return static


def _ancestors(
    targets: list[str], producer: dict[str, onnx.NodeProto], inside: set[str], static: set[str]
) -> set[int]:
    """ids of the block's nodes the targets are computed by, back to the block's inputs and static tensors."""
    seen: set[int] = set()
    stack = list(targets)
    while stack:
        name = stack.pop()
        node = producer.get(name)
        if node is None or name not in inside or name in static or id(node) in seen:
            continue
        seen.add(id(node))
        stack.extend(node.input)
    return seen


def _zero_from_shape(prefix: str, gradient: str) -> tuple[list[onnx.NodeProto], str]:
    """Nodes computing `[0]` (int64, shape [1]) from the shape of `gradient`: a value only the backward has."""
    shape, first, zero = f"{prefix}/shape", f"{prefix}/first", f"{prefix}/zero"
    return [
        helper.make_node("Shape", [gradient], [shape], name=shape),
        helper.make_node("Slice", [shape, _AXIS, _ONE_END], [first], name=first),
        helper.make_node("Sub", [first, first], [zero], name=zero),
    ], zero


_ONE_END = "recompute/one"
