"""Tokenize text on the device with the bundle's own `tokenizer.json` (Hugging Face tokenizers, no torch)."""

from __future__ import annotations

import numpy as np
from tokenizers import Tokenizer

from edgepeft.errors import BundleError
from edgepeft.manifest import TOKENIZER, Manifest
from edgepeft.runtime.bundle import Bundle

# Which encoding field feeds which model input.
_FIELDS = {"input_ids": "ids", "attention_mask": "attention_mask", "token_type_ids": "type_ids"}


class TextEncoder:
    """Texts -> the bundle's input arrays, padded to the longest text (at most `max_length` tokens)."""

    def __init__(self, bundle: Bundle):
        if not bundle.has_tokenizer:
            raise BundleError(f"bundle {bundle.path} has no {TOKENIZER}: it takes arrays, not text")
        manifest: Manifest = bundle.manifest
        unknown = [spec.name for spec in manifest.inputs if spec.name not in _FIELDS]
        if unknown:
            raise BundleError(f"bundle inputs {unknown} cannot be made from text")
        try:
            self._tokenizer = Tokenizer.from_file(str(bundle.file(TOKENIZER)))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise BundleError(f"bundle {TOKENIZER} cannot be read: {e}") from None
        if manifest.max_length:
            self._tokenizer.enable_truncation(max_length=manifest.max_length)
        self._inputs = [spec.name for spec in manifest.inputs]

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        encodings = self._tokenizer.encode_batch(list(texts))
        return {name: np.array([getattr(e, _FIELDS[name]) for e in encodings], dtype=np.int64) for name in self._inputs}
