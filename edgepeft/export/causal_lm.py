"""Causal language models (Llama, GPT-2, ...): loading with LoRA, the next-token loss, the KV-cache graph.

`bundle.export` compiles a causal LM directory with the classifier machinery (trace, quantize, artifacts);
this module holds what differs: the model is loaded as `AutoModelForCausalLM`, the loss shifts the labels, the
tokenizer is saved untruncated (the device chunks text into blocks itself), and a second inference graph with
past key/values (`generation.onnx`) lets the device generate one position per new token.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path

import onnx
import torch
from torch import nn

from edgepeft import manifest as mf
from edgepeft.errors import ExportError
from edgepeft.export.generation_graph import last_position_logits_
from edgepeft.export.graph import export_transformers
from edgepeft.export.lora import Adapted, add_lora, is_hf_conv1d
from edgepeft.export.quantize import BLOCK_SIZE, quantize_initializers_
from edgepeft.export.spec import ExportOptions, LoraSpec

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
TRAIN_TASK, GENERATION_TASK = "text-generation", "text-generation-with-past"  # optimum's task names
SEQUENCE_AXES = {0: "batch_size", 1: "sequence_length"}  # optimum's names, as the inputs have them
# LoRA targets when the caller names none, by model_type; any other family: `linear_targets`
DEFAULT_TARGETS: dict[str, tuple[str, ...]] = {
    "llama": ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"),
    "gpt2": ("c_attn", "c_proj", "c_fc"),
}


class NextTokenLoss(nn.Module):
    """Mean cross-entropy of predicting token t + 1 at position t; labels of -100 are not scored.

    The labels shift, not the logits: position t is scored against label t + 1 and the last position against
    -100. Slicing the (batch, length, vocabulary) logits instead costs a copy of them in the forward pass and
    two in the backward (SliceGrad pads the gradient back), 50 MB each for SmolLM2 at 1 x 256.
    """

    def forward(self, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        targets = nn.functional.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        return nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX
        )


def drop_training_outputs_(model: onnx.ModelProto, names: set[str]) -> None:
    """Remove the model's own outputs (`names`: the logits) from the training graph, leaving the loss first: the
    device's training step reads the loss alone, and a logits output (256 x 49,152 fp32 = 50 MB for SmolLM2)
    would be kept to the end of the step and copied out."""
    outputs = [o for o in model.graph.output if o.name not in names]
    del model.graph.output[:]
    model.graph.output.extend(outputs)


def is_causal_lm_dir(source: object) -> bool:
    """Whether `source` is a transformers directory whose config names a causal LM architecture."""
    if not isinstance(source, (str, os.PathLike)):
        return False
    try:
        config = json.loads((Path(source) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    architectures = config.get("architectures") if isinstance(config, dict) else None
    return any(str(a).endswith(("ForCausalLM", "LMHeadModel")) for a in architectures or [])


def load_causal_lm(source: Path, lora: LoraSpec, options: ExportOptions, out: Path) -> tuple[Adapted, dict, str]:
    """Load the causal LM offline, add LoRA, write its tokenizer into `out`.

    Returns the adapted model, example inputs (optimum's input names) and the manifest's task record as a dict.
    """
    if options.labels:
        raise ExportError(f"`labels` {list(options.labels)} name a classifier's classes: a causal LM predicts tokens")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    model_type = str(getattr(model.config, "model_type", ""))
    if lora.target_modules is None:
        targets = DEFAULT_TARGETS.get(model_type) or linear_targets(model)
        if not targets:
            raise ExportError(f"{source}: {type(model).__name__} has no Linear layer for LoRA: name target_modules")
        lora = dataclasses.replace(lora, target_modules=targets)
        logger.info("LoRA on %s (the default for %s)", lora.target_modules, model_type or type(model).__name__)
    tokenizer = _save_tokenizer(source, out, model.config)
    task = _task(tokenizer, model, options.max_length)
    adapted = add_lora(model, lora, task_type="CAUSAL_LM")
    encoded = tokenizer(["the cat sat on a mat", "hello"], padding=True, return_tensors="pt")
    ids, mask = encoded["input_ids"], encoded["attention_mask"]
    example = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    return adapted, example, task


def linear_targets(model: nn.Module) -> tuple[str, ...]:
    """The names (last parts, in order) of every Linear layer and transformers `Conv1D` but the output layer: PEFT's
    "all-linear", the LoRA targets of a family `DEFAULT_TARGETS` does not name."""
    output = model.get_output_embeddings()
    names = [name.rsplit(".", 1)[-1] for name, sub in model.named_modules()
             if sub is not output and (isinstance(sub, nn.Linear) or is_hf_conv1d(sub))]  # fmt: skip
    return tuple(dict.fromkeys(names))


def example_labels(example: dict[str, torch.Tensor]) -> torch.Tensor:
    """Labels for tracing the loss: the input ids, padding ignored."""
    return example["input_ids"].masked_fill(example["attention_mask"] == 0, IGNORE_INDEX)


def _save_tokenizer(source: Path, out: Path, config):
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # transformers fails in many ways (AttributeError, OSError, ValueError) on no tokenizer
        found = [n for n in ("tokenizer.json", "tokenizer_config.json") if (source / n).is_file()]
        what = "cannot be loaded" if found else "is missing (no tokenizer.json or tokenizer_config.json)"
        raise ExportError(f"{source}: the tokenizer {what}: {type(e).__name__}: {e}") from None
    if not tokenizer.is_fast:
        raise ExportError(f"{source} has no fast tokenizer (tokenizer.json): the device runtime needs one")
    ends = _model_eos_ids(config)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id == tokenizer.bos_token_id and ends and (
        tokenizer.eos_token_id not in ends
    ):  # a tokenizer converted from GGUF (SmolLM2's) names its start token as eos; the model config knows better
        eos = tokenizer.convert_ids_to_tokens(ends[0])
        logger.warning("the tokenizer's eos %r is its bos; using the model config's eos %r (id %d)",
                       tokenizer.eos_token, eos, ends[0])  # fmt: skip
        tokenizer.eos_token = eos
    if tokenizer.pad_token_id is None:  # GPT-2 and Llama tokenizers often have none: pad with eos (masked anyway)
        tokenizer.pad_token = tokenizer.eos_token
    backend = tokenizer.backend_tokenizer
    backend.no_truncation()
    backend.no_padding()
    backend.save(str(out / mf.TOKENIZER))
    return tokenizer


def _model_eos_ids(config) -> list[int]:
    """The eos ids the model config names (an int or a list), in order."""
    value = getattr(config, "eos_token_id", None)
    values = value if isinstance(value, (list, tuple)) else [value]
    return [int(v) for v in values if isinstance(v, int) and not isinstance(v, bool) and v >= 0]


def _end_of_turn_id(tokenizer) -> int | None:
    """The special token the chat template writes right after an assistant message's content (`<|im_end|>`,
    `<|eot_id|>`), found by rendering one exchange; None if there is none or the template cannot render it."""
    marker = "edgepeft-end-of-turn-probe"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": marker}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False)
    except Exception as e:  # a template may refuse these roles; the stop ids are then eos alone
        logger.warning("the chat template cannot render a user/assistant exchange (%s): no end-of-turn stop id", e)
        return None
    if not isinstance(text, str) or marker not in text:
        return None
    after = tokenizer(text.split(marker, 1)[1], add_special_tokens=False)["input_ids"]
    specials = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return after[0] if after and after[0] in specials else None


def _stop_token_ids(tokenizer, model) -> list[int]:
    """eos, the ids the model's config and generation config end on, and the chat template's end of turn."""
    ids = [tokenizer.eos_token_id] + _model_eos_ids(model.config)
    ids += _model_eos_ids(getattr(model, "generation_config", None))
    if isinstance(tokenizer.chat_template, str):
        ids.append(_end_of_turn_id(tokenizer))
    return list(dict.fromkeys(i for i in ids if i is not None))


def _task(tokenizer, model, max_length: int) -> dict:
    config = model.config
    positions = getattr(config, "max_position_embeddings", None) or getattr(config, "n_positions", None)
    if max_length < 2:
        raise ExportError(f"`max_length` {max_length} is too short for a causal LM: a block needs 2 tokens or more")
    if positions and max_length > positions:
        raise ExportError(f"`max_length` {max_length} exceeds the model's {positions} positions")
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    if tokenizer.pad_token_id is None:
        raise ExportError("the tokenizer has neither a pad nor an eos token: the device cannot pad batches")
    return {
        "max_length": max_length,
        "chat_template": template,
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
        "stop_token_ids": _stop_token_ids(tokenizer, model),
        "max_positions": positions if isinstance(positions, int) and positions > 1 else None,
    }


def export_generation_graph(
    module: nn.Module, trainable: list[str], quantized: list[str], opset: int, work: Path
) -> onnx.ModelProto:
    """The KV-cache inference graph: the frozen weights in int8 with a scale per block of `BLOCK_SIZE` (half the
    per-channel rounding error: greedy decoding follows the fp32 model closer), the trainable tensors as
    overridable inputs.

    Each trainable initializer is also listed as a graph input (ONNX's default-valued input), so a session feeds
    the current adapter on every run without the file being rewritten; the initializers hold the exported values.
    Its `logits` are the last position's only (generation reads no other).
    """
    graph = export_transformers(
        module, GENERATION_TASK, work / "generation.onnx", trainable, opset, use_past_in_inputs=True
    )
    held = {i.name for i in graph.graph.initializer}
    missing = [n for n in trainable if n not in held]
    if missing:
        raise ExportError(f"the generation graph does not hold the trainable tensors {missing[:3]}")
    last_position_logits_(graph)
    quantize_initializers_(graph, [n for n in quantized if n in held], block_size=BLOCK_SIZE)
    initializers = {i.name: i for i in graph.graph.initializer}
    for name in trainable:
        tensor = initializers[name]
        graph.graph.input.append(onnx.helper.make_tensor_value_info(name, tensor.data_type, list(tensor.dims)))
    return graph
