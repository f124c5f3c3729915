"""A causal language model's data on the device: read text, tokenize, block and batch it, score perplexity.

Three file layouts (the bundle's tokenizer and chat template, no torch):
  - plain text (`.txt`, `.md`): the whole file is one document, tokenized once, eos appended, cut into blocks of
    the bundle's `max_length` tokens (the last, shorter block kept, padded);
  - JSONL of `{"text": ...}`: one example per line, eos appended, truncated at `max_length`;
  - JSONL of `{"messages": [{"role": ..., "content": ...}, ...]}`: rendered with the bundle's chat template; the
    loss is taken on the assistant turns only (their content and end-of-turn tokens), -100 everywhere else.
Labels are the token ids themselves (the graph shifts them), -100 on padding and on unscored tokens.
"""

from __future__ import annotations

import json
import logging
import math
import os
from pathlib import Path

import numpy as np

from edgepeft.errors import BundleError, DataError
from edgepeft.manifest import CausalLMTask
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.data import Dataset
from edgepeft.runtime.files import MAX_DATA_BYTES, _read_utf8, read_records

logger = logging.getLogger(__name__)

IGNORE = -100
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")


class CausalLMData:
    """Reads, tokenizes and batches text for one causal LM bundle, and scores perplexity."""

    def __init__(self, bundle: Bundle):
        from tokenizers import Tokenizer

        task = bundle.manifest.task
        if task is None:
            raise BundleError(f"bundle {bundle.path} is not a causal language model")
        self.task: CausalLMTask = task
        self.inputs = [spec.name for spec in bundle.manifest.inputs]
        try:
            self.tokenizer = Tokenizer.from_file(str(bundle.file(task.tokenizer)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"bundle {task.tokenizer} cannot be read: {e}") from None
        self.tokenizer.no_truncation()
        self.tokenizer.no_padding()
        self._template = None

    # ---- reading ----------------------------------------------------------------------------------

    def load(self, path: str | os.PathLike, text_column: str | None = None) -> Dataset:
        """Read a plain-text or JSONL file into padded examples with labels."""
        path = Path(path)
        suffix = path.suffix.lower()
        if suffix in TEXT_SUFFIXES:
            return self.pad(self.blocks(self.encode_text(_read_text(path))))
        if suffix not in JSONL_SUFFIXES:
            layouts = f"plain text ({', '.join(TEXT_SUFFIXES)}) or JSONL of {{\"text\"}} or {{\"messages\"}} (.jsonl)"
            raise DataError(f"{path}: a language model reads {layouts}, not {suffix or 'no suffix'}")
        column = text_column or "text"
        records = read_records(path, expect=f"a `{column}` or a `messages` field")
        examples = []
        for row, line in zip(records.rows, records.lines):
            if "messages" in row and column not in row:
                ids, labels = self.encode_chat(row["messages"], f"{path} line {line}")
            else:
                text = row.get(column)
                if not isinstance(text, str) or not text.strip():
                    raise DataError(f"{path} line {line}: `{column}` must be a non-empty string (or give `messages`)")
                ids = self.encode_text(text)
                labels = list(ids)
            examples.append((ids[: self.task.max_length], labels[: self.task.max_length]))
        return self.pad(examples, str(path))

    def encode_text(self, text: str) -> list[int]:
        """Token ids of a document, with the tokenizer's own specials (bos) and eos appended."""
        ids = list(self.tokenizer.encode(text).ids)
        eos = self.task.eos_token_id
        return ids + [eos] if eos is not None and (not ids or ids[-1] != eos) else ids

    def blocks(self, ids: list[int]) -> list[tuple[list[int], list[int]]]:
        """Cut one long token sequence into blocks of `max_length`; a last block of one token is dropped."""
        size = self.task.max_length
        cut = [ids[start : start + size] for start in range(0, len(ids), size)]
        cut = [block for block in cut if len(block) > 1]
        if not cut:
            raise DataError("the text holds fewer than 2 tokens: nothing to learn from")
        return [(block, list(block)) for block in cut]

    def encode_chat(self, messages: object, where: str) -> tuple[list[int], list[int]]:
        """Render a conversation with the chat template; labels score the assistant turns only."""
        _check_messages(messages, where)
        text = self._render(messages, False, where)
        scored: list[tuple[int, int]] = []  # character spans of the assistant turns
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            start = len(self._render(messages[:i], True, where))
            prefix = self._render(messages[: i + 1], False, where)
            end = len(prefix)
            if not text.startswith(prefix) or start > end:
                raise DataError(f"{where}: the bundle's chat template does not render the conversation turn by "
                                "turn (a prefix changes), so the assistant turns cannot be told apart")  # fmt: skip
            scored.append((start, end))
        if not scored:
            raise DataError(f"{where}: the conversation has no assistant message to learn from")
        encoding = self.tokenizer.encode(text, add_special_tokens=False)
        ids = list(encoding.ids)
        labels = [
            token if any(start <= a and b <= end and b > a for start, end in scored) else IGNORE
            for token, (a, b) in zip(ids, encoding.offsets)
        ]
        return ids, labels

    def _render(self, messages: list[dict], add_generation_prompt: bool, where: str) -> str:
        """The chat template applied as transformers' `apply_chat_template` applies it (`_chat_template`)."""
        from jinja2.exceptions import TemplateError

        template = self._chat_template(where)
        try:
            return template.render(messages=messages, add_generation_prompt=add_generation_prompt)
        except TemplateError as e:  # the template's own raise_exception, or a variable it needs and lacks
            raise DataError(f"{where}: the bundle's chat template refuses the conversation: {e}") from None

    def _chat_template(self, where: str):
        if self._template is None:
            if not self.task.chat_template:
                raise DataError(f"{where}: chat messages, but the bundle has no chat template")
            from datetime import datetime

            from jinja2.exceptions import TemplateError
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            def raise_exception(message: str) -> None:
                raise TemplateError(message)

            # transformers' settings and globals (`apply_chat_template`): the bundle's special tokens as `bos_token`,
            # `eos_token`, `pad_token`; `raise_exception`, `strftime_now`, its `tojson`; loop controls
            env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
            env.globals["raise_exception"] = raise_exception
            env.globals["strftime_now"] = lambda format: datetime.now().strftime(format)
            for name in ("bos", "eos", "pad"):
                token_id = getattr(self.task, f"{name}_token_id")
                if token_id is not None:
                    env.globals[f"{name}_token"] = self.tokenizer.id_to_token(token_id)
            env.filters["tojson"] = _tojson
            try:
                self._template = env.from_string(self.task.chat_template)
            except TemplateError as e:
                raise BundleError(f"the bundle's chat template is not a valid Jinja template: {e}") from None
        return self._template

    def render_prompt(self, messages: list[dict]) -> str:
        """A conversation rendered for the assistant's next turn (generation)."""
        _check_messages(messages, "prompt messages")
        return self._render(messages, True, "prompt messages")

    # ---- batching and scoring ----------------------------------------------------------------------

    def pad(self, examples: list[tuple[list[int], list[int]]], where: str = "the data") -> Dataset:
        """Right-pad examples to the longest; labels -100 on padding; positions count real tokens."""
        scored = [(ids, targets) for ids, targets in examples if any(t != IGNORE for t in targets[1:])]
        left_out = len(examples) - len(scored)
        cut = f"the tokens to learn (assistant turns) lie past the bundle's {self.task.max_length} tokens"
        if left_out and scored:  # a batch of them alone would have no loss (0 / 0)
            logger.warning("%s: %d of %d examples left out: %s", where, left_out, len(examples), cut)
        if not scored:
            raise DataError(f"{where}: nothing to learn from: in every example {cut} (a bundle exported with a "
                            "longer `max_length` takes them)")
        examples = scored
        length = max(len(ids) for ids, _ in examples)
        rows = len(examples)
        ids = np.full((rows, length), self.task.pad_token_id, dtype=np.int64)
        mask = np.zeros((rows, length), dtype=np.int64)
        labels = np.full((rows, length), IGNORE, dtype=np.int64)
        for row, (tokens, targets) in enumerate(examples):
            ids[row, : len(tokens)] = tokens
            mask[row, : len(tokens)] = 1
            labels[row, : len(targets)] = targets
        features = {"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask)}
        return Dataset({name: features[name] for name in self.inputs}, labels)


def positions(mask: np.ndarray) -> np.ndarray:
    """Position ids of right- or left-padded rows: 0 at the first real token (padding at 0 too)."""
    return np.maximum(np.cumsum(mask, axis=-1) - 1, 0).astype(np.int64)


def scored_tokens(labels: np.ndarray) -> int:
    """How many tokens a batch's loss averages over: labels after the shift that are not -100."""
    return int((labels[:, 1:] != IGNORE).sum())


def perplexity(loss_sum: float, tokens: int) -> float:
    """exp of the mean token loss (`loss_sum` is the sum over batches of mean loss x scored tokens)."""
    return math.exp(loss_sum / tokens) if tokens else float("nan")


def _check_messages(messages: object, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: `messages` must be a non-empty list of {{\"role\", \"content\"}} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str) or not isinstance(
            message.get("content"), str
        ):
            raise DataError(f"{where}: message {i + 1} must be an object with string `role` and `content`")


def _tojson(value: object, ensure_ascii: bool = False, indent: int | None = None, separators=None,
            sort_keys: bool = False) -> str:
    """transformers' `tojson` for chat templates: plain JSON, not Jinja's HTML-escaped one."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise DataError(f"data file {path} is larger than {MAX_DATA_BYTES >> 20} MiB: split it")
    text = _read_utf8(path)
    if not text.strip():
        raise DataError(f"{path} is empty: it holds no text")
    return text
