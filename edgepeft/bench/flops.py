"""FLOP counts of a BERT training step with LoRA, split into the frozen weights' matmuls and the rest.

Only matrix multiplies are counted (2 FLOPs per multiply-add); softmax, LayerNorm, GELU, the embedding
gather and the optimizer are left out. With T = batch * seq tokens, hidden H, FFN width I, LoRA rank r on
`n` projections per layer and C classes, one encoder layer's forward is

    weights    2T(4H^2 + 2HI)    Q, K, V, output projection, the two FFN matrices
    attention  4 * batch * seq^2 * H    Q K^T and P V (all heads together)
    LoRA       4THr * n          x A and (x A) B

and the head is 2*batch*H^2 (pooler) + 2*batch*H*C (classifier). The backward of a training step needs:

    - for the frozen weights, only the input gradient: the same FLOPs as their forward, in every layer at or
      above the lowest trainable one, except the Q, K, V projections of that lowest layer (nothing trainable
      lies below their inputs);
    - for attention, the gradients of both operands (2x its forward), except dK in the lowest layer (K
      does not depend on a trainable parameter there): 1.5x;
    - for each LoRA pair, weight gradients dA and dB plus input gradients (2x its forward), without the
      input gradient of A in the lowest layer (1.5x);
    - the head's weight gradient and input gradient for the classifier (2x), the pooler's input gradient (1x).

Layers below the lowest trainable one need no backward at all. With `first_token_last_layer` (what
edgepeft's exporter compiles, `edgepeft/export/first_token.py`), the last layer's queries, attention output
and feed-forward cover the first token only: its K and V projections (and LoRA on key/value) still cover
all T tokens, everything else `batch` rows, and attention is one query row per sequence.

`StepFlops.frozen` is the frozen weights' share (projections, FFN, pooler, forward and input gradients):
the matmuls an int8 bundle computes in int8. Attention, LoRA and the classifier are fp32 in every system.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class BertDims:
    """The dimensions a FLOP count needs, from a transformers BERT `config.json`."""

    layers: int
    hidden: int
    intermediate: int
    heads: int

    @classmethod
    def from_config(cls, model_dir: Path) -> BertDims:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
        return cls(config["num_hidden_layers"], config["hidden_size"], config["intermediate_size"],
                   config["num_attention_heads"])  # fmt: skip


@dataclass(frozen=True)
class StepFlops:
    """FLOPs of one training step, split into forward and backward; `frozen` of them are the frozen weights'."""

    forward: float
    backward: float
    frozen: float = 0.0

    @property
    def total(self) -> float:
        return self.forward + self.backward


def train_step_flops(
    dims: BertDims,
    batch: int,
    seq: int,
    *,
    rank: int,
    lora_per_layer: int,
    classes: int,
    lowest_trainable: int = 0,
    first_token_last_layer: bool = False,
    lora_on_keys_values: int = 0,
) -> StepFlops:
    """Matrix-multiply FLOPs of one training step (see the module docstring for the formula).

    `lora_on_keys_values` is how many of the `lora_per_layer` targets project keys or values: in a
    first-token last layer those still cover every token.
    """
    h, i, tokens = dims.hidden, dims.intermediate, batch * seq
    forward = backward = frozen = 0.0
    for layer in range(dims.layers):
        rows = batch if first_token_last_layer and layer == dims.layers - 1 else tokens  # query positions
        qkv = 2 * h * h * (rows + 2 * tokens)
        other = 2 * rows * (h * h + 2 * h * i)  # attention output projection and the FFN
        attention = 4 * rows * seq * h
        lora = 4 * h * rank * (rows * (lora_per_layer - lora_on_keys_values) + tokens * lora_on_keys_values)
        forward += qkv + other + attention + lora
        frozen += qkv + other
        if layer < lowest_trainable:
            continue
        lowest = layer == lowest_trainable
        weight_gradients = other if lowest else qkv + other  # input gradients of the frozen weights
        backward += weight_gradients + (1.5 if lowest else 2.0) * (attention + lora)
        frozen += weight_gradients
    pooler, classifier = 2 * batch * h * h, 2 * batch * h * classes
    forward += pooler + classifier
    backward += pooler + 2 * classifier
    frozen += 2 * pooler
    return StepFlops(float(forward), float(backward), float(frozen))
