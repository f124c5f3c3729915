"""Add the trainable parts to a torch model with Hugging Face PEFT, and name them as PEFT does."""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import peft
import torch
from torch import nn

from edgepeft.errors import ExportError
from edgepeft.export.spec import LoraSpec

logger = logging.getLogger(__name__)


@dataclass
class Adapted:
    """A model with LoRA injected: the module to export and how its trainable tensors are named."""

    peft_model: peft.PeftModel
    module: nn.Module  # peft_model.base_model.model: what the ONNX graph is traced from
    adapter_keys: dict[str, str]  # parameter name in `module` (and in ONNX) -> key in adapter_model.safetensors
    peft_config: dict[str, Any]  # adapter_config.json contents


def add_lora(model: nn.Module, spec: LoraSpec, task_type: str | None = None) -> Adapted:
    """Wrap `model` with LoRA per `spec`; freeze everything else. The model is modified in place."""
    _check_targets(model, spec)
    config = peft.LoraConfig(
        r=spec.r,
        lora_alpha=spec.alpha,
        lora_dropout=spec.dropout,
        target_modules=list(spec.target_modules) if not isinstance(spec.target_modules, str) else spec.target_modules,
        bias=spec.bias,
        modules_to_save=list(spec.modules_to_save) or None,
        task_type=task_type,
    )
    try:
        peft_model = peft.get_peft_model(model, config)
    except ValueError as e:
        raise ExportError(f"PEFT rejected the LoRA spec: {str(e).splitlines()[0]}") from None

    module = peft_model.base_model.model
    by_pointer = {p.data_ptr(): n for n, p in module.named_parameters() if p.requires_grad}
    adapter_keys: dict[str, str] = {}
    for key, tensor in peft.get_peft_model_state_dict(peft_model).items():
        name = by_pointer.get(tensor.data_ptr())
        if name is not None:
            adapter_keys[name] = key
    unmapped = sorted(set(by_pointer.values()) - set(adapter_keys))
    if unmapped:
        raise ExportError(f"trainable parameters with no place in a PEFT adapter: {unmapped[:5]}")
    trainable = sum(module.get_parameter(n).numel() for n in adapter_keys)
    logger.info("LoRA added: %d trainable tensors, %d parameters", len(adapter_keys), trainable)
    return Adapted(peft_model, module, adapter_keys, _config_dict(peft_model.peft_config["default"]))


def _check_targets(model: nn.Module, spec: LoraSpec) -> None:
    names = [name for name, _ in model.named_modules() if name]

    def matches(pattern: str) -> bool:
        return any(n == pattern or n.endswith("." + pattern) for n in names)

    if isinstance(spec.target_modules, str):
        found = any(re.fullmatch(spec.target_modules, n) for n in names)
    else:
        found = any(matches(t) for t in spec.target_modules)
    if not found:
        candidates = sorted({n.split(".")[-1] for n, m in model.named_modules() if n and _adaptable(m)})
        raise ExportError(
            f"target_modules {spec.target_modules!r} match no module of {type(model).__name__}; "
            f"adaptable module names: {candidates[:20]}"
        )
    _check_attention_targets(model, spec)
    missing = [m for m in spec.modules_to_save if not matches(m)]
    if missing:
        raise ExportError(f"modules_to_save {missing} match no module of {type(model).__name__}")


def _targeted(name: str, targets: str | tuple[str, ...]) -> bool:
    """Whether PEFT adapts the module called `name` (its own matching: a regex, or a name or name suffix)."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _check_attention_targets(model: nn.Module, spec: LoraSpec) -> None:
    """LoRA on an nn.MultiheadAttention's out_proj alone does nothing: the attention reads out_proj.weight itself
    (F.multi_head_attention_forward), never calls the module. PEFT adapts the attention module as a whole."""
    for name, sub in model.named_modules():
        if isinstance(sub, nn.MultiheadAttention) and not _targeted(name, spec.target_modules):
            inner = f"{name}.out_proj" if name else "out_proj"
            if _targeted(inner, spec.target_modules):
                raise ExportError(
                    f"target_modules match {inner} inside {name or 'the model'} (nn.MultiheadAttention): LoRA on "
                    f"out_proj alone does nothing there, the attention uses its weight directly; target the "
                    f"MultiheadAttention module {name.split('.')[-1] or name!r} instead (PEFT then adapts its input "
                    f"and output projections)"
                )


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Embedding)) or is_hf_conv1d(module)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' `Conv1D` (GPT-2's c_attn, c_proj, c_fc): a Linear with its weight stored (in, out)."""
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def _config_dict(config: peft.LoraConfig) -> dict[str, Any]:
    """adapter_config.json as PEFT writes it (sets become lists, enums their values)."""
    data = config.to_dict()
    return json.loads(json.dumps(data, default=lambda v: sorted(v) if isinstance(v, (set, frozenset)) else str(v)))


_ATTENTION_WEIGHTS = ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight")


def is_lora_a(key: str) -> bool:
    """Whether a PEFT adapter key is a LoRA down-projection (`lora_A`, `lora_embedding_A`)."""
    return ".lora_A." in key or key.endswith(".lora_A") or ".lora_embedding_A" in key


def frozen_weight_names(module: nn.Module) -> list[str]:
    """Names of frozen Linear, Conv, Embedding and attention projection weights: the tensors worth storing as int8."""
    names = []
    for name, sub in module.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(sub, nn.MultiheadAttention):
            weights = [(w, getattr(sub, w)) for w in _ATTENTION_WEIGHTS]
        elif _adaptable(sub):
            weights = [("weight", sub.weight)]
        else:
            continue
        for attr, w in weights:
            if isinstance(w, torch.Tensor) and not w.requires_grad and w.dtype == torch.float32:
                names.append(prefix + attr)
    return names
