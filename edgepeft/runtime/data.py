"""Local training data: arrays checked against the bundle, text files tokenized on the device, batches."""

from __future__ import annotations

import csv
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import DataError, InputError
from edgepeft.manifest import Manifest, TensorSpec

logger = logging.getLogger(__name__)

MAX_DATA_BYTES = 1 << 30  # a local text file larger than this is not personal data: refuse, don't read


@dataclass(frozen=True)
class Dataset:
    """Model inputs by name (first axis = examples) and, for training and evaluation, labels."""

    features: dict[str, np.ndarray]
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return len(next(iter(self.features.values())))

    def take(self, index: np.ndarray) -> Dataset:
        labels = None if self.labels is None else self.labels[index]
        return Dataset({k: v[index] for k, v in self.features.items()}, labels)


def check_features(manifest: Manifest, features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Check names, dtypes and fixed dimensions of `features` against the bundle's inputs."""
    if not isinstance(features, dict):
        raise InputError(f"features must be a dict of input name -> array, got {type(features).__name__}")
    expected = {spec.name for spec in manifest.inputs}
    missing, unknown = expected - set(features), set(features) - expected
    if missing or unknown:
        raise InputError(f"inputs do not match the bundle: missing {sorted(missing)}, unknown {sorted(unknown)}")
    checked = {}
    rows = None
    for spec in manifest.inputs:
        array = _check_array(np.asarray(features[spec.name]), spec)
        if rows is not None and len(array) != rows:
            raise InputError(f"input {spec.name!r} has {len(array)} rows, other inputs have {rows}")
        rows = len(array)
        checked[spec.name] = array
    return checked


def check_labels(manifest: Manifest, labels: np.ndarray, rows: int) -> np.ndarray:
    """Check labels against the bundle: count, dtype, shape, and class range for a classifier."""
    labels = _check_array(np.asarray(labels), manifest.label)
    if len(labels) != rows:
        raise InputError(f"{len(labels)} labels for {rows} examples")
    if manifest.is_classifier:
        classes = manifest.output.shape[-1]
        bad = labels[(labels < 0) | (labels >= classes)] if isinstance(classes, int) else labels[labels < 0]
        if bad.size:
            raise InputError(f"label {int(bad[0])} is out of range: the bundle has {classes} classes")
    return labels


def _check_array(array: np.ndarray, spec: TensorSpec) -> np.ndarray:
    if array.ndim != len(spec.shape):
        raise InputError(f"{spec.name!r} must have {len(spec.shape)} dimensions {spec.shape}, got shape {array.shape}")
    for axis, (want, got) in enumerate(zip(spec.shape, array.shape)):
        if isinstance(want, int) and want != got:
            raise InputError(f"{spec.name!r} dimension {axis} must be {want}, got shape {array.shape}")
    if array.dtype != np.dtype(spec.dtype):
        same_kind = np.can_cast(array.dtype, spec.dtype, casting="same_kind")
        if not same_kind or (array.dtype.kind == "f") != (np.dtype(spec.dtype).kind == "f"):
            raise InputError(f"{spec.name!r} must be {spec.dtype}, got {array.dtype}")
        array = array.astype(spec.dtype)
    if array.dtype.kind == "f" and not np.isfinite(array).all():
        raise InputError(f"{spec.name!r} holds NaN or infinite values")
    return array


def read_text_file(path: str | os.PathLike) -> tuple[list[str], list[str] | None]:
    """Read texts and (if present) labels from a CSV (columns `text`, `label`) or JSONL file."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.stat().st_size > MAX_DATA_BYTES:
        raise DataError(f"data file {path} is larger than {MAX_DATA_BYTES >> 20} MiB: split it")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not UTF-8 text: {e}") from None
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = _jsonl_rows(raw, path)
    elif path.suffix.lower() in (".csv", ".tsv"):
        rows = _csv_rows(raw, path, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (use .csv or .jsonl)")
    if not rows:
        raise DataError(f"{path} holds no examples")
    texts, labels = [], []
    has_labels = rows[0][1] is not None
    for line, (text, label) in enumerate(rows, start=1):
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{path} row {line}: `text` is missing or empty")
        if (label is not None) != has_labels:
            raise DataError(f"{path} row {line}: `label` is missing (other rows have one)")
        texts.append(text)
        labels.append(str(label) if label is not None else None)
    return texts, (labels if has_labels else None)


def _jsonl_rows(raw: str, path: Path) -> list[tuple[object, object]]:
    rows = []
    for number, line in enumerate(raw.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not valid JSON: {e.msg}") from None
        if not isinstance(record, dict) or "text" not in record:
            raise DataError(f"{path} line {number} is not an object with a `text` field")
        rows.append((record["text"], record.get("label")))
    return rows


def _csv_rows(raw: str, path: Path, delimiter: str) -> list[tuple[object, object]]:
    reader = csv.DictReader(raw.splitlines(), delimiter=delimiter)
    if reader.fieldnames is None or "text" not in reader.fieldnames:
        raise DataError(f"{path} has no `text` column in its header (found {reader.fieldnames})")
    try:
        return [(row["text"], row.get("label")) for row in reader]
    except csv.Error as e:
        raise DataError(f"{path} is not valid CSV: {e}") from None


def encode_labels(manifest: Manifest, labels: list[str]) -> np.ndarray:
    """Turn label names (or class indices written as text) into the int64 class indices of the bundle."""
    names = {name: i for i, name in enumerate(manifest.labels)}
    out = np.empty(len(labels), dtype=np.int64)
    for i, label in enumerate(labels):
        if label in names:
            out[i] = names[label]
        elif not manifest.labels and label.strip().lstrip("-").isdigit():
            out[i] = int(label)
        else:
            known = list(manifest.labels) or "class indices"
            raise DataError(f"label {label!r} (row {i + 1}) is not one the bundle knows: {known}")
    return out


def batches(dataset: Dataset, batch_size: int) -> Iterator[Dataset]:
    """Yield batches in order, for evaluation and prediction. Padded text columns are trimmed per batch."""
    for start in range(0, len(dataset), batch_size):
        yield trim_padding(dataset.take(np.arange(start, min(start + batch_size, len(dataset)))))


def trim_padding(batch: Dataset) -> Dataset:
    """Drop sequence positions that are padding in every row (needs an `attention_mask` input)."""
    mask = batch.features.get("attention_mask")
    if mask is None or mask.ndim != 2:
        return batch
    used = np.flatnonzero(mask.any(axis=0))
    length = int(used[-1]) + 1 if used.size else 1
    if length == mask.shape[1]:
        return batch
    features = {
        k: (v[:, :length] if v.ndim == 2 and v.shape[1] == mask.shape[1] else v) for k, v in batch.features.items()
    }
    return Dataset(features, batch.labels)
