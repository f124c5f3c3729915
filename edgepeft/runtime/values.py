"""Values read from a file -> arrays of the dtype a bundle takes, by one rule for features and labels.

The rule: a file's numbers take the bundle's dtype when no value changes. Integers are read as floats;
floats are read as integers only when they are whole (2.0 -> 2, 1.5 is refused); booleans only as bool
(or 0/1 as bool). In-memory arrays handed to `TrainingSession.dataset` keep the stricter dtype check of
`data.check_features`: there a dtype mismatch is a program's mistake, in a file it is the format's.
"""

from __future__ import annotations

import re

import json
from typing import Any

import numpy as np

from edgepeft.errors import DataError
from edgepeft.manifest import Manifest, TensorSpec
from edgepeft.runtime.files import Records

RULE = "whole numbers written as floats (2.0) are read as integers; other fractions are refused"


def describe(spec: TensorSpec, name: str | None = None) -> str:
    """`x float32[batch, 16]`: how messages show a tensor the bundle takes."""
    return f"{name or spec.name} {spec.dtype}[{', '.join(str(d) for d in spec.shape)}]"


def takes(manifest: Manifest, label_name: str | None = "labels") -> str:
    """`this bundle takes x float32[batch, 16] and labels int64[batch]`, for messages."""
    parts = ", ".join(describe(spec) for spec in manifest.inputs)
    if label_name is None:
        return f"this bundle takes {parts}"
    names = f" (names {list(manifest.labels)})" if manifest.labels else ""
    return f"this bundle takes {parts} and {describe(manifest.label, label_name)}{names}"


def parse_cell(cell: Any) -> Any:
    """A CSV cell (str) -> a number, or a list for a cell holding a JSON list like `[0.1, 0.2]`.

    JSON values (from JSONL or .npz) pass through. A cell that is neither stays a str.
    """
    if not isinstance(cell, str):
        return cell
    text = cell.strip()
    if text.startswith("["):
        try:
            return json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            return cell
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return cell


def column_values(records: Records, name: str, spec: TensorSpec, parse: bool = True) -> list[Any] | None:
    """Each row's value for tensor `spec` from column/field `name` (None where a row has none), or None
    when the file has no such column. A CSV may also spread a 1-D feature of width N over columns
    `name_0` .. `name_{N-1}`. With `parse=False` CSV cells stay strings (label names).
    """
    if name in records.columns:
        return [parse_cell(row.get(name)) if parse else row.get(name) for row in records.rows]
    if records.is_csv and len(spec.shape) == 2:
        width = spec.shape[1] if isinstance(spec.shape[1], int) else _count_columns(records.columns, name)
        spread = [f"{name}_{i}" for i in range(width)]
        if width and all(column in records.columns for column in spread):
            return [_spread_row(row, spread) for row in records.rows]
    return None


def _count_columns(columns: tuple[str, ...], name: str) -> int:
    width = 0
    while f"{name}_{width}" in columns:
        width += 1
    return width


def _spread_row(row: dict[str, Any], columns: list[str]) -> list[Any] | None:
    values = [parse_cell(row.get(column)) for column in columns]
    return None if any(v is None for v in values) else values


def to_array(values: list[Any], spec: TensorSpec, records: Records, name: str) -> np.ndarray:
    """Stack per-row values into one array of `spec`'s dtype by the rule of this module."""
    where = f"{records.path} {records.kind} `{name}`"
    check_present(values, records, name)
    try:
        array = np.array(values)
    except (ValueError, OverflowError):
        array = None
    if array is None or array.dtype.kind not in "biuf":
        i, problem = _first_bad_row(values)
        raise DataError(f"{where}: row {i + 1} (line {records.lines[i]}) {problem}")
    return convert(array, spec, where)


def check_present(values: list[Any], records: Records, name: str) -> None:
    """Refuse a row without a value (a missing field, an empty cell, JSON null)."""
    for i, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            raise DataError(f"{records.path} row {i + 1}: `{name}` is missing (line {records.lines[i]})")


def _first_bad_row(values: list[Any]) -> tuple[int, str]:
    first = np.shape(values[0]) if _is_numeric(values[0]) else None
    for i, value in enumerate(values):
        if not _is_numeric(value):
            return i, f"holds {_short(value)}, not a number or a list of numbers"
        if np.shape(value) != first:
            return i, f"has shape {np.shape(value)}, row 1 has {first}: every row must have the same shape"
    return 0, "holds values that are not numbers"


def _is_numeric(value: Any) -> bool:
    try:
        return np.asarray(value).dtype.kind in "biuf"
    except (ValueError, OverflowError):
        return False


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def convert(array: np.ndarray, spec: TensorSpec, where: str) -> np.ndarray:
    """Give a numeric array `spec`'s dtype when no value changes; else a DataError that states the rule."""
    target = np.dtype(spec.dtype)
    kind = array.dtype.kind
    if array.dtype == target:
        return array
    if target.kind == "f" and kind in "iuf":
        outside = np.isfinite(array) & (np.abs(array) > np.finfo(target).max)
        if outside.any():
            index = np.argwhere(outside)[0]
            raise DataError(f"{where}: {array[tuple(index)]} (row {index[0] + 1}) does not fit in {target}")
        return array.astype(target)
    if target.kind in "iu" and kind in "iuf":
        if kind == "f":
            fraction = ~np.isfinite(array) | (array != np.round(array))
            if fraction.any():
                index = np.argwhere(fraction)[0]
                raise DataError(
                    f"{where} must hold {target} values: {array[tuple(index)]} (row {index[0] + 1}) is not a whole "
                    f"number ({RULE})"
                )
        info = np.iinfo(target)
        outside = (array < info.min) | (array > info.max)
        if outside.any():
            index = np.argwhere(outside)[0]
            raise DataError(f"{where}: {array[tuple(index)]} (row {index[0] + 1}) does not fit in {target}")
        return array.astype(target)
    if target.kind == "b" and kind in "iu" and np.isin(array, (0, 1)).all():
        return array.astype(bool)
    raise DataError(f"{where} must hold {target} values, got {array.dtype} ({RULE})")


def label_values(manifest: Manifest, values: list[Any], where: str) -> list[Any]:
    """Label names -> class indices for a bundle that has names; other values are left to `convert`.

    With names, a label is one of them, or a class index 0..N-1 (an integer, or an integer written as text,
    as Hugging Face datasets write labels) when no name looks like a number: names like "1".."5" would make
    an index ambiguous, so those bundles take names only.
    """
    if not manifest.labels:
        return values
    index = {name: i for i, name in enumerate(manifest.labels)}
    numeric_names = any(_integer(name) is not None for name in manifest.labels)
    out = []
    for i, value in enumerate(values):
        as_index = None if numeric_names or isinstance(value, bool) else _integer(value)
        if value is None:
            out.append(None)
        elif isinstance(value, str) and value in index:
            out.append(index[value])
        elif as_index is not None and 0 <= as_index < len(manifest.labels):
            out.append(as_index)
        else:
            known = list(manifest.labels)
            hint = f" or a class index 0..{len(known) - 1}"
            if numeric_names:
                hint = " (names only: they look like numbers)"
            raise DataError(f"{where}: label {value!r} (row {i + 1}) is not one the bundle knows: {known}{hint}")
    return out


def _integer(value: Any) -> int | None:
    """An int, or text holding one ("2", " 2 "); anything else None."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, str) and re.fullmatch(r"\s*[0-9]+\s*", value):
        return int(value)
    return None
