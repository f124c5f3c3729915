"""Adapters in Hugging Face PEFT's layout: `adapter_config.json` + `adapter_model.safetensors`.

Keys are PEFT's (`base_model.model.<module>.lora_A.weight`, ...), so `peft.PeftModel.from_pretrained`
loads an adapter trained on the device, and an adapter trained with PEFT on a host loads into a bundle.
The base model's fingerprint travels in the safetensors metadata, which PEFT ignores. No pickle.

What an adapter computes is decided by its tensors and a few config fields (`SHAPING_FIELDS`: rank,
alpha, targets, ...); the checksum covers those and the fingerprint. The fields PEFT lets a user change
(`base_model_name_or_path`, `inference_mode`, `revision`, ...) are free: an edited adapter still loads.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors.numpy import save

import edgepeft
from edgepeft.errors import AdapterError
from edgepeft.fileio import DirKind, atomic_directory, json_checksum, read_json_object, write_json_atomic
from edgepeft.manifest import ADAPTER_CONFIG, Manifest

logger = logging.getLogger(__name__)

WEIGHTS = "adapter_model.safetensors"
FINGERPRINT_KEY = "edgepeft.base_fingerprint"
CHECKSUM_KEY = "edgepeft.sha256"  # of the tensors' names, shapes and bytes: catches flipped bits
# of the config fields that shape the computation, and the fingerprint (PEFT's JSON file has no room for it).
# (Older adapters carry "edgepeft.config_sha256", of the whole file: no longer checked, since it refused
# adapters edited in free fields; the fields that matter are checked against the bundle instead.)
CONFIG_CHECKSUM_KEY = "edgepeft.config_fields_sha256"
# adapter_config.json fields that change what the tensors compute; the others are free to edit
SHAPING_FIELDS = (
    "peft_type", "r", "lora_alpha", "use_rslora", "use_dora", "target_modules", "exclude_modules",
    "modules_to_save", "bias", "lora_bias", "fan_in_fan_out", "layers_to_transform", "layers_pattern",
    "rank_pattern", "alpha_pattern", "layer_replication", "target_parameters", "trainable_token_indices",
)  # fmt: skip
# fields that must equal the bundle's for the bundle's graph to compute the adapter (r shapes the tensors,
# alpha and use_rslora only scale them: those are rescaled); the others show up as different tensor keys
MUST_MATCH = ("r", "use_dora", "lora_bias", "fan_in_fan_out", "rank_pattern", "alpha_pattern", "layer_replication")
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

    A bundle with a `frozen_adapter` (FFA-LoRA's fixed lora_A) needs those values in `values` too.

    `extra` maps further JSON file names to their contents, written in the same atomic step. `directory` must
    be new, empty, or an adapter (replaced only with `overwrite`), and not inside or holding a `protect` path.

    Raises:
        OutputError: `directory` holds something else, or lies inside a protected bundle.
    """
    missing = [spec.name for spec in (*manifest.trainable, *manifest.frozen_adapter) if spec.name not in values]
    if missing:
        fixed = " (the bundle's fixed lora_A: TrainingSession.frozen_adapter_values())" if any(
            spec.name in missing for spec in manifest.frozen_adapter) else ""
        raise AdapterError(f"an adapter needs values for {missing[:3]}{fixed}")
    tensors = {
        spec.adapter_key: np.ascontiguousarray(values[spec.name], dtype=np.float32)
        for spec in (*manifest.trainable, *manifest.frozen_adapter)
    }
    config = adapter_config(manifest)
    metadata = {
        "format": "pt",
        FINGERPRINT_KEY: manifest.base_fingerprint,
        CHECKSUM_KEY: _checksum(tensors),
        CONFIG_CHECKSUM_KEY: _config_checksum(config, manifest.base_fingerprint),
        "edgepeft.version": edgepeft.__version__,
    }
    with atomic_directory(directory, ADAPTER, overwrite=overwrite, protect=protect) as tmp:
        # both files written the same way, so both get the user's umask (safetensors' writer makes 0600 files)
        (tmp / WEIGHTS).write_bytes(save(tensors, metadata=metadata))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        for name, data in (extra or {}).items():
            write_json_atomic(tmp / name, data)
    logger.info("adapter saved to %s (%d tensors)", directory, len(tensors))
    return Path(directory)


def load_adapter(
    manifest: Manifest, directory: str | os.PathLike, frozen: dict[str, np.ndarray] | None = None
) -> dict[str, np.ndarray]:
    """Read an adapter and check it fits the bundle; returns the trainable values by ONNX parameter name.

    A bundle with a `frozen_adapter` computes only the adapters whose frozen tensors (FFA-LoRA's lora_A) equal
    the bundle's, `frozen` (by ONNX name): an adapter with other values there is refused.

    An adapter whose LoRA scale differs from the bundle's (another `lora_alpha`, or `use_rslora`) is
    rescaled exactly: its lora_B tensors are multiplied by the ratio of the two scales.

    Raises:
        AdapterError: a file is missing or malformed, the adapter was made for a different base model
            (by fingerprint or, for an adapter without one, by base_model_name_or_path), its config asks for
            what the bundle cannot compute (another r, DoRA, ...), or its tensors do not match the bundle's.
    """
    directory = Path(directory)
    config_path = directory / ADAPTER_CONFIG
    config = read_json_object(config_path, AdapterError, "adapter config")
    bundle_config = adapter_config(manifest)
    if config.get("peft_type") != bundle_config.get("peft_type"):
        raise AdapterError(
            f"adapter peft_type {config.get('peft_type')!r} in {config_path} is not the bundle's "
            f"{bundle_config.get('peft_type')!r}"
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
    checksum = metadata.get(CHECKSUM_KEY)
    if checksum is not None and checksum != _checksum(tensors):
        raise AdapterError(f"adapter weights {path} are corrupted (checksum differs)")
    fingerprint = metadata.get(FINGERPRINT_KEY)
    config_checksum = metadata.get(CONFIG_CHECKSUM_KEY)
    if config_checksum is not None and config_checksum != _config_checksum(config, fingerprint):
        raise AdapterError(
            f"adapter config {config_path} is corrupted: a field that shapes the computation "
            f"({', '.join(f for f in SHAPING_FIELDS if f in config)}) or the fingerprint differs from what was saved"
        )
    _check_base(manifest, directory, fingerprint, config.get("base_model_name_or_path"))
    _check_config(bundle_config, config, config_path)
    expected = {spec.adapter_key: spec for spec in manifest.trainable}
    fixed = {spec.adapter_key: spec for spec in manifest.frozen_adapter}
    missing, unexpected = (set(expected) | set(fixed)) - set(tensors), set(tensors) - set(expected) - set(fixed)
    if missing or unexpected:
        raise AdapterError(
            f"adapter {directory} does not fit this bundle: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]} (adapter target_modules {config.get('target_modules')!r}, "
            f"modules_to_save {config.get('modules_to_save')!r}, bias {config.get('bias')!r}; the bundle's "
            f"{bundle_config.get('target_modules')!r}, {bundle_config.get('modules_to_save')!r}, "
            f"{bundle_config.get('bias')!r})"
        )
    ratio = lora_scale(config, config_path) / lora_scale(bundle_config, config_path)
    if ratio != 1.0:
        logger.info("adapter %s: LoRA scale %.6g times the bundle's, lora_B rescaled", directory, ratio)
    values = {}
    for key, spec in expected.items():
        array = tensors[key]
        if tuple(array.shape) != spec.shape:
            raise AdapterError(f"adapter tensor {key} has shape {tuple(array.shape)}, the bundle expects {spec.shape}")
        if array.dtype.kind != "f":
            raise AdapterError(f"adapter tensor {key} has dtype {array.dtype}, expected a float type")
        if not np.isfinite(array).all():
            raise AdapterError(f"adapter tensor {key} holds NaN or infinite values")
        array = array.astype(np.float32)
        if ratio != 1.0 and _is_lora_b(key):
            array = (array * np.float32(ratio)).astype(np.float32)
        values[spec.name] = array
    for key, spec in fixed.items():
        if frozen is None or spec.name not in frozen:
            raise AdapterError(f"the bundle holds {spec.name} fixed: pass its values to check adapter {directory}")
        theirs = tensors[key].astype(np.float32)
        if tuple(theirs.shape) != spec.shape or not np.array_equal(theirs, frozen[spec.name]):
            raise AdapterError(
                f"adapter tensor {key} differs from this bundle's fixed {spec.name} (the bundle trains lora_B only, "
                f"with lora_A frozen at export: FFA-LoRA); export a bundle with freeze_a=False to use this adapter"
            )
    return values


def adapter_config(manifest: Manifest) -> dict:
    """The adapter_config.json of adapters saved from this bundle, as PEFT writes a saved adapter's.

    Bundles exported before base names were portable hold a path here: only its last part is written.
    """
    config = dict(manifest.peft_config)
    config["inference_mode"] = True
    config["base_model_name_or_path"] = portable_base_name(config.get("base_model_name_or_path"))
    return config


def lora_scale(config: dict, path: Path) -> float:
    """PEFT's LoRA scale: lora_alpha / r, or lora_alpha / sqrt(r) with use_rslora."""
    r, alpha = config.get("r"), config.get("lora_alpha")
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"adapter config {path}: r must be a positive integer, got {r!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise AdapterError(f"adapter config {path}: lora_alpha must be a positive number, got {alpha!r}")
    return alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r


def portable_base_name(name: object) -> str | None:
    """A base model's name that means the same on another machine: a hub name as is, a path's last part."""
    if not isinstance(name, str) or not name.strip():
        return None
    name = name.strip().rstrip("/\\")
    if os.path.isabs(name) or name.startswith(".") or "\\" in name or name.count("/") > 1:
        return Path(name.replace("\\", "/")).name or None
    return name


def _aliases(name: str) -> set[str]:
    """Spellings one base can go by: `org/model`, `model`, a path's last one or two parts (case-insensitive)."""
    parts = [p for p in name.replace("\\", "/").lower().split("/") if p]
    return {"/".join(parts[-2:]), parts[-1]} if parts else set()


def _check_base(manifest: Manifest, directory: Path, fingerprint: str | None, name: object) -> None:
    """The adapter's base must be the bundle's: by fingerprint when it has one, else by name when both are known."""
    if fingerprint is not None:
        if fingerprint != manifest.base_fingerprint:
            raise AdapterError(
                f"adapter {directory} was made for a different base model "
                f"(fingerprint {fingerprint[:12]}..., this bundle's is {manifest.base_fingerprint[:12]}...)"
            )
        return  # the fingerprint decides: its base_model_name_or_path is free to edit
    if not isinstance(name, str) or not name.strip() or not manifest.base_names:
        return
    known = set().union(*(_aliases(n) for n in manifest.base_names))
    if not _aliases(name) & known:
        raise AdapterError(
            f"adapter {directory} was made for base model {name!r} (base_model_name_or_path in "
            f"{directory / ADAPTER_CONFIG}); this bundle's base is {manifest.base_names[0]!r}. If it is the same "
            f"model, set base_model_name_or_path to {manifest.base_names[0]!r} in that file"
        )


def _check_config(bundle: dict, config: dict, path: Path) -> None:
    """Refuse a config the bundle's graph cannot compute (scales are checked, and rescaled, by `lora_scale`)."""
    for field in MUST_MATCH:
        ours, theirs = bundle.get(field), config.get(field)
        if _normalised(theirs) != _normalised(ours):
            raise AdapterError(
                f"adapter config {path}: {field} is {theirs!r}, this bundle computes {field}={ours!r} "
                f"(export a bundle with the adapter's settings to use it)"
            )


def _normalised(value: object) -> object:
    """Empty and false values mean PEFT's default; lists compare as sets."""
    if not value:
        return None
    if isinstance(value, list):
        return sorted(map(str, value))
    return value


def _is_lora_b(key: str) -> bool:
    return ".lora_B." in key or key.endswith(".lora_B") or ".lora_embedding_B" in key


def _config_checksum(config: dict, fingerprint: str | None) -> str:
    """sha256 of the config fields that shape the computation, with the base fingerprint."""
    return json_checksum({"fields": {f: config.get(f) for f in SHAPING_FIELDS}, "fingerprint": fingerprint})


def _checksum(tensors: dict[str, np.ndarray]) -> str:
    digest = hashlib.sha256()
    for key in sorted(tensors):
        array = np.ascontiguousarray(tensors[key])
        digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
