"""Generation alone on a causal LM bundle: its KV-cache graph and one adapter, without the training state.

A `TrainingSession` that generates also holds what generating never reads: the checkpoint (the frozen int8
weights a second time) and the training module. For SmolLM2-135M that is ~300 MB: ready to generate, this session
holds 665 MB against 963, and peaks at 809 against 1,119 (`benchmarks/lm_generate_memory.py`). An app or
`edgepeft generate` that only continues texts opens this instead; it reads the manifest, the tokenizer,
`generation.onnx` and the adapter.
"""

from __future__ import annotations

import os

import numpy as np

from edgepeft.errors import InputError
from edgepeft.runtime.adapter import load_adapter
from edgepeft.runtime.bundle import Bundle, open_bundle
from edgepeft.runtime.generation import Generation, Generator
from edgepeft.runtime.tasks import task_data


class GenerationSession:
    """Continue texts with a causal LM bundle and an adapter (the bundle's exported values if none is loaded)."""

    def __init__(
        self,
        bundle: Bundle | str | os.PathLike,
        adapter: str | os.PathLike | None = None,
        threads: int = 0,
        dequantize_once: bool = True,
    ):
        self.bundle = bundle if isinstance(bundle, Bundle) else open_bundle(bundle)
        self.manifest = self.bundle.manifest
        data = task_data(self.bundle)
        if data is None:
            raise InputError(f"bundle {self.bundle.path} is not a causal language model: it cannot generate")
        self._generator = Generator(self.bundle, data, threads=threads, dequantize_once=dequantize_once)
        self._values: dict[str, np.ndarray] | None = None  # None: the graph's own initializers, as exported
        if adapter is not None:
            self.load_adapter(adapter)

    def load_adapter(self, directory: str | os.PathLike) -> None:
        """Generate with the PEFT adapter in `directory` (trained on this device or on a host) from now on."""
        self._values = load_adapter(self.manifest, directory)  # a causal LM has no FFA-LoRA frozen lora_A

    def generate(
        self,
        prompt: str | list[dict],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
    ) -> Generation:
        """Continue `prompt` (a text, or chat messages rendered with the bundle's chat template); stops at eos.
        `temperature` 0 is greedy. As `TrainingSession.generate`, with this session's adapter."""
        return self._generator.generate(prompt, self._values, max_new_tokens, temperature=temperature, top_k=top_k,
                                        top_p=top_p, seed=seed)  # fmt: skip
