"""Compile an ONNX model with no torch source (`export("model.onnx", ...)`) into a training bundle.

The graph is taken as it is, as ONNX Runtime's on-device tutorials start from one:

- LoRA goes on MatMul, Gemm and Conv nodes whose weight (input 1) is an initializer. `LoraSpec.target_modules`
  keeps its torch meaning over three names of each such node: its *module name* (below), its initializer's
  name and its node's name. A list matches a name equal to an item or ending in `.item` or `/item` (PEFT's
  suffix match); a string is one regular expression that must match one of the names in full.
  The update is PEFT's: `y + B(A(x)) * alpha / r`, A (`r x in`, or `r x in x kernel` for a Conv, with the
  Conv's strides and pads) drawn as PEFT draws it (kaiming-uniform, a=sqrt(5), seeded by `options.seed`),
  B (`out x r`, or `out x r x 1 x 1`) zero. A Conv takes LoRA only with group 1 and dilation 1 (as PEFT).
- A new Linear head (`head.weight` `labels x features`, `head.bias`, torch's default init) reads the value
  named by `options.head_on`; a value of more than two dimensions is pooled first (`options.head_pooling`:
  mean or max over every axis but the batch and `options.head_feature_axis`, or flatten). The graph's only
  output becomes the head's, `logits`; what the head does not read is pruned.
- Everything else is frozen; with int8, every frozen MatMul/Gemm/Conv/Gather weight is stored as int8 by
  `quantize.py` (a MatMul's `in x out` weight is stored transposed, one scale per output channel), then the
  loss is attached and the artifacts, adapter config and manifest are written as for a torch model.

Adapters of such a bundle are PEFT adapters whose module names come from the graph: a weight initializer
named `NAME.weight` (as torch names them) gives module `NAME`, otherwise the node's name with `/` read as
`.`, less a last part that is the op type (`/fc1/MatMul` -> `fc1`), else the initializer's name. Keys are PEFT's:
`base_model.model.<module>.lora_A.weight`, `...lora_B.weight`, `base_model.model.head.weight` and `.bias`
(`modules_to_save: ["head"]`); an ONNX file exported from a torch model thus names its Linear LoRA as PEFT
does on that model. The base fingerprint is the sha256 of every initializer of the model as loaded.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import helper, numpy_helper
from torch import nn

from edgepeft import manifest as mf
from edgepeft.errors import ExportError
from edgepeft.export import bundle as compile_
from edgepeft.export.gelu_grad import decompose_gelu_grad_
from edgepeft.export.graph import _add_layernorm_stat_outputs, _freeze_batchnorm, attach_loss
from edgepeft.export.lora import _config_dict
from edgepeft.export.quantize import quantize_initializers_
from edgepeft.export.spec import ExportOptions, LoraSpec
from edgepeft.fileio import atomic_directory, sha256_file

logger = logging.getLogger(__name__)

LORA_OPS = ("MatMul", "Gemm", "Conv")
HEAD = "head"
OUTPUT = "logits"
MIN_OPSET = 13  # the loss (SoftmaxCrossEntropyLoss, ReduceMean with axes attributes) is traced at the model's opset


def is_onnx_source(model: object) -> bool:
    """True for an `onnx.ModelProto`, a path ending in `.onnx`, or an existing file: the ONNX-only path."""
    if isinstance(model, onnx.ModelProto):
        return True
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        return path.suffix.lower() == ".onnx" or path.is_file()
    return False


@dataclass
class _Target:
    node: onnx.NodeProto
    weight: str  # the initializer name
    module: str  # the PEFT module name

    @property
    def names(self) -> tuple[str, ...]:
        return (self.module, self.weight, self.node.name)


@dataclass
class _Built:
    graph: onnx.ModelProto  # the forward graph: LoRA and head added, trainable values in place
    adapter_keys: dict[str, str]  # ONNX initializer name -> PEFT key
    peft_config: dict
    fingerprint: str
    opset: int


def export_onnx(
    source: onnx.ModelProto | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    lora: LoraSpec,
    options: ExportOptions,
    loss_fn: nn.Module | None = None,
    example_labels: torch.Tensor | None = None,
    overwrite: bool = False,
) -> mf.Manifest:
    """Compile the ONNX model `source` (a path or a ModelProto) into a bundle; see the module docstring."""
    if (options.loss == "custom") != (loss_fn is not None):
        raise ExportError("pass `loss_fn` exactly when options.loss is 'custom'")
    loss_module = loss_fn if loss_fn is not None else compile_._BUILTIN_LOSSES[options.loss]()
    built = build_forward(load_onnx(source), lora, options)
    base_names = (options.base_name,) if options.base_name else _source_names(source)
    built.peft_config["base_model_name_or_path"] = base_names[0] if base_names else None  # as the torch path
    forward, trainable = built.graph, list(built.adapter_keys)
    example_output = torch.zeros(2, len(options.labels))
    if example_labels is None:
        example_labels = compile_._default_labels(options.loss, example_output)
    held = {i.name: i for i in forward.graph.initializer}
    shapes = {name: tuple(int(d) for d in held[name].dims) for name in trainable}
    floats = [n for n, i in held.items() if n not in built.adapter_keys and i.data_type == onnx.TensorProto.FLOAT]
    quantized = _prepare_quantization(forward, floats) if options.quantization == "int8" else []
    frozen = [  # every float initializer but the trainable ones is a frozen parameter (after any transposing)
        i.name
        for i in forward.graph.initializer
        if i.data_type == onnx.TensorProto.FLOAT and i.name not in built.adapter_keys and i.name not in quantized
    ]
    if quantized:
        frozen += quantize_initializers_(forward, quantized)
    int8_compute = bool(quantized) and options.int8_compute

    with atomic_directory(output_dir, compile_.BUNDLE, overwrite=overwrite) as out, tempfile.TemporaryDirectory() as t:
        compile_._save(forward, out / mf.INFERENCE_MODEL, int8_compute, inference=True)
        full = attach_loss(forward, loss_module, example_output, example_labels, Path(t), built.opset)
        _add_loss_log_prob(full)
        _generate_artifacts(full, trainable, frozen, options.optimizer, out)
        training = onnx.load(str(out / mf.TRAINING_MODEL))
        decompose_gelu_grad_(training)
        gradients = options.int8_gradients
        compile_._save(training, out / mf.TRAINING_MODEL, int8_compute, matmuls=True, gradients=gradients)
        compile_._save(onnx.load(str(out / mf.EVAL_MODEL)), out / mf.EVAL_MODEL, int8_compute, inference=True)
        compile_._check_loadable(out / mf.TRAINING_MODEL)  # a bundle the device cannot load is never written
        (out / mf.ADAPTER_CONFIG).write_text(json.dumps(built.peft_config, indent=2, sort_keys=True) + "\n")
        manifest = mf.Manifest(
            inputs=tuple(compile_._spec(v) for v in forward.graph.input if v.name not in held),
            outputs=tuple(compile_._spec(v) for v in forward.graph.output),
            label=compile_._label_spec(example_labels),
            loss=options.loss,
            optimizer=options.optimizer,
            quantization=options.quantization,
            trainable=tuple(mf.ParamSpec(name, key, shapes[name]) for name, key in built.adapter_keys.items()),
            base_fingerprint=built.fingerprint,
            files={p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
            peft_config=built.peft_config,
            labels=options.labels,
            base_names=base_names,
            versions=compile_._versions(),
            stats={
                "trainable_parameters": int(sum(math.prod(s) for s in shapes.values())),
                "quantized_weights": len(quantized),
                "int8_compute": int8_compute,
                "int8_gradients": int8_compute and gradients,
                "source": "onnx",
            },
        )
        manifest.save(out)
        if options.profile_memory:
            manifest.stats[compile_.PROFILE_KEY] = compile_._profile_memory(out)
            manifest.save(out)
    logger.info("bundle written to %s (from an ONNX model)", output_dir)
    return manifest


_NO_GRADIENT = re.compile(r"gradient builder has not been registered: (\S+) for node (.*)")


def _generate_artifacts(model: onnx.ModelProto, trainable: list[str], frozen: list[str], optimizer: str, out: Path):
    """The torch path's artifact generation; an op ORT cannot differentiate is named with what to do."""
    try:
        compile_._generate_artifacts(model, trainable, frozen, optimizer, out)
    except ExportError as e:
        found = _NO_GRADIENT.search(str(e.__context__ or ""))
        if found is None:
            raise
        op, node = found.group(1), found.group(2).strip()
        raise ExportError(
            f"the ONNX model's {op} node {node!r} lies between a LoRA weight and the head, and ONNX Runtime has no "
            f"gradient for {op}: put LoRA only on weights after it (target_modules), or the head before it (head_on)"
        ) from None


def _source_names(source: object) -> tuple[str, ...]:
    """A file's name without `.onnx` (`embedding_model`): the portable name adapters record for their base."""
    if isinstance(source, (str, os.PathLike)):
        return (Path(source).stem,)
    return ()


def load_onnx(source: onnx.ModelProto | str | os.PathLike) -> onnx.ModelProto:
    """Load and check an ONNX model; a copy of a ModelProto passed in (the caller's stays unchanged)."""
    if isinstance(source, onnx.ModelProto):
        model, where = copy.deepcopy(source), "the ONNX model passed in"
    else:
        path = Path(source)
        where = str(path)
        if not path.is_file():
            raise ExportError(f"ONNX model {path} does not exist or is not a file")
        try:
            model = onnx.load(str(path))
        except Exception as e:  # protobuf's DecodeError, a missing external-data file, ...
            raise ExportError(f"{path} does not load as an ONNX model: {str(e).splitlines()[0][:300]}") from None
    try:
        onnx.checker.check_model(model)
    except Exception as e:
        raise ExportError(f"{where} is not a valid ONNX model: {str(e).splitlines()[0][:300]}") from None
    opset = _opset(model)
    if opset < MIN_OPSET:
        try:
            model = onnx.version_converter.convert_version(model, MIN_OPSET)
        except Exception as e:
            raise ExportError(f"{where} has opset {opset}; converting it to {MIN_OPSET} failed: {e}") from None
    return model


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def build_forward(base: onnx.ModelProto, lora: LoraSpec, options: ExportOptions) -> _Built:
    """The forward graph of the bundle: `base` with LoRA on the targets, a new head, the rest pruned."""
    if lora.bias != "none" or lora.modules_to_save:
        raise ExportError("an ONNX model trains LoRA and the new head only: use bias='none' and no modules_to_save")
    if options.head_on is None:
        raise ExportError("an ONNX model needs `head_on`: the name of the graph value the new head reads")
    if not options.labels:
        raise ExportError("an ONNX model needs `labels`: their number is the new head's width")
    fingerprint = compile_._fingerprint(base, [i.name for i in base.graph.initializer])
    model = copy.deepcopy(base)
    held = {i.name for i in model.graph.initializer}
    for value in [v for v in model.graph.input if v.name in held]:  # IR < 4 lists initializers as inputs too
        model.graph.input.remove(value)
    _freeze_batchnorm(model, set())
    _add_layernorm_stat_outputs(model)
    rng = np.random.default_rng(options.seed)
    targets = find_targets(model, lora.target_modules)
    adapter_keys: dict[str, str] = {}
    for target in targets:
        adapter_keys.update(_add_lora(model, target, lora, rng))
    adapter_keys.update(_add_head(model, options, rng))
    _prune(model)
    config = peft_config(sorted(t.module for t in targets), lora)
    logger.info("LoRA on %d ONNX weights, head on %r", len(targets), options.head_on)
    return _Built(model, adapter_keys, config, fingerprint, _opset(model))


def _add_loss_log_prob(model: onnx.ModelProto) -> None:
    """ORT's SoftmaxCrossEntropyLoss gradient reads the optional log_prob output. ORT's own rule adds it, but not
    always: with LoRA on one Conv of the wake-word model `generate_artifacts` failed (`GradientBuilderBase::O ...
    i < node_->OutputDefs().size()`) until it was there."""
    for node in model.graph.node:
        if node.op_type == "SoftmaxCrossEntropyLoss" and len(node.output) == 1:
            node.output.append(f"{node.output[0]}/log_prob")


def peft_config(modules: list[str], lora: LoraSpec) -> dict:
    """adapter_config.json, as PEFT writes it for these module names and a trained head."""
    import peft

    config = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=modules, bias="none",
        modules_to_save=[HEAD],
    )  # fmt: skip
    data = _config_dict(config)
    data["inference_mode"] = True
    return data


def candidates(model: onnx.ModelProto) -> list[_Target]:
    """Every MatMul, Gemm and Conv node whose weight (input 1) is a float initializer."""
    initializers = {i.name: i for i in model.graph.initializer}
    found = []
    for node in model.graph.node:
        if node.op_type not in LORA_OPS or len(node.input) < 2:
            continue
        init = initializers.get(node.input[1])
        if init is None or init.data_type != onnx.TensorProto.FLOAT:
            continue
        found.append(_Target(node, init.name, _module_name(init.name, node)))
    return found


def _module_name(weight: str, node: onnx.NodeProto) -> str:
    """`fc1.weight` -> `fc1`; else the node's name as a module path, less a last part naming its op type
    (torch's `/fc1/MatMul` -> `fc1`, tf2onnx's `model/dense/MatMul` -> `model.dense`); else the weight's name."""
    if weight.endswith(".weight") and len(weight) > len(".weight"):
        return weight.removesuffix(".weight")
    parts = [p for p in node.name.split("/") if p]
    if len(parts) > 1 and re.fullmatch(rf"{node.op_type}(_\d+)?", parts[-1]):
        parts = parts[:-1]
    return ".".join(parts) or weight


def find_targets(model: onnx.ModelProto, patterns: tuple[str, ...] | str | None) -> list[_Target]:
    """The LoRA targets `patterns` select (see the module docstring), or an ExportError naming what there is."""
    every = candidates(model)
    if patterns is None:
        listed = ", ".join(f"{t.module} ({t.node.op_type})" for t in every[:12]) or "none"
        raise ExportError(f"an ONNX model needs `target_modules`: the weights to adapt (adaptable: {listed}"
                          f"{' ...' if len(every) > 12 else ''})")  # fmt: skip
    if isinstance(patterns, str):
        try:
            regex = re.compile(patterns)
        except re.error as e:
            raise ExportError(f"target_modules {patterns!r} is not a regular expression: {e}") from None
        chosen = [t for t in every if any(regex.fullmatch(n) for n in t.names if n)]
    else:
        chosen = [t for t in every if any(_suffix_match(n, p) for n in t.names if n for p in patterns)]
    if not chosen:
        listed = ", ".join(f"{t.module} ({t.node.op_type}, weight {t.weight})" for t in every[:12])
        raise ExportError(
            f"target_modules {patterns!r} match no MatMul/Gemm/Conv weight of the ONNX model; "
            + (f"adaptable: {listed}" + (" ..." if len(every) > 12 else "") if every else "it has none")
        )
    weights = [t.weight for t in chosen]
    shared = sorted({w for w in weights if weights.count(w) > 1})
    if shared:
        raise ExportError(f"LoRA on a weight several nodes share is not supported: {shared[:3]}")
    modules = [t.module for t in chosen]
    clash = sorted({m for m in modules if modules.count(m) > 1})
    if clash:
        raise ExportError(f"several LoRA targets get the same module name {clash[:3]}: target fewer, by node name")
    return chosen


def _suffix_match(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith(("." + pattern, "/" + pattern))


def _kaiming_uniform(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """torch's `kaiming_uniform_(a=sqrt(5))`, as PEFT draws lora_A and torch a Linear's weight: U(+-1/sqrt(fan_in))."""
    bound = 1.0 / math.sqrt(max(1, math.prod(shape[1:])))
    return rng.uniform(-bound, bound, size=shape).astype(np.float32)


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in node.attribute}


def _add_lora(model: onnx.ModelProto, target: _Target, lora: LoraSpec, rng: np.random.Generator) -> dict[str, str]:
    """Insert `y += B(A(dropout(x))) * alpha / r` after the target node; returns {ONNX name: PEFT key}."""
    graph, node = model.graph, target.node
    weight = numpy_helper.to_array(next(i for i in graph.initializer if i.name == target.weight))
    attrs, r, where = _attrs(node), lora.r, f"{node.op_type} {node.name or node.output[0]} (weight {target.weight})"
    prefix = f"{target.module}.lora"
    names = {kind: f"{target.module}.lora_{kind}.weight" for kind in "AB"}
    taken = {i.name for i in graph.initializer} | {v for n in graph.node for v in n.output}
    if taken & set(names.values()):
        raise ExportError(f"{where}: the model already holds a value named {min(taken & set(names.values()))}")
    x = node.input[0]
    nodes: list[onnx.NodeProto] = []
    if lora.dropout > 0:
        nodes += [
            _constant(f"{prefix}/dropout_ratio", np.array(lora.dropout, np.float32)),
            _constant(f"{prefix}/dropout_training", np.array(True)),
            helper.make_node(
                "Dropout", [x, f"{prefix}/dropout_ratio", f"{prefix}/dropout_training"], [f"{prefix}/x"],
                name=f"{prefix}/dropout",
            ),
        ]  # fmt: skip
        x = f"{prefix}/x"
    if node.op_type == "MatMul":
        if weight.ndim != 2:
            raise ExportError(f"{where}: LoRA needs a 2-D MatMul weight, this one is {weight.shape}")
        fan_in, fan_out = weight.shape
        a_shape, b_shape = (r, fan_in), (fan_out, r)
        nodes += [
            helper.make_node("Transpose", [names["A"]], [f"{prefix}/A_t"], name=f"{prefix}/A_t", perm=[1, 0]),
            helper.make_node("MatMul", [x, f"{prefix}/A_t"], [f"{prefix}/h"], name=f"{prefix}/A"),
            helper.make_node("Transpose", [names["B"]], [f"{prefix}/B_t"], name=f"{prefix}/B_t", perm=[1, 0]),
            helper.make_node("MatMul", [f"{prefix}/h", f"{prefix}/B_t"], [f"{prefix}/d"], name=f"{prefix}/B"),
        ]
    elif node.op_type == "Gemm":
        if attrs.get("transA", 0):
            raise ExportError(f"{where}: LoRA on a Gemm with transA=1 is not supported")
        fan_out, fan_in = weight.shape if attrs.get("transB", 0) else weight.shape[::-1]
        a_shape, b_shape = (r, fan_in), (fan_out, r)
        nodes += [
            helper.make_node("Gemm", [x, names["A"]], [f"{prefix}/h"], name=f"{prefix}/A", transB=1),
            helper.make_node("Gemm", [f"{prefix}/h", names["B"]], [f"{prefix}/d"], name=f"{prefix}/B", transB=1),
        ]
    else:  # Conv
        if attrs.get("group", 1) != 1 or any(d != 1 for d in attrs.get("dilations", [])):
            raise ExportError(f"{where}: LoRA on a Conv needs group 1 and dilation 1 (as PEFT's), this one has "
                              f"group {attrs.get('group', 1)}, dilations {attrs.get('dilations')}")  # fmt: skip
        kernel = weight.shape[2:]
        a_shape, b_shape = (r, weight.shape[1], *kernel), (weight.shape[0], r, *(1,) * len(kernel))
        geometry = {k: v for k, v in attrs.items() if k in ("kernel_shape", "strides", "pads", "auto_pad")}
        nodes += [
            helper.make_node("Conv", [x, names["A"]], [f"{prefix}/h"], name=f"{prefix}/A", **geometry),
            helper.make_node("Conv", [f"{prefix}/h", names["B"]], [f"{prefix}/d"], name=f"{prefix}/B"),
        ]
    y = node.output[0]
    node.output[0] = f"{prefix}/base"
    nodes += [
        _constant(f"{prefix}/scale", np.array(lora.alpha / r, np.float32)),
        helper.make_node("Mul", [f"{prefix}/d", f"{prefix}/scale"], [f"{prefix}/scaled"], name=f"{prefix}/scale_mul"),
        helper.make_node("Add", [f"{prefix}/base", f"{prefix}/scaled"], [y], name=f"{prefix}/add"),
    ]
    graph.initializer.extend([
        numpy_helper.from_array(_kaiming_uniform(rng, a_shape), names["A"]),
        numpy_helper.from_array(np.zeros(b_shape, np.float32), names["B"]),  # distinct names: never merged
    ])  # fmt: skip
    position = list(graph.node).index(node) + 1
    for offset, new in enumerate(nodes):
        graph.node.insert(position + offset, new)
    return {names[k]: f"base_model.model.{names[k]}" for k in "AB"}


def _constant(name: str, value: np.ndarray) -> onnx.NodeProto:
    return helper.make_node("Constant", [], [name], name=name, value=numpy_helper.from_array(value, name))


def _add_head(model: onnx.ModelProto, options: ExportOptions, rng: np.random.Generator) -> dict[str, str]:
    """A new Linear on `options.head_on` (pooled to 2-D first), as the graph's one output `logits`."""
    graph, source = model.graph, options.head_on
    produced = {v for n in graph.node for v in n.output} | {v.name for v in graph.input}
    if source not in produced:
        outputs = [v.name for v in graph.output]
        raise ExportError(f"head_on {source!r} is no value of the ONNX graph; its outputs are {outputs}")
    shape = _shape_of(model, source)
    if shape is None or len(shape) < 2:
        raise ExportError(f"head_on {source!r}: its shape {shape} is unknown or has no feature axis")
    rank = len(shape)
    feature_axis = options.head_feature_axis % rank
    if feature_axis == 0:
        raise ExportError(f"head_feature_axis {options.head_feature_axis} is the batch axis of {source!r} {shape}")
    nodes: list[onnx.NodeProto] = []
    pooled = source
    if rank == 2:
        features = shape[1]
    elif options.head_pooling == "flatten":
        features = math.prod(d for d in shape[1:] if isinstance(d, int))
        if not all(isinstance(d, int) and d > 0 for d in shape[1:]):
            raise ExportError(f"head_pooling 'flatten' needs fixed non-batch dimensions; {source!r} is {shape}")
        nodes.append(helper.make_node("Flatten", [source], ["head/pooled"], name="head/flatten", axis=1))
        pooled = "head/pooled"
    else:
        axes = [a for a in range(1, rank) if a != feature_axis]
        features = shape[feature_axis]
        op = {"mean": "ReduceMean", "max": "ReduceMax"}[options.head_pooling]
        if _opset(model) >= 18:
            nodes.append(_constant("head/axes", np.array(axes, np.int64)))
            nodes.append(helper.make_node(op, [source, "head/axes"], ["head/pooled"], name="head/pool", keepdims=0))
        else:
            nodes.append(helper.make_node(op, [source], ["head/pooled"], name="head/pool", axes=axes, keepdims=0))
        pooled = "head/pooled"
    if not isinstance(features, int) or features <= 0:
        raise ExportError(f"head_on {source!r}: its feature axis {feature_axis} has no fixed size ({shape})")
    taken = {i.name for i in graph.initializer} | produced
    if taken & {f"{HEAD}.weight", f"{HEAD}.bias", OUTPUT, "head/pooled"}:
        raise ExportError(f"the ONNX model already holds a value named {HEAD}.weight, {HEAD}.bias or {OUTPUT}")
    width = len(options.labels)
    bound = 1.0 / math.sqrt(features)
    graph.initializer.extend([
        numpy_helper.from_array(_kaiming_uniform(rng, (width, features)), f"{HEAD}.weight"),
        numpy_helper.from_array(rng.uniform(-bound, bound, width).astype(np.float32), f"{HEAD}.bias"),
    ])  # fmt: skip
    nodes.append(
        helper.make_node("Gemm", [pooled, f"{HEAD}.weight", f"{HEAD}.bias"], [OUTPUT], name=f"{HEAD}/gemm", transB=1)
    )
    graph.node.extend(nodes)
    batch = shape[0] if shape[0] != "?" else "batch"
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(OUTPUT, onnx.TensorProto.FLOAT, [batch, width]))
    return {f"{HEAD}.weight": f"base_model.model.{HEAD}.weight", f"{HEAD}.bias": f"base_model.model.{HEAD}.bias"}


def _shape_of(model: onnx.ModelProto, name: str) -> tuple[int | str, ...] | None:
    """The inferred shape of value `name` (a string for a dynamic dimension), or None if unknown."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    for value in list(g.input) + list(g.value_info) + list(g.output):
        if value.name == name and value.type.tensor_type.HasField("shape"):
            return tuple(d.dim_param or d.dim_value or "?" for d in value.type.tensor_type.shape.dim)
    return None


def _prune(model: onnx.ModelProto) -> None:
    """Drop the nodes, initializers and inputs the graph's output does not need (the old outputs' other uses)."""
    graph = model.graph
    needed = {v.name for v in graph.output}
    kept = []
    for node in reversed(list(graph.node)):
        if any(o in needed for o in node.output):
            kept.append(node)
            needed.update(i for i in node.input if i)
            for attr in node.attribute:  # subgraphs (If, Loop) read outer values
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    needed.update(i for n in sub.node for i in n.input)
    del graph.node[:]
    graph.node.extend(reversed(kept))
    for init in [i for i in graph.initializer if i.name not in needed]:
        graph.initializer.remove(init)
    for value in [v for v in graph.input if v.name not in needed]:
        graph.input.remove(value)


def _prepare_quantization(model: onnx.ModelProto, frozen: list[str]) -> list[str]:
    """The frozen weights to store as int8, each with its output channels on axis 0 as `quantize.py` needs.

    A weight qualifies when every use reads it as a MatMul/Gemm/Conv weight or a Gather table. A MatMul's
    (or a Gemm's without transB) `in x out` weight `W` is replaced by `W.transposed` (`out x in`): Gemms
    read it with transB=1, MatMuls through a Transpose, the pattern `int8_compute.py` multiplies in int8.
    """
    graph = model.graph
    initializers = {i.name: i for i in graph.initializer}
    uses: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for index, name in enumerate(node.input):
            uses.setdefault(name, []).append((node, index))
    chosen, transposes = [], []
    for name in frozen:
        init = initializers[name]
        if len(init.dims) < 2 or not uses.get(name) or any(v.name == name for v in graph.output):
            continue
        layouts = {_layout(node, index, len(init.dims)) for node, index in uses[name]}
        if None in layouts or len(layouts) != 1:
            continue
        if layouts == {"in_out"}:
            value = numpy_helper.to_array(init)
            transposed = f"{name}.transposed"
            graph.initializer.remove(init)
            graph.initializer.append(numpy_helper.from_array(np.ascontiguousarray(value.T), transposed))
            for node, index in uses[name]:
                if node.op_type == "Gemm":
                    node.input[index] = transposed
                    _set_attr(node, "transB", 1)
            if any(node.op_type == "MatMul" for node, _ in uses[name]):
                transposes.append(helper.make_node("Transpose", [transposed], [name], name=f"{name}/t", perm=[1, 0]))
            name = transposed
        chosen.append(name)
    if transposes:  # quantize_initializers_ puts its DequantizeLinear nodes before these
        nodes = transposes + list(graph.node)
        del graph.node[:]
        graph.node.extend(nodes)
    return chosen


def _layout(node: onnx.NodeProto, index: int, rank: int) -> str | None:
    """How `node` reads a weight at input `index`: "out_in" (channels first), "in_out", or None (not a weight)."""
    if node.op_type == "Conv" and index == 1:
        return "out_in"
    if node.op_type == "Gather" and index == 0 and _attrs(node).get("axis", 0) == 0 and rank == 2:
        return "out_in"
    if node.op_type == "Gemm" and index == 1 and not _attrs(node).get("transA", 0):
        return "out_in" if _attrs(node).get("transB", 0) else "in_out"
    if node.op_type == "MatMul" and index == 1 and rank == 2:
        return "in_out"
    return None


def _set_attr(node: onnx.NodeProto, name: str, value: int) -> None:
    for attr in node.attribute:
        if attr.name == name:
            node.attribute.remove(attr)
            break
    node.attribute.append(helper.make_attribute(name, value))
