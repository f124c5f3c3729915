"""`BenchConfig`: what one harness run measures (systems, shape grid, steps, seeds, epochs), validated."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace

from edgepeft.errors import InputError

EDGEPEFT, ORT_FP32, PYTORCH = "edgepeft", "ort-fp32", "pytorch-peft"
SYSTEMS = (EDGEPEFT, ORT_FP32, PYTORCH)
# Which backbone quantization each ORT system's bundle is exported with (None: not an ORT system).
QUANTIZATION = {EDGEPEFT: "int8", ORT_FP32: "fp32", PYTORCH: None}
DESCRIPTIONS = {
    EDGEPEFT: "edgepeft runtime, int8 backbone (default export)",
    ORT_FP32: "edgepeft runtime, fp32 backbone (ORT training, quantization='fp32')",
    PYTORCH: "PyTorch eager + Hugging Face PEFT, fp32",
}
HEADLINE = (8, 128)  # the acceptance point of issue 4: batch 8, sequence 128


@dataclass(frozen=True)
class BenchConfig:
    """One harness run. The accuracy defaults are the demo's: 2 epochs, lr 2e-3, batch 8, 128 tokens.

    `train_rows`/`test_rows` cut the Austen split (None: all of it); `max_steps` caps each accuracy run.
    The speed grid runs `rounds` times, each round in a rotated system order, so a noisy minute of a shared
    machine does not land on one system only; a point's figures pool the timed steps of every round.
    `threads` is both ONNX Runtime's intra-op thread count and `torch.set_num_threads`. `torch_env` is
    added to the PyTorch processes' environment; the default is PyTorch's own settings (with nothing else
    running, GNU OpenMP's spin-waiting measured faster and steadier at 8 x 128 than OMP_WAIT_POLICY=PASSIVE:
    451-575 against 425-754 ms a step over five interleaved rounds).
    """

    systems: tuple[str, ...] = SYSTEMS
    batches: tuple[int, ...] = (1, 8, 16)
    seqs: tuple[int, ...] = (64, 128)
    steps: int = 20
    rounds: int = 3
    warmup: int = 3
    predictions: int = 20
    seeds: tuple[int, ...] = (0, 1, 2)
    epochs: int = 2
    learning_rate: float = 2e-3
    batch_size: int = 8
    max_length: int = 128
    train_rows: int | None = None
    test_rows: int | None = None
    max_steps: int | None = None
    threads: int = os.cpu_count() or 1
    matmul_seconds: float = 3.0
    torch_env: dict[str, str] = field(default_factory=dict)
    data_seed: int = 0  # the train/test split of the Austen passages, as the demo makes it
    input_seed: int = 0  # the random token ids of the speed workload

    def __post_init__(self) -> None:
        object.__setattr__(self, "systems", tuple(self.systems))
        object.__setattr__(self, "batches", tuple(self.batches))
        object.__setattr__(self, "seqs", tuple(self.seqs))
        object.__setattr__(self, "seeds", tuple(self.seeds))
        unknown = [s for s in self.systems if s not in SYSTEMS]
        if unknown or not self.systems:
            raise InputError(
                f"unknown system {unknown[0] if unknown else '(none)'!r}: choose from {', '.join(SYSTEMS)}"
            )
        if len(set(self.systems)) != len(self.systems):
            raise InputError(f"`systems` holds duplicates: {', '.join(self.systems)}")
        for name in ("batches", "seqs", "seeds"):
            values = getattr(self, name)
            least, kind = (0, "non-negative") if name == "seeds" else (1, "positive")
            if not values or any(not isinstance(v, int) or v < least for v in values):
                raise InputError(f"`{name}` must be a non-empty list of {kind} integers, got {values!r}")
        if max(self.seqs) > self.max_length:
            raise InputError(f"sequence length {max(self.seqs)} exceeds the bundle's max_length {self.max_length}")
        for name in ("steps", "rounds", "predictions", "epochs", "batch_size", "max_length", "threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise InputError(f"`{name}` must be a positive integer, got {value!r}")
        if not isinstance(self.warmup, int) or self.warmup < 0:
            raise InputError(f"`warmup` must be a non-negative integer, got {self.warmup!r}")
        for name in ("train_rows", "test_rows", "max_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value <= 0):
                raise InputError(f"`{name}` must be a positive integer or None, got {value!r}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise InputError(f"`learning_rate` must be positive, got {self.learning_rate!r}")
        if not self.matmul_seconds > 0:
            raise InputError(f"`matmul_seconds` must be positive, got {self.matmul_seconds!r}")

    @classmethod
    def smoke(cls) -> BenchConfig:
        """A tiny run for CI: one small grid point, two rounds of a few steps, one seed, accuracy on a small subset."""
        return cls(batches=(2,), seqs=(16,), steps=3, rounds=2, warmup=1, predictions=3, seeds=(0,), epochs=1,
                   max_length=32, train_rows=16, test_rows=16, max_steps=2, matmul_seconds=0.3)  # fmt: skip

    def with_overrides(self, **values: object) -> BenchConfig:
        """A copy with the given fields replaced (None values are ignored), validated again."""
        return replace(self, **{k: v for k, v in values.items() if v is not None})

    @property
    def grid(self) -> list[tuple[int, int]]:
        """(batch, seq) points of the speed grid."""
        return [(b, s) for b in self.batches for s in self.seqs]

    @property
    def headline(self) -> tuple[int, int]:
        """The point the headline figures and ratios come from: batch 8 x 128 if measured, else the largest."""
        return HEADLINE if HEADLINE in self.grid else max(self.grid, key=lambda p: (p[0] * p[1], p))
