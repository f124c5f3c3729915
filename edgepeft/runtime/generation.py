"""Text generation on the device with the bundle's KV-cache graph (`generation.onnx`), torch-free.

The prompt runs once through the graph with an empty cache; each new token then runs one position, reading the
keys and values of every earlier position from the cache the previous run returned. The current adapter is fed
on every run (its tensors are overridable inputs of the graph), so generation always uses the session's values.

Speed: the frozen weights are stored int8 behind `DequantizeLinear`, which ORT would run for every token (SmolLM2:
135M values dequantized per token, most of the token's time). By default the generator dequantizes them once,
when it is created (`runtime/dequantized.py`), and ORT multiplies the fp32 arrays it is handed: the products of
the dequantized weights, exactly; the cost is an fp32 copy of them in memory (~540 MB for SmolLM2).
`dequantize_once=False` keeps them int8 resident (~4x less) and dequantizes per run. The cache and the adapter
stay in ORT values bound to the session (`IOBinding`): each run's present keys/values become the next run's past
without a copy, and the adapter is handed over once per generation.
"""

from __future__ import annotations

import ctypes
import logging
import sys
import time
from collections.abc import Collection
from dataclasses import dataclass

import numpy as np

from edgepeft.errors import BundleError, InputError, PromptError
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.dequantized import dequantized_graph
from edgepeft.runtime.ort import onnxruntime_module, session_options
from edgepeft.runtime.tasks.causal_lm import CausalLMData

logger = logging.getLogger(__name__)

PAST, PRESENT = "past_key_values.", "present."


@dataclass
class Generation:
    """A prompt's continuation: its text, its new token ids, why it stopped ("eos", "max_new_tokens", or
    "max_positions": the model's context is full)."""

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

    def __init__(self, bundle: Bundle, data: CausalLMData, threads: int = 0, dequantize_once: bool = True):
        name = data.task.generation_model
        if not name:
            raise BundleError(f"bundle {bundle.path} has no generation graph: export it again with this edgepeft")
        ort = onnxruntime_module()
        options = session_options(threads)
        model: str | bytes = str(bundle.file(name))
        self._weights: list = []  # the dequantized weights and their ORT values, which share their memory
        dequantize_once = dequantize_once and bundle.manifest.quantization == "int8"  # an fp32 bundle has none
        try:
            if dequantize_once:
                model, weights = dequantized_graph(bundle.file(name))
                # no prepacked copies of them (+540 MB for SmolLM2): one position a run multiplies by a
                # vector, which MLAS does from the plain weight as fast
                options.add_session_config_entry("session.disable_prepacking", "1")
                for weight, value in weights.items():
                    shared = ort.OrtValue.ortvalue_from_numpy(value)
                    options.add_initializer(weight, shared)
                    self._weights.append((value, shared))
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
        except Exception as e:  # ORT raises plain RuntimeErrors for unreadable models
            raise BundleError(f"ONNX Runtime cannot load {bundle.file(name)}: {str(e).splitlines()[0]}") from None
        del model
        if dequantize_once:
            release_free_heap()  # the load's transient copies (the int8 graph) stay mapped otherwise
        self._ort = ort
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
        values: dict[str, np.ndarray] | None,
        max_new_tokens: int = 32,
        *,
        temperature: float = 0.0,
        top_k: int | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        use_cache: bool = True,
        stop_ids: Collection[int] | None = None,
    ) -> Generation:
        """Continue `prompt` with the adapter `values` (None: the bundle's exported values); `use_cache=False`
        reruns the whole sequence each token.

        Generation stops at any of `stop_ids` (default: the bundle's eos and end-of-turn ids; `()`: never)."""
        _check_sampling(max_new_tokens, temperature, top_k, top_p)
        ids = self._prompt_ids(prompt)
        rng = np.random.default_rng(seed)
        stops = set(self._data.task.stops if stop_ids is None else stop_ids)
        binding = self._binding(values)
        sequence, new = list(ids), []
        stopped = "max_new_tokens"
        limit = self._data.task.max_positions  # prompt + continuation fit the model's context
        if limit is not None and len(ids) + max_new_tokens > limit:
            max_new_tokens, stopped = limit - len(ids), "max_positions"
        started = time.perf_counter()
        prefill = 0.0
        for _ in range(max_new_tokens):
            step = sequence[len(sequence) - 1 :] if use_cache and new else sequence
            logits = self._run(binding, step, len(sequence) - len(step), first=not new or not use_cache)
            if not new:
                prefill = time.perf_counter() - started
            token = _sample(logits, temperature, top_k, top_p, rng)
            new.append(token)
            sequence.append(token)
            if token in stops:
                stopped = "eos"
                break
        decode = time.perf_counter() - started - prefill
        text = self._data.tokenizer.decode([t for t in new if t not in stops], skip_special_tokens=True)
        return Generation(text, new, len(ids), stopped, prefill, decode)

    def teacher_forced(
        self, prompt: str | list[dict], continuation: list[int], values: dict[str, np.ndarray]
    ) -> list[int]:
        """The greedy token the device picks after `prompt` and each prefix of `continuation` (forced in, one
        cached run a token, as `generate` runs them): `[argmax after prompt, after prompt + c[0], ...]`.

        Where another model's greedy continuation is forced in, a position's pick differs from that model's only
        where the two disagree on that token, not because an earlier choice sent them down another path."""
        if not continuation:
            raise InputError("`continuation` is empty: there is no position to score")
        ids = self._prompt_ids(prompt)
        binding = self._binding(values)
        picks = [int(np.argmax(self._run(binding, ids, 0, first=True)))]
        for i, token in enumerate(continuation[:-1]):
            picks.append(int(np.argmax(self._run(binding, [int(token)], len(ids) + i, first=False))))
        return picks

    def _prompt_ids(self, prompt: str | list[dict]) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise PromptError("the prompt is empty")
            ids = list(self._data.tokenizer.encode(prompt).ids)
        else:
            text = self._data.render_prompt(prompt)
            ids = list(self._data.tokenizer.encode(text, add_special_tokens=False).ids)
        if not ids:
            raise PromptError(f"the prompt {prompt!r} encodes to no tokens")
        limit = self._data.task.max_positions
        if limit is not None and len(ids) >= limit:
            raise PromptError(f"the prompt is {len(ids)} tokens: the model's context is {limit} positions, "
                              f"so a prompt takes at most {limit - 1}")
        return ids

    def _binding(self, values: dict[str, np.ndarray] | None):
        """An IOBinding holding the adapter `values` as ORT values for one generation (bound once, not fed per run);
        None binds none: the graph's initializers, the values the bundle was exported with, then generate."""
        binding = self._session.io_binding()
        names = self._trainable if values is not None else []
        adapter = {name: np.ascontiguousarray(values[name], dtype=np.float32) for name in names}
        for name, value in adapter.items():
            binding.bind_ortvalue_input(name, self._ort.OrtValue.ortvalue_from_numpy(value))
        binding.adapter = adapter  # ortvalue_from_numpy shares the array's memory: keep the arrays alive
        return binding

    def _run(self, binding, step: list[int], offset: int, first: bool) -> np.ndarray:
        """One run over `step` (the tokens after `offset` cached positions, an empty cache if `first`); returns
        the last position's logits. The outputs stay bound: the present keys/values feed the next run."""
        total = offset + len(step)
        feeds = {"input_ids": np.array([step], dtype=np.int64), "attention_mask": np.ones((1, total), dtype=np.int64)}
        if self._position_ids:
            feeds["position_ids"] = np.arange(offset, total, dtype=np.int64)[None, :]
        if first:
            feeds.update((name, np.zeros((1, shape[1], 0, shape[3]), np.float32)) for name, shape in self._past.items())
        else:
            outputs = binding.get_outputs()
            for name, value in zip(self._outputs, outputs):
                if name.startswith(PRESENT):
                    binding.bind_ortvalue_input(PAST + name[len(PRESENT) :], value)
        for name, value in feeds.items():
            binding.bind_cpu_input(name, value)
        binding.feeds = feeds  # bind_cpu_input shares the arrays' memory until the run
        for name in self._outputs:
            binding.bind_output(name, "cpu")
        self._session.run_with_iobinding(binding)
        logits = binding.get_outputs()[self._outputs.index("logits")].numpy()
        return logits[0, -1]


def release_free_heap() -> None:
    """Return the C heap's free pages to the system (glibc's `malloc_trim`); nothing elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL(None)
        trim = libc.malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (musl has no malloc_trim)
        return
    trim.argtypes = [ctypes.c_size_t]
    trim(0)


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
