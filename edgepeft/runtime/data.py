"""Local training data: arrays checked against the bundle, data files read into them, batches."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import BundleError, DataError, InputError
from edgepeft.manifest import TOKENIZER, Manifest, TensorSpec
from edgepeft.runtime.bundle import Bundle
from edgepeft.runtime.files import MAX_DATA_BYTES, Records, is_npz, read_npz, read_records
from edgepeft.runtime.values import check_present, column_values, convert, label_values, parse_cell, takes, to_array

logger = logging.getLogger(__name__)

__all__ = ["MAX_DATA_BYTES", "Dataset", "batches", "check_features", "check_labels", "encode_labels",
           "read_examples", "read_text_file", "trim_padding"]  # fmt: skip


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


def read_text_file(
    path: str | os.PathLike, text_column: str = "text", label_column: str = "label"
) -> tuple[list[str], list[str] | None]:
    """Read texts and (if the file has a label column) label strings from a CSV/TSV or JSONL file."""
    records = read_records(path, expect=f"a `{text_column}` field")
    texts = _texts(records, text_column)
    if label_column not in records.columns:
        return texts, None
    values = [row.get(label_column) for row in records.rows]
    check_present(values, records, label_column)
    return texts, [str(v) for v in values]


def read_examples(
    bundle: Bundle,
    path: str | os.PathLike,
    encode: Callable[[list[str]], dict[str, np.ndarray]],
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    labels: bool = True,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """Read a data file into the bundle's checked inputs and (with `labels`) labels.

    A bundle with a tokenizer reads text: a CSV/TSV column or JSONL field `text` (or `text_column`),
    tokenized by `encode`. A bundle that takes arrays reads, for each of its inputs (say `x` float32[batch, 16]):
      - .npz: an array named `x`, and labels in an array `labels` (or `label_column`);
      - JSONL: a field `x` per line, a number or a (nested) list of numbers: {"x": [0.1, ...], "label": 2};
      - CSV/TSV: a column `x` holding a number, or a JSON list "[0.1, ...]" (any shape), or for a 1-D
        input of width N the columns `x_0` .. `x_{N-1}` (the layout of a spreadsheet or a DataFrame).
    Labels come from the column/field `label` (or `label_column`) in the same forms. Numbers take the
    bundle's dtype by the rule of `runtime.values` (2.0 reads as 2, 1.5 is refused). A bundle with label
    names takes the names in a CSV/JSONL file (a bare number there is refused: with names such as "1".."5"
    it would be ambiguous); a numeric `labels` array in a .npz holds class indices, as in `dataset`.
    Without `labels`, a label column is not read (prediction). Other columns and fields are ignored.
    """
    manifest = bundle.manifest
    if is_npz(path):
        if text_column is not None:
            raise DataError(f"text_column={text_column!r} names a CSV or JSONL column; {path} holds arrays")
        features, values = _npz_examples(manifest, Path(path), label_column or "labels", labels)
    elif bundle.has_tokenizer:
        features, values = _text_examples(manifest, path, encode, text_column or "text", label_column, labels)
    else:
        if text_column is not None:
            raise DataError(f"text_column={text_column!r}: {takes(manifest, None)}, not text")
        features, values = _array_examples(bundle, path, label_column or "label", labels)
    return _checked(manifest, Path(path), features, values, labels)


def _texts(records: Records, column: str) -> list[str]:
    if column not in records.columns:
        hint = "" if column != "text" else ": name the text column with `text_column`"
        raise DataError(f"{records.path} has no `{column}` {records.kind} (found {list(records.columns)}){hint}")
    texts = []
    for i, row in enumerate(records.rows):
        text = row.get(column)
        if isinstance(text, str) and text.strip():
            texts.append(text)
        elif text is None or isinstance(text, str):
            raise DataError(f"{records.path} row {i + 1}: `{column}` is missing or empty (line {records.lines[i]})")
        else:
            raise DataError(f"{records.path} row {i + 1}: `{column}` must be a string, got {text!r}")
    return texts


def _labels(manifest: Manifest, records: Records, column: str) -> np.ndarray:
    values = column_values(records, column, manifest.label, parse=not manifest.labels)
    if values is None:
        raise DataError(
            f"{records.path} has no `{column}` {records.kind} (found {list(records.columns)}): training and "
            f"evaluation need labels; name the label {records.kind} with `label_column`"
        )
    check_present(values, records, column)
    values = label_values(manifest, values, f"{records.path} {records.kind} `{column}`")
    return to_array(values, manifest.label, records, column)


def _text_examples(
    manifest: Manifest,
    path: str | os.PathLike,
    encode: Callable[[list[str]], dict[str, np.ndarray]],
    text_column: str,
    label_column: str | None,
    labels: bool,
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    records = read_records(path, expect=f"a `{text_column}` field")
    texts = _texts(records, text_column)
    values = _labels(manifest, records, label_column or "label") if labels else None
    return encode(texts), values


def _array_examples(
    bundle: Bundle, path: str | os.PathLike, label_column: str, labels: bool
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    manifest = bundle.manifest
    records = read_records(path, expect="fields " + ", ".join(f"`{spec.name}`" for spec in manifest.inputs))
    features = {}
    for spec in manifest.inputs:
        values = column_values(records, spec.name, spec)
        if values is None:
            found = list(records.columns)
            if "text" in records.columns:
                raise BundleError(f"bundle {bundle.path} has no {TOKENIZER}: it takes arrays, not text "
                                  f"({takes(manifest, None)}); {records.path} has a `text` {records.kind}")  # fmt: skip
            spread = f" (or columns `{spec.name}_0` ..)" if records.is_csv and len(spec.shape) == 2 else ""
            raise DataError(f"{records.path} has no `{spec.name}` {records.kind}{spread} (found {found}): "
                            f"{takes(manifest, 'labels' if labels else None)}")  # fmt: skip
        features[spec.name] = to_array(values, spec, records, spec.name)
    return features, (_labels(manifest, records, label_column) if labels else None)


def _npz_examples(
    manifest: Manifest, path: Path, label_key: str, labels: bool
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    arrays = read_npz(path)
    wanted = [spec.name for spec in manifest.inputs] + ([label_key] if labels else [])
    missing = [name for name in wanted if name not in arrays]
    if missing:
        raise DataError(f"{path} has no array {missing[0]!r} (found {sorted(arrays)}): "
                        f"{takes(manifest, label_key if labels else None)}")  # fmt: skip
    features = {spec.name: convert(arrays[spec.name], spec, f"{path} array {spec.name!r}") for spec in manifest.inputs}
    if not labels:
        return features, None
    values = arrays[label_key]
    where = f"{path} array {label_key!r}"
    if values.dtype.kind in "US":  # label names
        names = [v.decode() if isinstance(v, bytes) else v for v in values.ravel().tolist()]
        values = np.array(label_values(manifest, names, where)).reshape(values.shape)
    return features, convert(values, manifest.label, where)


def _checked(
    manifest: Manifest, path: Path, features: dict[str, np.ndarray], values: np.ndarray | None, labels: bool
) -> tuple[dict[str, np.ndarray], np.ndarray | None]:
    """The shape, count and class checks of in-memory data, with messages that name the file."""
    try:
        features = check_features(manifest, features)
        if values is not None:
            values = check_labels(manifest, values, len(next(iter(features.values()))))
    except InputError as e:
        raise DataError(f"{path}: {e}: {takes(manifest, 'labels' if labels else None)}") from None
    return features, values


def encode_labels(manifest: Manifest, labels: list[str]) -> np.ndarray:
    """Turn label names (or, for a bundle without names, class indices written as text) into label values."""
    values = label_values(manifest, list(labels), "labels")
    if not manifest.labels:
        values = [parse_cell(v) for v in values]
    try:
        array = np.array(values)
    except ValueError:
        array = np.array(values, dtype=object)
    if array.dtype.kind not in "biuf":
        bad = next((i for i, v in enumerate(values) if not isinstance(v, (int, float))), 0)
        raise DataError(f"label {labels[bad]!r} (row {bad + 1}) is not one the bundle knows: class indices")
    return convert(array, manifest.label, "labels")


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
    labels = batch.labels  # per-token labels (a causal LM's) are trimmed with the inputs
    if labels is not None and labels.shape == mask.shape:
        labels = labels[:, :length]
    return Dataset(features, labels)
