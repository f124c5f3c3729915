"""The bundle manifest: what a bundle holds, written by the exporter and checked by the runtime."""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepeft.errors import BundleError
from edgepeft.fileio import read_json_object

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"

# Files every bundle holds, by role.
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
INFERENCE_MODEL = "inference.onnx"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER = "tokenizer.json"

LOSSES = ("cross_entropy", "mse", "bce", "custom")
OPTIMIZERS = ("adamw", "sgd")
QUANTIZATIONS = ("int8", "fp32")
DTYPES = ("float32", "int64", "int32", "bool")


def _is_sha256(value: object) -> bool:
    return isinstance(value, str) and len(value) == 64 and all(c in "0123456789abcdef" for c in value)


@dataclass(frozen=True)
class TensorSpec:
    """A named tensor: dtype and shape, with a string for each dynamic dimension (e.g. "batch")."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not all(isinstance(d, (int, str)) for d in self.shape):
            raise BundleError(f"tensor spec {self.name!r} has a malformed name or shape")
        if self.dtype not in DTYPES:
            raise BundleError(f"tensor {self.name!r}: dtype {self.dtype!r} is not one of {DTYPES}")
        object.__setattr__(self, "shape", tuple(self.shape))


@dataclass(frozen=True)
class ParamSpec:
    """A trainable parameter: its name in the ONNX graph, its key in a PEFT adapter, its shape."""

    name: str
    adapter_key: str
    shape: tuple[int, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not isinstance(self.adapter_key, str):
            raise BundleError(f"trainable parameter {self.name!r} has a malformed name or adapter key")
        object.__setattr__(self, "shape", tuple(int(d) for d in self.shape))


@dataclass(frozen=True)
class Manifest:
    """Everything the device needs to know about a bundle, stored as `manifest.json`."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    label: TensorSpec
    loss: str
    optimizer: str
    quantization: str
    trainable: tuple[ParamSpec, ...]
    base_fingerprint: str
    files: dict[str, str]
    peft_config: dict[str, Any]
    labels: tuple[str, ...] = ()
    max_length: int | None = None
    base_names: tuple[str, ...] = ()  # what the base model is called (hub name, directory name), if known
    versions: dict[str, str] = field(default_factory=dict)
    stats: dict[str, Any] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def __post_init__(self) -> None:
        if self.schema_version != SCHEMA_VERSION:
            raise BundleError(
                f"manifest schema version {self.schema_version} is not supported (expected {SCHEMA_VERSION})"
            )
        for name, value, allowed in (
            ("loss", self.loss, LOSSES),
            ("optimizer", self.optimizer, OPTIMIZERS),
            ("quantization", self.quantization, QUANTIZATIONS),
        ):
            if value not in allowed:
                raise BundleError(f"manifest {name} {value!r} is not one of {allowed}")
        if not self.inputs or not self.outputs:
            raise BundleError("manifest lists no inputs or no outputs")
        if not self.trainable:
            raise BundleError("manifest lists no trainable parameters")
        if (
            self.loss == "cross_entropy"
            and self.labels
            and self.outputs[0].shape[-1] not in (len(self.labels), "classes")
        ):
            raise BundleError(
                f"manifest has {len(self.labels)} labels but the output has shape {self.outputs[0].shape}"
            )
        for rel, digest in self.files.items():
            if not isinstance(rel, str) or os.path.isabs(rel) or ".." in Path(rel).parts:
                raise BundleError(f"manifest file entry {rel!r} points outside the bundle")
            if not _is_sha256(digest):
                raise BundleError(f"manifest file entry {rel!r} has no sha256 digest")
        if not _is_sha256(self.base_fingerprint):
            raise BundleError("manifest base_fingerprint is not a sha256 digest")
        if not all(isinstance(label, str) for label in self.labels):
            raise BundleError("manifest labels must be strings")
        if not all(isinstance(name, str) and name for name in self.base_names):
            raise BundleError("manifest base_names must be non-empty strings")
        if self.max_length is not None and (not isinstance(self.max_length, int) or self.max_length <= 0):
            raise BundleError(f"manifest max_length {self.max_length!r} is not a positive integer")

    @property
    def output(self) -> TensorSpec:
        """The model output the loss is computed on (logits for a classifier)."""
        return self.outputs[0]

    @property
    def is_classifier(self) -> bool:
        return self.loss == "cross_entropy"

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2, sort_keys=True) + "\n"

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_FILE
        path.write_text(self.to_json(), encoding="utf-8")
        return path

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        try:
            return cls(
                inputs=tuple(TensorSpec(**t) for t in data["inputs"]),
                outputs=tuple(TensorSpec(**t) for t in data["outputs"]),
                label=TensorSpec(**data["label"]),
                loss=data["loss"],
                optimizer=data["optimizer"],
                quantization=data["quantization"],
                trainable=tuple(ParamSpec(**p) for p in data["trainable"]),
                base_fingerprint=data["base_fingerprint"],
                files=dict(data["files"]),
                peft_config=dict(data["peft_config"]),
                labels=tuple(data.get("labels", ())),
                max_length=data.get("max_length"),
                base_names=tuple(data.get("base_names", ())),
                versions=dict(data.get("versions", {})),
                stats=dict(data.get("stats", {})),
                schema_version=data.get("schema_version", -1),
            )
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise BundleError(f"manifest is malformed: {type(e).__name__}: {e}") from None

    @classmethod
    def load(cls, directory: str | os.PathLike) -> Manifest:
        """Read and validate `manifest.json` from a bundle directory."""
        path = Path(directory) / MANIFEST_FILE
        if not path.is_file():
            raise BundleError(f"{directory} is not a bundle: {MANIFEST_FILE} is missing")
        return cls.from_dict(read_json_object(path, BundleError, "manifest"))
