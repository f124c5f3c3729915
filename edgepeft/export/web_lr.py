"""A learning-rate schedule baked into the optimizer graph, for runtimes with no learning-rate setter.

ONNX Runtime Web's training build (npm `onnxruntime-web` 1.19.2) has no `set_learning_rate` and no scheduler:
its optimizer always feeds the graph's `learning_rate` input the default 1e-3. So the optimizer graph computes
the rate itself, from a small table and the optimizer's own `step` input:

    table = [MAGIC (16 bytes), mode, learning_rate, warmup_steps, total_steps, schedule, step_offset, 0, 0]

`mode` 0 (as exported) passes the `learning_rate` input through, so the Python runtime, which sets the rate
through ORT's API every step, computes exactly what it did before. A runtime without a setter rewrites the
table's eight floats in the model's bytes before it opens the optimizer (they follow the 16-byte MAGIC, which
occurs once in the file; the length does not change) with `mode` 1: the rate of run step
`step - 1 + step_offset` (ORT feeds the first step as 1) is then `TrainConfig.learning_rate_at`
(warm-up, then constant/linear/cosine = 0/1/2), computed in float32. `step_offset` lets a resumed run (a fresh
optimizer state, whose first `step` is 1 again) continue the schedule where it stopped. edgepeft/web/src/lr.js
writes the table.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MAGIC = b"edgepeft-lr-v1::"  # 16 bytes: 4 float32 slots that only mark where the table starts
TABLE = "edgepeft_lr_table"
LR_INPUT = "learning_rate"
STEP_INPUT = "step"
FIELDS = ("mode", "learning_rate", "warmup_steps", "total_steps", "schedule", "step_offset")
SCHEDULE_CODES = {"constant": 0, "linear": 1, "cosine": 2}


def bake_learning_rate_(model: onnx.ModelProto) -> None:
    """Rewire the optimizer's `learning_rate` input through the schedule table (see the module docstring)."""
    graph = model.graph
    names = {i.name for i in graph.input}
    if LR_INPUT not in names or STEP_INPUT not in names:
        raise ValueError(f"optimizer graph has no `{LR_INPUT}` and `{STEP_INPUT}` inputs")
    if any(i.name == TABLE for i in graph.initializer):
        return  # already baked
    magic = np.frombuffer(MAGIC, dtype="<f4")
    table = np.concatenate([magic, np.zeros(8, dtype=np.float32)]).astype(np.float32)
    graph.initializer.append(numpy_helper.from_array(table, TABLE))

    def const(name: str, value: float) -> str:
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=np.float32), name))
        return name

    nodes = []

    def node(op: str, inputs: list[str], out: str, **attrs) -> str:
        nodes.append(helper.make_node(op, inputs, [out], name=out, **attrs))
        return out

    p = "edgepeft_lr_"
    field = {}
    for i, key in enumerate(FIELDS):
        index = p + key + "_index"
        graph.initializer.append(numpy_helper.from_array(np.array(len(magic) + i, dtype=np.int64), index))
        field[key] = node("Gather", [TABLE, index], p + key, axis=0)
    one, zero, half = const(p + "one", 1.0), const(p + "zero", 0.0), const(p + "half", 0.5)
    pi = const(p + "pi", float(np.pi))
    step = node("Cast", [STEP_INPUT], p + "step_f", to=TensorProto.FLOAT)
    # ORT counts the step before it runs the graph: the first optimizer step is fed step 1
    s = node("Sub", [node("Add", [step, field["step_offset"]], p + "s_1based"), one], p + "s")
    base = field["learning_rate"]
    warmup = field["warmup_steps"]
    # warm-up: lr * (s + 1) / (warmup + 1)
    warm = node("Div", [node("Mul", [base, node("Add", [s, one], p + "s1")], p + "ws"),
                        node("Add", [warmup, one], p + "w1")], p + "warm")  # fmt: skip
    span = node("Max", [one, node("Sub", [field["total_steps"], warmup], p + "tw")], p + "span")
    progress = node("Div", [node("Sub", [s, warmup], p + "sw"), span], p + "progress")
    linear = node("Mul", [base, node("Max", [zero, node("Sub", [one, progress], p + "1mp")], p + "lin_f")], p + "lin")
    angle = node("Mul", [pi, node("Min", [one, progress], p + "pmin")], p + "angle")
    cos_f = node("Mul", [half, node("Add", [one, node("Cos", [angle], p + "cos")], p + "1pc")], p + "cos_f")
    cosine = node("Mul", [base, cos_f], p + "cosine")
    kind = field["schedule"]
    decayed = node("Where", [node("Less", [kind, half], p + "is_const"), base,
                             node("Where", [node("Less", [kind, const(p + "one_half", 1.5)], p + "is_lin"),
                                            linear, cosine], p + "lin_or_cos")], p + "decayed")  # fmt: skip
    scheduled = node("Where", [node("Less", [s, warmup], p + "warming"), warm, decayed], p + "scheduled")
    baked = node("Where", [node("Greater", [field["mode"], half], p + "baked_mode"), scheduled, LR_INPUT], p + "lr")
    for existing in graph.node:
        for i, name in enumerate(existing.input):
            if name == LR_INPUT:
                existing.input[i] = baked
    # the new nodes first: the graph stays topologically sorted
    old = list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes + old)
    onnx.checker.check_model(model)
