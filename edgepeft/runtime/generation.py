"""Text generation on the device with the bundle's KV-cache graph (`generation.onnx`), torch-free.

The prompt runs once through the graph with an empty cache; each new token then runs one position, reading the
keys and values of every earlier position from the cache the previous run returned. The current adapter is fed
on every run (its tensors are overridable inputs of the graph), so generation always uses the session's values.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np

from edgepeft.errors import BundleError, InputError
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.ort import onnxruntime_module
from edgepeft.runtime.tasks.causal_lm import CausalLMData

logger = logging.getLogger(__name__)

PAST, PRESENT = "past_key_values.", "present."


@dataclass
class Generation:
    """A prompt's continuation: its text, its new token ids, why it stopped ("eos" or "max_new_tokens")."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    stopped: str
    prefill_seconds: float
    decode_seconds: float

    @property
    def tokens_per_second(self) -> float | None:
        """New tokens per second after the prompt's run (the decoding speed)."""
        steps = len(self.token_ids) - 1
        return steps / self.decode_seconds if steps > 0 and self.decode_seconds > 0 else None


class Generator:
    """An inference session on a causal LM bundle's generation graph."""

    def __init__(self, bundle: Bundle, data: CausalLMData, threads: int = 0):
        name = data.task.generation_model
        if not name:
            raise BundleError(f"bundle {bundle.path} has no generation graph: export it again with this edgepeft")
        ort = onnxruntime_module()
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.intra_op_num_threads = threads
        try:
            self._session = ort.InferenceSession(str(bundle.file(name)), options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises plain RuntimeErrors for unreadable models
            raise BundleError(f"ONNX Runtime cannot load {bundle.file(name)}: {str(e).splitlines()[0]}") from None
        self._data = data
        inputs = {i.name: i for i in self._session.get_inputs()}
        inputs.update((i.name, i) for i in self._session.get_overridable_initializers())  # the adapter's tensors
        self._past = {n: tuple(inputs[n].shape) for n in inputs if n.startswith(PAST)}
        self._trainable = [spec.name for spec in bundle.manifest.trainable]
        missing = [n for n in self._trainable if n not in inputs]
        if missing or not self._past:
            raise BundleError(f"{bundle.file(name)} is not a KV-cache graph taking the adapter (missing {missing[:3]})")
        self._outputs = [o.name for o in self._session.get_outputs()]
        self._position_ids = "position_ids" in inputs

    def generate(
        self,
        prompt: str | list[dict],
        values: dict[str, np.ndarray],
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
    ) -> Generation:
        """Continue `prompt` with the adapter `values`; `use_cache=False` reruns the whole sequence each token."""
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids = self._prompt_ids(prompt)
        rng = np.random.default_rng(seed)
        adapter = {name: np.ascontiguousarray(values[name], dtype=np.float32) for name in self._trainable}
        stops = self._data.task.stops
        sequence, new = list(ids), []
        past = {name: np.zeros((1, shape[1], 0, shape[3]), np.float32) for name, shape in self._past.items()}
        stopped = "max_new_tokens"
        started = time.perf_counter()
        prefill = 0.0
        for _ in range(max_new_tokens):
            step = sequence[len(sequence) - 1 :] if use_cache and new else sequence
            if not use_cache:
                past = {name: value[:, :, :0] for name, value in past.items()}
            logits, past = self._run(step, len(sequence) - len(step), past, adapter)
            if not new:
                prefill = time.perf_counter() - started
            token = _sample(logits[0, -1], temperature, top_k, top_p, rng)
            new.append(token)
            sequence.append(token)
            if token in stops:
                stopped = "eos"
                break
        decode = time.perf_counter() - started - prefill
        text = self._data.tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)
        return Generation(text, new, len(ids), stopped, prefill, decode)

    def _prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise InputError("the prompt is empty")
            ids = list(self._data.tokenizer.encode(prompt).ids)
        else:
            text = self._data.render_prompt(prompt)
            ids = list(self._data.tokenizer.encode(text, add_special_tokens=False).ids)
        if not ids:
            raise InputError(f"the prompt {prompt!r} encodes to no tokens")
        return ids

    def _run(
        self, step: list[int], offset: int, past: dict[str, np.ndarray], adapter: dict[str, np.ndarray]
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """One run over `step` (the tokens after `offset` cached positions); returns logits and the new cache."""
        total = offset + len(step)
        feeds = {
            "input_ids": np.array([step], dtype=np.int64),
            "attention_mask": np.ones((1, total), dtype=np.int64),
            **past,
            **adapter,
        }
        if self._position_ids:
            feeds["position_ids"] = np.arange(offset, total, dtype=np.int64)[None, :]
        results = dict(zip(self._outputs, self._session.run(self._outputs, feeds)))
        present = {PAST + name[len(PRESENT) :]: value for name, value in results.items() if name.startswith(PRESENT)}
        return results["logits"], present


def _check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise InputError(f"`max_new_tokens` must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:
        raise InputError(f"`temperature` must be >= 0 (0: greedy), got {temperature!r}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise InputError(f"`top_k` must be a positive integer, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise InputError(f"`top_p` must be in (0, 1], got {top_p!r}")


def _sample(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None, rng) -> int:
    """Greedy at temperature 0; else sample from the softmax of logits / temperature, cut to top_k and top_p."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < len(logits):
        cutoff = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits >= cutoff, logits, -np.inf)
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs)
        keep = np.cumsum(probs[order]) - probs[order] < top_p  # the smallest set whose mass reaches top_p
        mask = np.zeros_like(probs, dtype=bool)
        mask[order[keep]] = True
        probs = np.where(mask, probs, 0.0)
        probs /= probs.sum()
    return int(rng.choice(len(probs), p=probs))
