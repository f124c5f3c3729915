"""Trace a LoRA-wrapped torch model and its loss into one ONNX graph that ORT can differentiate."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from peft.tuners.lora.layer import MultiheadAttention as LoraMultiheadAttention
from torch import nn

from edgepeft.errors import ExportError
from edgepeft.export.diagnose import custom_functions_refused, onnx_log_silenced, trace_error
from edgepeft.export.rewrites import traceable_forwards

logger = logging.getLogger(__name__)

LOSS_OUTPUT = "loss"
LABELS_INPUT = "labels"


def export_module(
    module: nn.Module,
    example_inputs: dict[str, torch.Tensor],
    path: Path,
    trainable: list[str],
    opset: int,
) -> onnx.ModelProto:
    """Export a plain module (eval mode, dynamic batch) with output name "output"."""
    dynamic_axes = {name: {0: "batch"} for name in example_inputs}
    dynamic_axes["output"] = {0: "batch"}

    def run_export() -> None:
        torch.onnx.export(
            module,
            tuple(example_inputs.values()),
            str(path),
            input_names=list(example_inputs),
            output_names=["output"],
            dynamic_axes=dynamic_axes,
            opset_version=opset,
            do_constant_folding=False,
            export_params=True,
            dynamo=False,
        )

    return _export(module, run_export, path, trainable, rerun=lambda: module(*example_inputs.values()))


def export_transformers(
    module: nn.Module, task: str, path: Path, trainable: list[str], opset: int, **config_options: object
) -> onnx.ModelProto:
    """Export a transformers model through optimum's exporter (its input names and dynamic axes).

    `config_options` go to optimum's ONNX config (`use_past_in_inputs=True`: a KV-cache graph)."""
    from optimum.exporters.onnx.convert import export_pytorch
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=module, task=task, library_name="transformers"
        )
    except (KeyError, ValueError) as e:
        raise ExportError(f"optimum cannot export {type(module).__name__} for task {task!r}: {e}") from None
    onnx_config = constructor(module.config, **config_options)
    return _export(
        module,
        lambda: export_pytorch(module, onnx_config, opset, path, do_constant_folding=False),
        path,
        trainable,
    )


def _export(
    module: nn.Module, run_export, path: Path, trainable: list[str], rerun: Callable[[], object] | None = None
) -> onnx.ModelProto:
    """Trace `module` with `run_export`; `rerun` (a forward on the example) locates an op torch cannot export."""
    module.eval()
    with torch.no_grad(), _distinct_values(module, trainable) as true_values, _lora_dropout_kept(module):
        with warnings.catch_warnings(), traceable_forwards(), _merged_weights_kept(module) as merged:
            warnings.simplefilter("ignore")
            try:
                with onnx_log_silenced(), custom_functions_refused(module, rerun):
                    run_export()
            except ExportError:
                raise
            except Exception as e:  # torch.onnx's errors: one ExportError naming the module and the op
                raise trace_error(module, e, rerun) from None
    model = onnx.load(str(path))
    _undo_initializer_dedup(model, set(module.state_dict(keep_vars=True)))
    _constants_to_initializers(model, merged)
    _split_shared_norm_params(model, set(trainable))
    _write_back(model, true_values)
    _freeze_batchnorm(model, set(trainable))
    _add_layernorm_stat_outputs(model)
    return model


@contextlib.contextmanager
def _distinct_values(module: nn.Module, names: list[str]) -> Iterator[dict[str, torch.Tensor]]:
    """Give trainable tensors distinct random values while tracing.

    The exporter merges initializers with equal values (every all-zero lora_B would become one shared
    tensor); the true values are written back into the ONNX initializers afterwards.
    """
    saved = {name: module.get_parameter(name).detach().clone() for name in names}
    generator = torch.Generator().manual_seed(0)
    for name in names:
        p = module.get_parameter(name)
        p.copy_(torch.rand(p.shape, generator=generator) + 1.0)
    try:
        yield saved
    finally:
        for name, value in saved.items():
            module.get_parameter(name).copy_(value)


class _TrainingDropout(nn.Module):
    """Dropout that stays a Dropout node in an eval-mode trace; ORT turns it off in the eval model."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.dropout(x, self.p, training=True)


@contextlib.contextmanager
def _lora_dropout_kept(module: nn.Module) -> Iterator[None]:
    swapped = []
    for sub in module.modules():
        dropouts = getattr(sub, "lora_dropout", None)
        if isinstance(dropouts, nn.ModuleDict):
            for key, drop in list(dropouts.items()):
                if isinstance(drop, nn.Dropout) and drop.p > 0:
                    dropouts[key] = _TrainingDropout(drop.p)
                    swapped.append((dropouts, key, drop))
    try:
        yield
    finally:
        for dropouts, key, drop in swapped:
            dropouts[key] = drop


def _copy_initializer(tensor: onnx.TensorProto, name: str) -> onnx.TensorProto:
    copy = onnx.TensorProto()
    copy.CopyFrom(tensor)
    copy.name = name
    return copy


def _undo_initializer_dedup(model: onnx.ModelProto, names: set[str]) -> int:
    """Give each parameter and buffer its own initializer again; returns how many were restored.

    In an eval-mode trace torch's exporter turns an initializer equal in value to an earlier one into
    `Identity(earlier)` (every fresh LayerNorm weight is all ones). ORT then merges those Identity nodes into
    one tensor: two LayerNorm gradients write the same `<scale>_grad` ("Duplicate definition of name"), and
    `_freeze_batchnorm` finds no initializer behind a BatchNorm's statistics.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    nodes, restored = [], 0
    for node in graph.node:
        source = node.input[0] if node.op_type == "Identity" and node.input else ""
        target = node.output[0] if node.output else ""
        if source in initializers and target in names and target not in initializers:
            initializers[target] = _copy_initializer(initializers[source], target)
            graph.initializer.append(initializers[target])
            restored += 1
        else:
            nodes.append(node)
    if restored:
        del graph.node[:]
        graph.node.extend(nodes)
        logger.debug("%d deduplicated initializers restored", restored)
    return restored


@contextlib.contextmanager
def _merged_weights_kept(module: nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Keep the base weights PEFT merges and unmerges in every forward (LoRA on nn.MultiheadAttention).

    PEFT's MultiheadAttention LoRA computes `in_proj_weight.data.detach() + delta` (and the same for out_proj) in
    its forward, then subtracts the delta again: the trace holds the base weights as anonymous constants, and each
    forward moves them by a rounding error. Yields {parameter name: its value before tracing}; restores them after.
    """
    saved: dict[str, torch.Tensor] = {}
    for name, sub in module.named_modules():
        if isinstance(sub, LoraMultiheadAttention):
            base = sub.get_base_layer()
            prefix = f"{name}.base_layer." if name else "base_layer."
            weights = (("in_proj_weight", base, "in_proj_weight"),
                       ("out_proj.base_layer.weight", base.out_proj.get_base_layer(), "weight"))  # fmt: skip
            for attr, owner, key in weights:
                saved[prefix + attr] = (owner, key, getattr(owner, key).detach().clone())
    try:
        yield {name: value for name, (_, _, value) in saved.items()}
    finally:
        for owner, key, value in saved.values():
            getattr(owner, key).data.copy_(value)


def _constants_to_initializers(model: onnx.ModelProto, values: dict[str, torch.Tensor]) -> int:
    """Turn each Constant node holding one of `values` (within rounding) into that parameter's initializer.

    Named again, the weights are quantized, fingerprinted and checkpointed like every other frozen weight.
    Returns how many constants were named.
    """
    graph = model.graph
    held = {i.name for i in graph.initializer}
    wanted = {name: v.cpu().numpy() for name, v in values.items() if name not in held}
    renames: dict[str, str] = {}
    nodes = []
    for node in graph.node:
        tensor = node.attribute[0].t if node.op_type == "Constant" and len(node.attribute) == 1 else None
        name = None
        if tensor is not None and tensor.data_type == onnx.TensorProto.FLOAT and len(tensor.dims) >= 2:
            array = numpy_helper.to_array(tensor)
            name = next((n for n, v in wanted.items() if v.shape == array.shape and _close(array, v)), None)
        if name is None:
            nodes.append(node)
            continue
        if name not in held:
            graph.initializer.append(numpy_helper.from_array(wanted[name], name))
            held.add(name)
        renames[node.output[0]] = name
    if renames:
        del graph.node[:]
        graph.node.extend(nodes)
        for node in graph.node:
            node.input[:] = [renames.get(n, n) for n in node.input]
        logger.debug("constants named as frozen parameters: %s", sorted(set(renames.values())))
    return len(renames)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    return float(np.abs(a - b).max()) <= 1e-4 * max(float(np.abs(b).max()), 1e-12)


# ORT's gradient of these writes `<input>_grad` for its parameter inputs (indices), whoever else reads them.
_NORM_PARAM_INPUTS = {"LayerNormalization": (1, 2)}


def _split_shared_norm_params(model: onnx.ModelProto, trainable: set[str]) -> int:
    """Give every extra use of a frozen normalisation parameter its own copy; returns how many were made.

    A module applied several times (ALBERT's shared layers) feeds the same scale and bias to several
    LayerNormalization nodes, and ORT's LayerNormalizationGrad writes `<scale>_grad` once per node even when
    the scale is frozen ("Duplicate definition of name"). A trainable parameter is never copied (it must
    train as one tensor): its extra uses read it through a chain of Identity nodes, whose gradients add up.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    uses: dict[str, int] = {}
    extra: list[onnx.NodeProto] = []
    copies = 0
    for node in graph.node:
        for index in _NORM_PARAM_INPUTS.get(node.op_type, ()):
            name = node.input[index] if index < len(node.input) else ""
            if name not in initializers:
                continue
            count = uses[name] = uses.get(name, 0) + 1
            if count == 1:
                continue
            copy_name = f"{name}/use{count - 1}"
            if name in trainable:  # a chain of Identity nodes: ORT's CSE cannot merge them, gradients add up
                previous = name if count == 2 else f"{name}/use{count - 2}"
                extra.append(onnx.helper.make_node("Identity", [previous], [copy_name], name=f"{copy_name}/Identity"))
            else:
                graph.initializer.append(_copy_initializer(initializers[name], copy_name))
            node.input[index] = copy_name
            copies += 1
    if extra:
        nodes = extra + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return copies


def _write_back(model: onnx.ModelProto, values: dict[str, torch.Tensor]) -> None:
    initializers = {init.name: init for init in model.graph.initializer}
    missing = [name for name in values if name not in initializers]
    if missing:
        raise ExportError(f"trainable parameters not used by the exported graph: {missing[:5]}")
    for name, value in values.items():
        initializers[name].CopyFrom(numpy_helper.from_array(value.cpu().numpy(), name))


def _freeze_batchnorm(model: onnx.ModelProto, trainable: set[str]) -> None:
    """Turn every BatchNormalization node into per-channel Mul and Add on its frozen running statistics.

    ORT's gradient graph trains BatchNormalization with batch statistics while its eval graph uses the
    running ones; the statistics are never trained, so both graphs must normalise with the running ones,
    as torch's eval mode does. A frozen weight and bias fold into one scale and shift; a trainable weight
    or bias (`bias="all"`, or the BatchNorm in `modules_to_save`) stays a parameter:
    y = (x - mean) / sqrt(var + eps) * weight + bias.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    ranks = {
        v.name: len(v.type.tensor_type.shape.dim)
        for v in list(onnx.shape_inference.infer_shapes(model).graph.value_info) + list(graph.input)
    }
    nodes = []
    for node in graph.node:
        params = list(node.input[1:5])
        if node.op_type != "BatchNormalization" or len(node.output) != 1 or not all(p in initializers for p in params):
            nodes.append(node)
            continue
        if trainable & set(params[2:]):
            raise ExportError(f"BatchNorm {node.name}: its running statistics cannot train")
        weight_name, bias_name = params[:2]
        weight, bias, mean, var = (numpy_helper.to_array(initializers[p]) for p in params)
        eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
        shape = [1, -1] + [1] * (ranks.get(node.input[0], 4) - 2)
        prefix = node.name or node.output[0]
        multiplier = 1.0 / np.sqrt(var + eps)
        if weight_name not in trainable:
            multiplier = multiplier * weight
        shift = -mean * multiplier
        if bias_name not in trainable:
            shift = shift + bias
        names = [f"{prefix}/frozen_{kind}" for kind in ("scale", "shift")]
        for name, value in zip(names, (multiplier, shift)):
            graph.initializer.append(numpy_helper.from_array(value.reshape(shape).astype(np.float32), name))
        steps = [("Mul", names[0]), ("Add", names[1])]
        trained = [(op, name) for name, op in ((weight_name, "Mul"), (bias_name, "Add")) if name in trainable]
        if trained:
            channel_shape = f"{prefix}/channel_shape"
            graph.initializer.append(numpy_helper.from_array(np.array(shape, dtype=np.int64), channel_shape))
            for op, name in trained:
                nodes.append(onnx.helper.make_node("Reshape", [name, channel_shape], [f"{prefix}/{name}/per_channel"]))
                steps.append((op, f"{prefix}/{name}/per_channel"))
        value = node.input[0]
        for index, (op, operand) in enumerate(steps):
            out = node.output[0] if index == len(steps) - 1 else f"{node.output[0]}/step{index}"
            nodes.append(onnx.helper.make_node(op, [value, operand], [out]))
            value = out
    del graph.node[:]
    graph.node.extend(nodes)
    used = {name for node in graph.node for name in node.input}
    unused = [i for i in graph.initializer if i.name not in used]
    for init in unused:
        graph.initializer.remove(init)


def remove_dropout_(model: onnx.ModelProto) -> int:
    """Replace every Dropout node by an Identity: an inference graph must give the same output on every run.

    Returns how many were replaced. A Dropout whose mask output is read cannot be removed (ExportError).
    """
    graph = model.graph
    read = {name for node in graph.node for name in node.input} | {v.name for v in graph.output}
    nodes, count = [], 0
    for node in graph.node:
        if node.op_type != "Dropout":
            nodes.append(node)
            continue
        if len(node.output) > 1 and node.output[1] and node.output[1] in read:
            raise ExportError(f"Dropout {node.name}: its mask is read by the graph, it cannot be turned off")
        nodes.append(onnx.helper.make_node("Identity", [node.input[0]], [node.output[0]], name=f"{node.name}/off"))
        count += 1
    del graph.node[:]
    graph.node.extend(nodes)
    return count


def _add_layernorm_stat_outputs(model: onnx.ModelProto) -> None:
    """ORT's LayerNormalization gradient needs the optional Mean and InvStdDev outputs (opset 17+)."""
    for node in model.graph.node:
        if node.op_type == "LayerNormalization" and len(node.output) == 1:
            node.output.extend([f"{node.output[0]}/mean", f"{node.output[0]}/inv_std_dev"])


class _LossOf(nn.Module):
    def __init__(self, loss_fn: nn.Module):
        super().__init__()
        self.loss_fn = loss_fn

    def forward(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss_fn(output, labels)


def attach_loss(
    forward: onnx.ModelProto,
    loss_fn: nn.Module,
    example_output: torch.Tensor,
    example_labels: torch.Tensor,
    work_dir: Path,
    opset: int,
    dynamic_axes: dict[int, str] | None = None,
) -> onnx.ModelProto:
    """Trace `loss_fn(output, labels)` and join it to `forward`: outputs become (loss, model output).

    `dynamic_axes` are the output's and the labels' dynamic axes (default: the batch, axis 0)."""
    axes = dynamic_axes or {0: "batch"}
    output_name = forward.graph.output[0].name
    path = work_dir / "loss.onnx"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _LossOf(loss_fn).eval(),
                (example_output, example_labels),
                str(path),
                input_names=["loss_input", LABELS_INPUT],
                output_names=[LOSS_OUTPUT],
                dynamic_axes={"loss_input": dict(axes), LABELS_INPUT: dict(axes)},
                opset_version=opset,
                do_constant_folding=False,
                dynamo=False,
            )
    except Exception as e:  # the user's loss module may not trace
        raise ExportError(f"the loss {type(loss_fn).__name__} could not be exported to ONNX: {e}") from None
    loss_model = onnx.load(str(path))
    if loss_model.ir_version != forward.ir_version:
        loss_model.ir_version = forward.ir_version
    clashes = {v.name for v in loss_model.graph.input} & {v.name for v in forward.graph.input}
    if clashes:
        raise ExportError(f"model inputs {sorted(clashes)} clash with the loss's input names")
    try:
        merged = onnx.compose.merge_models(
            forward,
            loss_model,
            io_map=[(output_name, "loss_input")],
            prefix2="loss/",
            outputs=[f"loss/{LOSS_OUTPUT}", output_name],
        )
    except Exception as e:  # onnx's checker on the joined graph
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        joined = f"the model's graph and the loss {type(loss_fn).__name__} could not be joined"
        raise ExportError(f"{joined}: {first[:300]}") from None
    _rename(merged, {f"loss/{LOSS_OUTPUT}": LOSS_OUTPUT, f"loss/{LABELS_INPUT}": LABELS_INPUT})
    # ORT builds the gradient from the first graph output: the loss goes first.
    outputs = sorted(merged.graph.output, key=lambda v: v.name != LOSS_OUTPUT)
    del merged.graph.output[:]
    merged.graph.output.extend(outputs)
    return merged


def _rename(model: onnx.ModelProto, mapping: dict[str, str]) -> None:
    graph = model.graph
    for value in list(graph.input) + list(graph.output):
        value.name = mapping.get(value.name, value.name)
    for node in graph.node:
        node.input[:] = [mapping.get(n, n) for n in node.input]
        node.output[:] = [mapping.get(n, n) for n in node.output]
