"""The PEFT spec and export options: small validated dataclasses."""

from __future__ import annotations

import re

from dataclasses import dataclass

from edgepeft.errors import ExportError
from edgepeft.manifest import LOSSES, OPTIMIZERS, QUANTIZATIONS

BIAS_MODES = ("none", "all", "lora_only")
HEAD_POOLINGS = ("mean", "max", "flatten")


@dataclass(frozen=True)
class LoraSpec:
    """Which parts of the model train: LoRA matrices, biases, and whole extra modules.

    `target_modules` is a list of module names (matched on the name's last parts, as PEFT does) or one
    regular expression matched against the full module name; None (the default) is the model's own default:
    for a transformers directory by its model_type (`edgepeft.export.transformers_models.DEFAULT_TARGETS`),
    else ("query", "value"); for a causal LM by `edgepeft.export.causal_lm.DEFAULT_TARGETS`, else every Linear but
    the output layer.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: tuple[str, ...] | str | None = None
    bias: str = "none"
    modules_to_save: tuple[str, ...] = ()
    # FFA-LoRA (Sun et al., ICLR 2024): lora_A stays at its seeded init and only lora_B (and the head) train.
    # Federated averaging of B alone is then the exact average of the clients' updates (averaging A and B
    # separately is not: FedIT). The bundle lists A as `frozen_adapter` in its manifest; adapters still hold A.
    freeze_a: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.r, int) or self.r <= 0:
            raise ExportError(f"LoRA rank `r` must be a positive integer, got {self.r!r}")
        if self.alpha <= 0:
            raise ExportError(f"LoRA `alpha` must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ExportError(f"LoRA `dropout` must be in [0, 1), got {self.dropout!r}")
        if self.bias not in BIAS_MODES:
            raise ExportError(f"`bias` must be one of {BIAS_MODES}, got {self.bias!r}")
        if self.target_modules is None:
            pass
        elif not isinstance(self.target_modules, str):
            object.__setattr__(self, "target_modules", tuple(self.target_modules))
            if not self.target_modules:
                raise ExportError("`target_modules` is empty: name at least one module to adapt")
        elif not self.target_modules:
            raise ExportError("`target_modules` is an empty pattern")
        else:
            try:
                re.compile(self.target_modules)
            except re.error as e:
                pattern = self.target_modules
                raise ExportError(f"`target_modules` {pattern!r} is not a regular expression: {e}") from None
        object.__setattr__(self, "modules_to_save", tuple(self.modules_to_save))
        if not isinstance(self.freeze_a, bool):
            raise ExportError(f"`freeze_a` must be True or False, got {self.freeze_a!r}")


@dataclass(frozen=True)
class ExportOptions:
    """How the bundle is compiled: loss, optimizer, backbone quantization, text length, init seed."""

    loss: str = "cross_entropy"
    optimizer: str = "adamw"
    quantization: str = "int8"
    max_length: int = 128
    opset: int = 17
    labels: tuple[str, ...] = ()
    seed: int = 0  # initialises the new head and lora_A: the same inputs give the same bundle
    int8_compute: bool = True  # int8 backbone: multiply int8 weights directly (False: dequantize to fp32 first)
    # with int8_compute: backward matmuls in int8 too, the gradient quantized per row (False: fp32 gradients,
    # each weight dequantized for its one backward matmul). A softmax cross-entropy's gradient (a frozen lm_head's)
    # stays fp32 either way (`int8_compute._input_gradient`). SmolLM2-135M, 30 steps at 1 x 256: held-out perplexity
    # 46.9 -> 39.6 (fp32 gradients: 39.4), steps 7-14% shorter on an AVX-512 VNNI machine.
    int8_gradients: bool = True
    # recompute each transformer block's activations in the backward pass instead of keeping them from the
    # forward (`export/recompute.py`). None: on for a causal LM (SmolLM2 at 1 x 256: peak RSS ~910 -> ~490 MB, a step
    # 1,307 -> 1,661 ms side by side), off otherwise (a classifier's few short layers keep little).
    recompute: bool | None = None
    profile_memory: bool = False  # measure peak memory at a few sizes so the device can budget (~5 s)
    # the base model's hub name, written as adapters' base_model_name_or_path (default: config.json's
    # `_name_or_path` unless it is a path, else the model directory's name; none for a torch module)
    base_name: str | None = None
    # an ONNX model (`export("model.onnx", ...)`): the graph value a new Linear head reads (`labels` gives its
    # width); a value of more than 2 dimensions is pooled first over every axis but the batch (0) and
    # `head_feature_axis` ("mean" or "max"), or "flatten"ed to (batch, everything else)
    head_on: str | None = None
    head_pooling: str = "mean"
    head_feature_axis: int = -1

    def recompute_blocks(self, causal_lm: bool) -> bool:
        """Whether the training graph recomputes block activations: `recompute`, or by default causal LMs'."""
        return causal_lm if self.recompute is None else self.recompute

    def __post_init__(self) -> None:
        if self.loss not in LOSSES:
            raise ExportError(f"`loss` must be one of {LOSSES} ('custom' with a torch loss module), got {self.loss!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ExportError(f"`optimizer` must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.quantization not in QUANTIZATIONS:
            raise ExportError(f"`quantization` must be one of {QUANTIZATIONS}, got {self.quantization!r}")
        if not isinstance(self.int8_compute, bool):
            raise ExportError(f"`int8_compute` must be True or False, got {self.int8_compute!r}")
        if self.recompute is not None and not isinstance(self.recompute, bool):
            raise ExportError(f"`recompute` must be True, False or None (the model's default), got {self.recompute!r}")
        if not isinstance(self.int8_gradients, bool):
            raise ExportError(f"`int8_gradients` must be True or False, got {self.int8_gradients!r}")
        if self.max_length <= 0:
            raise ExportError(f"`max_length` must be positive, got {self.max_length!r}")
        if self.opset < 14:
            raise ExportError(f"`opset` must be at least 14, got {self.opset!r}")
        if self.base_name is not None and (not isinstance(self.base_name, str) or not self.base_name.strip()):
            raise ExportError(f"`base_name` must be a non-empty string (a hub name), got {self.base_name!r}")
        if self.head_on is not None and (not isinstance(self.head_on, str) or not self.head_on):
            raise ExportError(f"`head_on` must name a value of the ONNX graph, got {self.head_on!r}")
        if self.head_pooling not in HEAD_POOLINGS:
            raise ExportError(f"`head_pooling` must be one of {HEAD_POOLINGS}, got {self.head_pooling!r}")
        if not isinstance(self.head_feature_axis, int) or self.head_feature_axis == 0:
            raise ExportError(f"`head_feature_axis` must be a non-batch axis (not 0), got {self.head_feature_axis!r}")
        labels = tuple(str(label) for label in self.labels)
        if len(set(labels)) != len(labels):
            raise ExportError(f"`labels` holds duplicates: {labels}")
        object.__setattr__(self, "labels", labels)
