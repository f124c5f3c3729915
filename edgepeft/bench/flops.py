"""FLOP counts of a BERT training step with LoRA, and this machine's sustained matrix-multiply FLOP/s.

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

Layers below the lowest trainable one need no backward at all. Call-site figures are in GFLOP of fp32 work.
"""

from __future__ import annotations

import json
import time
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
    """FLOPs of one training step, split into forward and backward."""

    forward: float
    backward: float

    @property
    def total(self) -> float:
        return self.forward + self.backward


def train_step_flops(
    dims: BertDims, batch: int, seq: int, *, rank: int, lora_per_layer: int, classes: int, lowest_trainable: int = 0
) -> StepFlops:
    """Matrix-multiply FLOPs of one training step (see the module docstring for the formula)."""
    h, i, tokens = dims.hidden, dims.intermediate, batch * seq
    weights = 2 * tokens * (4 * h * h + 2 * h * i)
    qkv = 2 * tokens * 3 * h * h
    attention = 4 * batch * seq * seq * h
    lora = 4 * tokens * h * rank * lora_per_layer
    pooler, classifier = 2 * batch * h * h, 2 * batch * h * classes

    forward = dims.layers * (weights + attention + lora) + pooler + classifier
    above = dims.layers - lowest_trainable - 1  # layers entirely above the lowest trainable one
    backward = above * (weights + 2 * attention + 2 * lora)
    backward += (weights - qkv) + 1.5 * attention + 1.5 * lora  # the lowest trainable layer
    backward += pooler + 2 * classifier
    return StepFlops(float(forward), float(backward))


def measure_matmul_flops(seconds: float = 3.0, size: int = 2048, rounds: int = 3) -> float:
    """Sustained float32 FLOP/s of numpy's `size` x `size` matmul: the best of `rounds` rounds over `seconds`.

    numpy's BLAS uses every core by default, as the training runs do.
    """
    import numpy as np

    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    out = np.empty_like(a)
    np.matmul(a, b, out=out)  # warm-up: threads started, pages touched
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / rounds or count == 0:
            np.matmul(a, b, out=out)
            count += 1
        best = max(best, 2.0 * size**3 * count / elapsed)
    return best
