"""Adapters in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`, ...), so `peft.PeftModel.from_pretrained`
loads an adapter trained on the device, and an adapter trained with PEFT on a host loads into a bundle.
The base model's fingerprint travels in the safetensors metadata, which PEFT ignores. No pickle.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save_file

import edgepeft
from edgepeft.errors import AdapterError
from edgepeft.fileio import DirKind, atomic_directory, json_checksum, read_json_object, write_json_atomic
from edgepeft.manifest import ADAPTER_CONFIG, Manifest

logger = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
FINGERPRINT_KEY = "edgepeft.base_fingerprint"
CHECKSUM_KEY = "edgepeft.sha256"  # of the tensors' names, shapes and bytes: catches flipped bits
CONFIG_CHECKSUM_KEY = "edgepeft.config_sha256"  # of adapter_config.json's content (PEFT's file has no room)
ADAPTER = DirKind("an adapter", (ADAPTER_CONFIG, WEIGHTS))  # an adapter directory is replaced only by an adapter


def save_adapter(
    manifest: Manifest,
    values: dict[str, np.ndarray],
    directory: str | os.PathLike,
    overwrite: bool = True,
    extra: dict[str, dict] | None = None,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write trainable `values` (by ONNX name) as a PEFT adapter directory, all at once.

    `extra` maps further JSON file names to their contents, written in the same atomic step. `directory` must
    be new, empty, or an adapter (replaced only with `overwrite`), and not inside or holding a `protect` path.

    Raises:
        OutputError: `directory` holds something else, or lies inside a protected bundle.
    """
    tensors = {
        spec.adapter_key: np.ascontiguousarray(values[spec.name], dtype=np.float32) for spec in manifest.trainable
    }
    metadata = {
        "format": "pt",
        FINGERPRINT_KEY: manifest.base_fingerprint,
        CHECKSUM_KEY: _checksum(tensors),
        CONFIG_CHECKSUM_KEY: json_checksum(manifest.peft_config),
        "edgepeft.version": edgepeft.__version__,
    }
    with atomic_directory(directory, ADAPTER, overwrite=overwrite, protect=protect) as tmp:
        save_file(tensors, str(tmp / WEIGHTS), metadata=metadata)
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(manifest.peft_config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra or {}).items():
            write_json_atomic(tmp / name, data)
    logger.info("adapter saved to %s (%d tensors)", directory, len(tensors))
    return Path(directory)


def load_adapter(manifest: Manifest, directory: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read an adapter and check it fits the bundle; returns values by ONNX parameter name.

    Raises:
        AdapterError: a file is missing or malformed, the adapter was made for a different base model,
            or its tensors do not match the bundle's trainable parameters.
    """
    directory = Path(directory)
    config = read_json_object(directory / ADAPTER_CONFIG, AdapterError, "adapter config")
    if config.get("peft_type") != manifest.peft_config.get("peft_type"):
        raise AdapterError(
            f"adapter peft_type {config.get('peft_type')!r} is not the bundle's {manifest.peft_config.get('peft_type')!r}"
        )
    path = directory / WEIGHTS
    if not path.is_file():
        raise AdapterError(f"adapter weights {path} are missing")
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}
    except (SafetensorError, OSError, ValueError, TypeError) as e:
        raise AdapterError(f"adapter weights {path} cannot be read: {e}") from None
    fingerprint = metadata.get(FINGERPRINT_KEY)
    if fingerprint is not None and fingerprint != manifest.base_fingerprint:
        raise AdapterError(
            f"adapter {directory} was made for a different base model "
            f"(fingerprint {fingerprint[:12]}..., this bundle's is {manifest.base_fingerprint[:12]}...)"
        )
    checksum = metadata.get(CHECKSUM_KEY)
    if checksum is not None and checksum != _checksum(tensors):
        raise AdapterError(f"adapter weights {path} are corrupted (checksum differs)")
    config_checksum = metadata.get(CONFIG_CHECKSUM_KEY)
    if config_checksum is not None and config_checksum != json_checksum(config):
        raise AdapterError(f"adapter config {directory / ADAPTER_CONFIG} is corrupted (checksum differs)")
    expected = {spec.adapter_key: spec for spec in manifest.trainable}
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise AdapterError(
            f"adapter {directory} does not fit this bundle: missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )
    values = {}
    for key, spec in expected.items():
        array = tensors[key]
        if tuple(array.shape) != spec.shape:
            raise AdapterError(f"adapter tensor {key} has shape {tuple(array.shape)}, the bundle expects {spec.shape}")
        if array.dtype.kind != "f":
            raise AdapterError(f"adapter tensor {key} has dtype {array.dtype}, expected a float type")
        if not np.isfinite(array).all():
            raise AdapterError(f"adapter tensor {key} holds NaN or infinite values")
        values[spec.name] = array.astype(np.float32)
    return values


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
