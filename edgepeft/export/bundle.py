"""`export`: compile a torch model plus a PEFT spec into an on-device training bundle."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper
from torch import nn

import edgepeft
from edgepeft import manifest as mf
from edgepeft.errors import ExportError
from edgepeft.export import causal_lm
from edgepeft.export.attention_mask import finite_attention_masks_
from edgepeft.export.diagnose import native_stderr_silenced, training_graph_error
from edgepeft.export.first_token import first_token_last_layer
from edgepeft.export.gelu_grad import decompose_gelu_grad_
from edgepeft.export.graph import LABELS_INPUT, LOSS_OUTPUT, attach_loss, export_module, export_transformers, remove_dropout_
from edgepeft.export.chunked_loss import chunk_vocabulary_loss_
from edgepeft.export.int8_compute import use_int8_compute_
from edgepeft.export.lora import Adapted, add_lora, frozen_weight_names, is_lora_a
from edgepeft.export.quantize import quantize_initializers_
from edgepeft.export.recompute import recompute_blocks_
from edgepeft.export.spec import ExportOptions, LoraSpec
from edgepeft.export.transformers_models import (
    BERT_LIKE_TARGETS,
    IMAGE,
    IMAGE_HEAD,
    ModelKind,
    default_targets,
    fix_image_input_,
    model_inputs,
    model_kind,
    onnx_input_names,
    text_positions,
)
from edgepeft.export.vocabulary_loss import fuse_vocabulary_loss_
from edgepeft.fileio import DirKind, atomic_directory, sha256_file
from edgepeft.runtime.adapter import portable_base_name
from edgepeft.runtime.memory import PROFILE_KEY, fit_profile

logger = logging.getLogger(__name__)

BUNDLE = DirKind("a bundle", (mf.MANIFEST_FILE, mf.CHECKPOINT))  # a bundle is replaced only by a bundle

_BUILTIN_LOSSES = {"cross_entropy": nn.CrossEntropyLoss, "mse": nn.MSELoss, "bce": nn.BCEWithLogitsLoss}
_ONNX_DTYPES = {
    onnx.TensorProto.FLOAT: "float32",
    onnx.TensorProto.INT64: "int64",
    onnx.TensorProto.INT32: "int32",
    onnx.TensorProto.BOOL: "bool",
}


def export(
    model: nn.Module | str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    example_inputs: dict[str, torch.Tensor] | None = None,
    lora: LoraSpec = LoraSpec(),
    options: ExportOptions = ExportOptions(),
    loss_fn: nn.Module | None = None,
    example_labels: torch.Tensor | None = None,
    overwrite: bool = False,
) -> mf.Manifest:
    """Compile `model` with LoRA into a training bundle at `output_dir` and return its manifest.

    `model` is a `torch.nn.Module` (then `example_inputs` names and shapes its inputs) or the directory
    of a Hugging Face transformers sequence-classification model (then `options.labels` names the
    classes and a new head is trained). A module passed in is copied, never changed: LoRA is added to
    the copy. The bundle is written all at once: on any error nothing is left.

    Raises:
        ExportError: the model, spec or options cannot be compiled (the message names the problem).
        OutputError (a FileExistsError): `output_dir` holds a bundle and `overwrite` is False, or it is a file
            or a non-empty directory that is not a bundle (never replaced, even with `overwrite`).
    """
    from edgepeft.export.onnx_source import export_onnx, is_onnx_source

    # an ONNX model (a .onnx file or an onnx.ModelProto) with no torch source, `options.head_on` naming where
    # a new head goes: compiled by onnx_source.py
    if is_onnx_source(model):
        return export_onnx(model, output_dir, lora=lora, options=options, loss_fn=loss_fn,
                           example_labels=example_labels, overwrite=overwrite)  # fmt: skip
    if lora.freeze_a and (is_onnx_source(model) or causal_lm.is_causal_lm_dir(model)):
        raise ExportError("`freeze_a` (FFA-LoRA) is supported for torch modules and transformers classifiers, "
                          "not yet for ONNX models or causal LMs")  # fmt: skip
    if options.head_on is not None:
        raise ExportError(f"`head_on` ({options.head_on!r}) is for ONNX models; a torch model has its own head")
    if (options.loss == "custom") != (loss_fn is not None):
        raise ExportError("pass `loss_fn` exactly when options.loss is 'custom'")
    causal = causal_lm.is_causal_lm_dir(model)
    if causal != (options.loss == "next_token") and not (causal and options.loss == "cross_entropy"):
        raise ExportError(f"loss {options.loss!r}: a causal LM trains on the next-token loss (`next_token`), "
                          "and only a causal LM does")  # fmt: skip
    if causal:
        loss_module = causal_lm.NextTokenLoss()
    else:
        loss_module = loss_fn if loss_fn is not None else _BUILTIN_LOSSES[options.loss]()
    with atomic_directory(output_dir, BUNDLE, overwrite=overwrite) as out, tempfile.TemporaryDirectory() as tmp:
        with torch.random.fork_rng():  # seeded init of the head and lora_A, leaving the caller's RNG alone
            torch.manual_seed(options.seed)
            traced = _trace(model, example_inputs, lora, options, Path(tmp), out)
        module, forward = traced.adapted.module, traced.graph
        adapter_keys = traced.adapted.adapter_keys
        frozen_adapter = [n for n, key in adapter_keys.items() if lora.freeze_a and is_lora_a(key)]
        trainable = [n for n in adapter_keys if n not in frozen_adapter]
        if traced.task is not None:
            example_labels = causal_lm.example_labels(traced.example_inputs)
        elif example_labels is None:
            example_labels = _default_labels(options.loss, traced.example_output)

        # the base alone: a bundle with lora_A frozen has the fingerprint of the same base exported with A trained
        fingerprint = _fingerprint(forward, [i.name for i in forward.graph.initializer if i.name not in adapter_keys])
        finite_attention_masks_(forward)  # no NaN guard after each attention softmax (after the fingerprint)
        held = {i.name for i in forward.graph.initializer}
        frozen = [n for n, _ in module.named_parameters() if n in held and n not in trainable]
        quantized = [n for n in frozen_weight_names(module) if n in held] if options.quantization == "int8" else []
        if quantized:
            frozen = [n for n in frozen if n not in set(quantized)] + quantize_initializers_(forward, quantized)
        int8_compute = bool(quantized) and options.int8_compute
        if traced.task is None:  # a causal LM's generation.onnx is its inference graph (an empty past: the prefix)
            _save(forward, out / mf.INFERENCE_MODEL, int8_compute, inference=True)

        axes = causal_lm.SEQUENCE_AXES if traced.task is not None else None
        full = attach_loss(forward, loss_module, traced.example_output, example_labels, Path(tmp), options.opset, axes)
        if traced.task is not None:  # the logits of a whole block over the vocabulary were a step's peak
            chunk_vocabulary_loss_(full, LOSS_OUTPUT)
        _generate_artifacts(full, trainable, frozen, options.optimizer, out, module)
        _bake_learning_rate(out / mf.OPTIMIZER_MODEL)  # runtimes without a learning-rate setter (web)
        if traced.task is not None:  # the KV-cache graph generation runs: the frozen weights, int8 per block
            generation = causal_lm.export_generation_graph(module, trainable, quantized, options.opset, Path(tmp))
            # exact products of the dequantized weights, as evaluation: int8 matmuls (a scale per token) made
            # SmolLM2 generate 3.3x faster but its greedy tokens left the exact ones' on 2 of 3 prompts by token 4
            _save(generation, out / mf.GENERATION_MODEL, int8_compute, inference=True)
        # int8 arithmetic where it pays, the training step; evaluation and prediction multiply the exact
        # dequantized weights, so a device's predictions match the host's (99% against 95% of MiniLM's).
        training = onnx.load(str(out / mf.TRAINING_MODEL))
        decompose_gelu_grad_(training)
        if traced.task is not None:
            causal_lm.drop_training_outputs_(training, {o.name for o in forward.graph.output})
            if int8_compute:  # the loss and its gradient over vocabulary blocks, by hand
                fuse_vocabulary_loss_(training, LOSS_OUTPUT, options.max_length)
        int8_gradients = options.int8_gradients
        data_inputs = [v.name for v in forward.graph.input if v.name not in held] + [LABELS_INPUT]
        recompute = options.recompute_blocks(causal_lm=traced.task is not None)
        _save(training, out / mf.TRAINING_MODEL, int8_compute, matmuls=True, gradients=int8_gradients,
              row_inputs=traced.task is not None,  # a language model's outlier tokens need a scale per row
              recompute_inputs=data_inputs if recompute else None)  # fmt: skip
        _check_loadable(out / mf.TRAINING_MODEL, module)  # a bundle the device cannot load is never written
        _save(onnx.load(str(out / mf.EVAL_MODEL)), out / mf.EVAL_MODEL, int8_compute, inference=True)
        (out / mf.ADAPTER_CONFIG).write_text(json.dumps(traced.adapted.peft_config, indent=2, sort_keys=True) + "\n")

        manifest = mf.Manifest(
            inputs=tuple(_spec(v) for v in forward.graph.input if v.name not in held),
            outputs=tuple(_spec(v) for v in forward.graph.output),
            label=_label_spec(example_labels, sequence=traced.task is not None),
            loss="next_token" if traced.task is not None else options.loss,
            optimizer=options.optimizer,
            quantization=options.quantization,
            trainable=tuple(
                mf.ParamSpec(name, key, tuple(module.get_parameter(name).shape))
                for name, key in adapter_keys.items() if name in trainable
            ),
            frozen_adapter=tuple(
                mf.ParamSpec(name, adapter_keys[name], tuple(module.get_parameter(name).shape))
                for name in frozen_adapter
            ),
            base_fingerprint=fingerprint,
            files={p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file()},
            peft_config=traced.adapted.peft_config,
            labels=traced.labels,
            base_names=traced.base_names,
            preprocessing=traced.preprocessing,
            task=mf.CausalLMTask(**traced.task) if traced.task is not None else None,
            max_length=options.max_length if (out / mf.TOKENIZER).exists() else None,
            versions=_versions(),
            stats={
                "trainable_parameters": int(sum(module.get_parameter(n).numel() for n in trainable)),
                "quantized_weights": len(quantized),
                "int8_compute": int8_compute,
                "int8_gradients": int8_compute and int8_gradients,
            },
        )
        manifest.save(out)
        if options.profile_memory:
            manifest.stats[PROFILE_KEY] = _profile_memory(out)
            manifest.save(out)
    logger.info("bundle written to %s", output_dir)
    return manifest


@dataclass
class _Traced:
    adapted: Adapted
    graph: onnx.ModelProto  # the forward graph, trainable values in place
    example_output: torch.Tensor
    labels: tuple[str, ...]
    base_names: tuple[str, ...]  # what the base model is called: its hub name, its directory's name
    preprocessing: mf.ImagePreprocessing | None = None  # how an image becomes the model's input
    task: dict | None = None  # a causal LM's manifest task record
    example_inputs: dict[str, torch.Tensor] | None = None


def _trace(
    model: nn.Module | str | os.PathLike,
    example_inputs: dict[str, torch.Tensor] | None,
    lora: LoraSpec,
    options: ExportOptions,
    work: Path,
    out: Path,
) -> _Traced:
    """Add LoRA to the model and trace its forward pass to ONNX."""
    if isinstance(model, nn.Module):
        if not example_inputs:
            raise ExportError("a torch module needs `example_inputs`: a dict of input name -> example tensor")
        if lora.target_modules is None:
            lora = dataclasses.replace(lora, target_modules=BERT_LIKE_TARGETS)
        adapted = add_lora(copy.deepcopy(model), lora)  # the caller's model keeps its parameters and mode
        graph = export_module(
            adapted.module, dict(example_inputs), work / "forward.onnx", list(adapted.adapter_keys), options.opset
        )
        with torch.no_grad():
            output = adapted.module(*example_inputs.values())
        labels = options.labels
        base_names = (options.base_name,) if options.base_name else ()
        preprocessing = None
    elif causal_lm.is_causal_lm_dir(model):
        adapted, example_inputs, task = causal_lm.load_causal_lm(Path(model), lora, options, out)
        graph = export_transformers(adapted.module, causal_lm.TRAIN_TASK, work / "forward.onnx",
                                    list(adapted.adapter_keys), options.opset)  # fmt: skip
        with torch.no_grad():
            output = adapted.module(**example_inputs).logits
        adapted.peft_config["base_model_name_or_path"] = (_base_names(Path(model), options.base_name) or (None,))[0]
        adapted.peft_config["inference_mode"] = True
        base_names = _base_names(Path(model), options.base_name)
        return _Traced(adapted, graph, output, (), base_names, None, task, example_inputs)
    else:
        adapted, labels, example_inputs, kind = _load_transformers(Path(model), lora, options, out)
        base_names = _base_names(Path(model), options.base_name)
        preprocessing = kind.preprocessing
        with first_token_last_layer(adapted.module):  # exact: the classifier reads the first token only
            graph = export_transformers(
                adapted.module, kind.task, work / "forward.onnx", list(adapted.adapter_keys), options.opset
            )
        if preprocessing is not None:
            fix_image_input_(graph, preprocessing)
        with torch.no_grad():
            output = adapted.module(**example_inputs).logits
    if not isinstance(output, torch.Tensor):
        raise ExportError(f"the model must return one tensor, got {type(output).__name__}")
    # PEFT writes these in adapters it saves: a portable name of the base (never a path into this machine)
    adapted.peft_config["base_model_name_or_path"] = base_names[0] if base_names else None
    adapted.peft_config["inference_mode"] = True
    return _Traced(adapted, graph, output, labels, base_names, preprocessing)


def _base_names(source: Path, given: str | None) -> tuple[str, ...]:
    """The base's portable name first (`given`, else config.json's hub name, else the directory's name)."""
    try:
        recorded = json.loads((source / "config.json").read_text(encoding="utf-8")).get("_name_or_path")
    except (OSError, ValueError, AttributeError):
        recorded = None
    hub = portable_base_name(recorded) if isinstance(recorded, str) and not os.path.isabs(recorded) else None
    names = [given, hub if hub and not hub.startswith(".") else None, source.resolve().name]
    return tuple(dict.fromkeys(n for n in names if n))


def _load_transformers(
    source: Path, lora: LoraSpec, options: ExportOptions, out: Path
) -> tuple[Adapted, tuple[str, ...], dict[str, torch.Tensor], ModelKind]:
    """Load a transformers text or image classifier offline, add LoRA, save its tokenizer into the bundle.

    Returns the adapted model, its labels, example inputs (exactly the inputs the model takes) and its kind.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    if not (source / "config.json").is_file():
        raise ExportError(f"{source} is not a transformers model directory (no config.json)")
    if not options.labels:
        raise ExportError("a transformers classifier needs `labels`: the class names, in order")
    labels = options.labels
    kind = model_kind(source)
    auto = AutoModelForImageClassification if kind.modality == IMAGE else AutoModelForSequenceClassification
    with _transformers_warnings_silenced():  # "newly initialized ... TRAIN this model": the new head, by design
        model, loading = auto.from_pretrained(
            source,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            ignore_mismatched_sizes=True,  # a head for other classes (ImageNet's 1000) is replaced by a new one
            output_loading_info=True,
        )
    new = sorted([*loading.get("missing_keys", ()), *(m[0] for m in loading.get("mismatched_keys", ()))])
    if new:
        logger.info("new head %s initialised (seed %d): it trains on the device", new, options.seed)
    if lora.target_modules is None:
        lora = dataclasses.replace(lora, target_modules=default_targets(kind.model_type))
        logger.info("LoRA on %s (the default for %s)", lora.target_modules, kind.model_type or "this model")
    if kind.modality == IMAGE:
        if IMAGE_HEAD not in lora.modules_to_save:  # PEFT has no image task type that would add it
            lora = dataclasses.replace(lora, modules_to_save=(*lora.modules_to_save, IMAGE_HEAD))
        adapted = add_lora(model, lora)
        example = {kind.preprocessing.input: torch.randn(2, *kind.preprocessing.shape)}
        return adapted, labels, example, kind
    positions = text_positions(model.config)
    if positions is not None and options.max_length > positions:
        raise ExportError(f"`max_length` {options.max_length} exceeds the {positions} tokens {source.name}'s position "
                          f"embeddings hold: export with max_length={positions} or less")  # fmt: skip
    tokenizer = _save_tokenizer(source, options, out)
    adapted = add_lora(model, lora, task_type="SEQ_CLS")
    encoded = dict(tokenizer(["an example passage", "another one"], padding=True, return_tensors="pt"))
    example = model_inputs(adapted.module, onnx_input_names(adapted.module, kind.task), encoded)
    return adapted, labels, example, kind


def _save_tokenizer(source: Path, options: ExportOptions, out: Path):
    """The directory's fast tokenizer, written into the bundle truncating at `max_length` and padding."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(source)
    if not tokenizer.is_fast:
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json): the device runtime needs one")
    backend = tokenizer.backend_tokenizer
    backend.enable_truncation(max_length=options.max_length)
    backend.enable_padding(pad_id=tokenizer.pad_token_id, pad_token=tokenizer.pad_token, length=None)
    backend.save(str(out / mf.TOKENIZER))
    return tokenizer


def _profile_memory(bundle: Path) -> dict[str, float]:
    """Train the new bundle a step at a few sizes in a fresh torch-free process; fit its peak memory."""
    run = subprocess.run(
        [sys.executable, "-m", "edgepeft.runtime.memory", str(bundle)], capture_output=True, text=True, check=False
    )
    if run.returncode != 0:
        raise ExportError(f"memory profiling failed: {run.stderr.strip().splitlines()[-1:]}")
    points = json.loads(run.stdout.strip().splitlines()[-1])
    logger.info("memory profile (batch, length, peak MB): %s", points)
    return {**fit_profile([tuple(p) for p in points]), "points": points}


def _default_labels(loss: str, output: torch.Tensor) -> torch.Tensor:
    if loss == "cross_entropy":
        if output.dim() != 2:
            raise ExportError(f"cross_entropy needs a (batch, classes) output, the model gives {tuple(output.shape)}")
        return torch.zeros(output.shape[0], dtype=torch.int64)
    if loss in ("mse", "bce"):
        return torch.zeros_like(output)
    raise ExportError("a custom loss needs `example_labels`")


def _fingerprint(model: onnx.ModelProto, frozen: list[str]) -> str:
    """sha256 of every frozen tensor the graph holds, taken before quantization (same for int8 and fp32)."""
    digest = hashlib.sha256()
    initializers = {i.name: i for i in model.graph.initializer}
    for name in sorted(frozen):
        array = np.ascontiguousarray(numpy_helper.to_array(initializers[name]))
        digest.update(f"{name}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()


def _generate_artifacts(
    model: onnx.ModelProto,
    trainable: list[str],
    frozen: list[str],
    optimizer: str,
    out: Path,
    module: nn.Module | None = None,
) -> None:
    """ORT's artifacts for `model`; a failure names the op, and the module it came from when `module` is given."""
    from onnxruntime.training import artifacts

    optim = {"adamw": artifacts.OptimType.AdamW, "sgd": artifacts.OptimType.SGD}[optimizer]
    try:
        with native_stderr_silenced():  # ORT logs every graph transformer at INFO level from C++
            artifacts.generate_artifacts(
                model, requires_grad=trainable, frozen_params=frozen, loss=None, optimizer=optim, artifact_directory=out
            )
    except Exception as e:
        raise training_graph_error(module, e, "build") from None


def _bake_learning_rate(path: Path) -> None:
    """Let a runtime without a learning-rate setter set the rate and schedule (see export/web_lr.py)."""
    from edgepeft.export.web_lr import bake_learning_rate_

    model = onnx.load(str(path))
    bake_learning_rate_(model)
    onnx.save(model, str(path))


def _check_loadable(training_model: Path, module: nn.Module | None = None) -> None:
    """Open the training graph as the device will: every node needs a CPU kernel (ConvTransposeGrad has none)."""
    from edgepeft.runtime.ort import onnxruntime_module

    ort = onnxruntime_module()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    try:
        ort.InferenceSession(str(training_model), options, providers=["CPUExecutionProvider"])
    except Exception as e:
        raise training_graph_error(module, e, "load") from None


def _save(
    model: onnx.ModelProto,
    path: Path,
    int8_compute: bool,
    *,
    matmuls: bool = False,
    gradients: bool = False,
    inference: bool = False,
    row_inputs: bool = False,
    recompute_inputs: list[str] | None = None,
) -> None:
    """Write one of the bundle's graphs; with `int8_compute`, gathers (and, if `matmuls`, matmuls, their inputs
    quantized per row if `row_inputs`; if `gradients`, input-gradient matmuls) use int8. An `inference` graph has
    no Dropout (LoRA's is off). With `recompute_inputs` (the training graph's data inputs), each transformer block's
    activations are recomputed in the backward pass."""
    if int8_compute or inference or recompute_inputs is not None:
        model = copy.deepcopy(model)
    if inference:
        remove_dropout_(model)
    if int8_compute:
        use_int8_compute_(model, matmuls=matmuls, gradients=gradients, row_inputs=row_inputs)
    if recompute_inputs is not None:
        recompute_blocks_(model, recompute_inputs)
    onnx.save(model, str(path))


@contextlib.contextmanager
def _transformers_warnings_silenced() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def _spec(value: onnx.ValueInfoProto) -> mf.TensorSpec:
    tensor = value.type.tensor_type
    dtype = _ONNX_DTYPES.get(tensor.elem_type)
    if dtype is None:
        raise ExportError(f"graph value {value.name!r} has unsupported element type {tensor.elem_type}")
    shape = tuple(d.dim_param if d.dim_param else d.dim_value for d in tensor.shape.dim)
    return mf.TensorSpec(value.name, dtype, shape)


def _label_spec(labels: torch.Tensor, sequence: bool = False) -> mf.TensorSpec:
    dtype = str(labels.dtype).removeprefix("torch.")
    shape = ("batch_size", "sequence_length") if sequence else ("batch", *labels.shape[1:])
    return mf.TensorSpec(LABELS_INPUT, dtype, shape)


def _versions() -> dict[str, str]:
    import onnxruntime
    import peft

    return {
        "edgepeft": edgepeft.__version__,
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "peft": peft.__version__,
    }
