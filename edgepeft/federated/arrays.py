"""Adapter values (by ONNX parameter name) to and from Flower's ArrayRecord, checked against the bundle."""

from __future__ import annotations

import numpy as np
from flwr.app import Array, ArrayRecord

from edgepeft.errors import InputError
from edgepeft.manifest import Manifest


def to_record(values: dict[str, np.ndarray]) -> ArrayRecord:
    """An ArrayRecord of float32 numpy arrays, one per trainable parameter, in name order."""
    return ArrayRecord({name: Array(np.ascontiguousarray(values[name], dtype=np.float32)) for name in sorted(values)})


def from_record(record: ArrayRecord, manifest: Manifest) -> dict[str, np.ndarray]:
    """The trainable values in `record`; it must hold exactly the bundle's trainable tensors, finite."""
    expected = {spec.name: spec.shape for spec in manifest.trainable}
    if set(record.keys()) != set(expected):
        missing, extra = sorted(set(expected) - set(record.keys())), sorted(set(record.keys()) - set(expected))
        raise InputError(f"the adapter in the message does not fit the bundle: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")  # fmt: skip
    values = {}
    for name, shape in expected.items():
        array = record[name].numpy().astype(np.float32)
        if tuple(array.shape) != shape or not np.isfinite(array).all():
            raise InputError(f"adapter tensor {name} in the message has shape {array.shape} (expected {shape}) "
                             "or non-finite values")  # fmt: skip
        values[name] = array
    return values


def ordered(values: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The legacy (NumPy list) layout: arrays in name order."""
    return [np.ascontiguousarray(values[name], dtype=np.float32) for name in sorted(values)]


def from_ordered(arrays: list[np.ndarray], manifest: Manifest) -> dict[str, np.ndarray]:
    names = sorted(spec.name for spec in manifest.trainable)
    if len(arrays) != len(names):
        raise InputError(f"expected {len(names)} adapter arrays, got {len(arrays)}")
    return from_record(to_record(dict(zip(names, arrays))), manifest)


def nbytes(values: dict[str, np.ndarray]) -> int:
    return int(sum(np.asarray(v).nbytes for v in values.values()))
