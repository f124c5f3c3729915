"""The bundle manifest: what a bundle holds, written by the exporter and checked by the runtime.

The manifest is the one contract between the exporter and every runtime. Schema versions:

- 1: inputs are arrays, or texts through the bundle's `tokenizer.json` (`max_length` tokens at most).
- 2: adds `preprocessing`, how raw inputs become the arrays the model takes; written only when a bundle has
  it (a version-1 runtime refuses such a bundle rather than feed it unprocessed images). For an image model:

      "preprocessing": {"kind": "image", "input": "pixel_values", "size": [224, 224], "channels": 3,
                        "layout": "NCHW", "color": "RGB", "resize": {"shortest_edge": 256},
                        "center_crop": [224, 224], "resample": "bilinear", "rescale": 0.00392156862745098,
                        "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]}

  A runtime makes `input` (float32 [batch, channels, *size]) from an image in these steps: decode it to 8-bit
  RGB (`color`); resize it with `resample` as `resize` says ({"height", "width"}: to exactly that size;
  {"shortest_edge": e}: the short side to e, the aspect ratio kept; {}: not at all); crop the centre
  `center_crop` ([height, width]) if not null; take the values as float, multiply by `rescale` if not null,
  then per channel subtract `mean` and divide by `std` if not null; lay them out channels first (`layout`).
  The result has shape [channels, *size].
- 3: adds `task`, what kind of model the bundle is when it is not a classifier or regressor; written only when
  a bundle has one (an older runtime refuses it rather than train it as a classifier). A causal language model:

      "task": {"kind": "causal_lm", "tokenizer": "tokenizer.json", "chat_template": "{% for m in messages %}...",
               "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2, "max_length": 256,
               "generation_model": "generation.onnx", "stop_token_ids": [2], "max_positions": 8192}

  Its inputs are `input_ids`, `attention_mask` (and `position_ids` for families that take them), int64[batch,
  sequence]; `labels` is int64[batch, sequence], the token ids themselves, -100 where no loss is taken (padding,
  prompts): the graph shifts them, position t is scored on predicting token t + 1. The loss is `next_token`,
  the mean cross-entropy over the scored tokens. `generation_model` is an inference graph with a KV cache: inputs
  `input_ids`, `attention_mask` (past + new positions), `position_ids`, `past_key_values.N.key/value`
  float32[batch, kv_heads, past, head_dim] (past may be 0), the trainable tensors (by their ONNX names: feed the
  current adapter's values, the initializers hold the exported ones); outputs `logits`, `present.N.key/value`.
  `stop_token_ids` are the ids generation ends on besides eos; `max_positions` is the model's context (its
  position table or rotary range): a prompt and its continuation together never take more positions (null or
  absent: not known, no limit).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepeft.errors import BundleError
from edgepeft.fileio import read_json_object

SCHEMA_VERSION = 4  # the newest this code reads and writes
SCHEMA_VERSIONS = (1, 2, 3, 4)  # every version this code reads
MANIFEST_FILE = "manifest.json"

# Files every bundle holds, by role.
TRAINING_MODEL = "training_model.onnx"
EVAL_MODEL = "eval_model.onnx"
OPTIMIZER_MODEL = "optimizer_model.onnx"
CHECKPOINT = "checkpoint"
INFERENCE_MODEL = "inference.onnx"
ADAPTER_CONFIG = "adapter_config.json"
TOKENIZER = "tokenizer.json"

LOSSES = ("cross_entropy", "mse", "bce", "custom", "next_token")  # next_token: causal LMs only
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


RESAMPLES = ("nearest", "bilinear", "bicubic", "lanczos", "box", "hamming")


def _positive_ints(values: object, count: int) -> bool:
    return (
        isinstance(values, tuple)
        and len(values) == count
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values)
    )


@dataclass(frozen=True)
class ImagePreprocessing:
    """How an image becomes the model's `input` array (the steps are in this module's docstring)."""

    input: str
    size: tuple[int, int]  # [height, width] of the array the model takes
    channels: int = 3
    resize: dict[str, int] = field(default_factory=dict)  # {"height", "width"} | {"shortest_edge"} | {}
    center_crop: tuple[int, int] | None = None
    resample: str = "bilinear"
    rescale: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None
    layout: str = "NCHW"
    color: str = "RGB"
    kind: str = "image"

    def __post_init__(self) -> None:
        def bad(what: str) -> BundleError:
            return BundleError(f"manifest preprocessing: {what}")

        object.__setattr__(self, "size", tuple(self.size) if isinstance(self.size, (list, tuple)) else self.size)
        if self.center_crop is not None and isinstance(self.center_crop, (list, tuple)):
            object.__setattr__(self, "center_crop", tuple(self.center_crop))
        for name in ("mean", "std"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        if self.kind != "image" or self.layout != "NCHW" or self.color != "RGB":
            raise bad(f"kind/layout/color {self.kind!r}/{self.layout!r}/{self.color!r} is not image/NCHW/RGB")
        if not isinstance(self.input, str) or not self.input:
            raise bad("`input` must name the model input")
        if not _positive_ints(self.size, 2) or not _positive_ints((self.channels,), 1):
            raise bad(f"size {self.size!r} and channels {self.channels!r} must be positive integers")
        if not isinstance(self.resize, dict) or set(self.resize) not in (set(), {"height", "width"}, {"shortest_edge"}):
            raise bad(f"resize {self.resize!r} must be {{height, width}}, {{shortest_edge}} or {{}}")
        if not _positive_ints(tuple(self.resize.values()), len(self.resize)):
            raise bad(f"resize {self.resize!r} must hold positive integers")
        if self.center_crop is not None and not _positive_ints(self.center_crop, 2):
            raise bad(f"center_crop {self.center_crop!r} must be [height, width] or null")
        if self.resample not in RESAMPLES:
            raise bad(f"resample {self.resample!r} is not one of {RESAMPLES}")
        if self.rescale is not None and (not isinstance(self.rescale, (int, float)) or not self.rescale > 0):
            raise bad(f"rescale {self.rescale!r} must be a positive number or null")
        for name in ("mean", "std"):
            value = getattr(self, name)
            if value is not None and (
                not isinstance(value, tuple)
                or len(value) != self.channels
                or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)
            ):
                raise bad(f"{name} {value!r} must hold one number per channel ({self.channels}) or be null")
        if self.std is not None and any(v == 0 for v in self.std):
            raise bad("std must not be zero")

    @property
    def shape(self) -> tuple[int, int, int]:
        """The array one image becomes: (channels, height, width)."""
        return (self.channels, *self.size)


CAUSAL_LM = "causal_lm"
GENERATION_MODEL = "generation.onnx"


def _token_id(value: object) -> bool:
    return value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0)


@dataclass(frozen=True)
class CausalLMTask:
    """A causal language model's text contract (schema version 3): tokenizer, chat template, special ids."""

    max_length: int
    tokenizer: str = TOKENIZER
    chat_template: str | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None
    generation_model: str | None = GENERATION_MODEL
    kind: str = CAUSAL_LM
    # the ids generation stops at: eos, the model's other end ids, the chat template's end of turn
    # (empty in a manifest written before the field: eos alone)
    stop_token_ids: tuple[int, ...] = ()
    # the model's context in positions (prompt + continuation); None: not known (a manifest before the field)
    max_positions: int | None = None

    def __post_init__(self) -> None:
        if self.kind != CAUSAL_LM:
            raise BundleError(f"manifest task kind {self.kind!r} is not known (this edgepeft: {CAUSAL_LM!r})")
        if not isinstance(self.max_length, int) or isinstance(self.max_length, bool) or self.max_length <= 1:
            raise BundleError(f"manifest task max_length {self.max_length!r} is not an integer above 1")
        positions = self.max_positions
        if positions is not None and (not isinstance(positions, int) or isinstance(positions, bool) or positions < 2):
            raise BundleError(f"manifest task max_positions {positions!r} is not an integer above 1 or null")
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not _token_id(getattr(self, name)):
                raise BundleError(f"manifest task {name} {getattr(self, name)!r} is not a token id or null")
        if self.pad_token_id is None:
            raise BundleError("manifest task pad_token_id is null: a causal LM bundle needs a padding id")
        stops = self.stop_token_ids
        if not isinstance(stops, (list, tuple)) or not all(_token_id(i) and i is not None for i in stops):
            raise BundleError(f"manifest task stop_token_ids {stops!r} is not a list of token ids")
        object.__setattr__(self, "stop_token_ids", tuple(stops))

    @property
    def stops(self) -> frozenset[int]:
        """The ids generation ends on: `stop_token_ids` and eos."""
        return frozenset(self.stop_token_ids) | ({self.eos_token_id} if self.eos_token_id is not None else set())
        for name in ("tokenizer", "generation_model", "chat_template"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise BundleError(f"manifest task {name} must be a string or null")


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
    preprocessing: ImagePreprocessing | None = None  # how raw inputs become `inputs` (schema version 2)
    task: CausalLMTask | None = None  # a causal LM's text contract (schema version 3); None: a classifier/regressor
    schema_version: int | None = None  # None: the lowest version that holds this manifest
    # adapter tensors the bundle holds fixed (FFA-LoRA's lora_A, in the checkpoint, not trained): saved adapters
    # carry them, and an adapter loaded into the bundle must hold these very values (schema version 4)
    frozen_adapter: tuple[ParamSpec, ...] = ()

    def __post_init__(self) -> None:
        needed = 4 if self.frozen_adapter else 3 if self.task is not None else 2 if self.preprocessing is not None else 1
        if self.schema_version is None:
            object.__setattr__(self, "schema_version", needed)
        if isinstance(self.schema_version, bool) or self.schema_version not in SCHEMA_VERSIONS:
            raise BundleError(
                f"manifest schema version {self.schema_version} is not supported (this edgepeft reads "
                f"{', '.join(map(str, SCHEMA_VERSIONS))}; a newer edgepeft may read it)"
            )
        if self.schema_version < needed:
            field_name = "frozen_adapter" if self.frozen_adapter else "task" if self.task is not None else "preprocessing"
            raise BundleError(f"manifest schema version {self.schema_version} has no `{field_name}` field")
        if self.task is not None:
            if not isinstance(self.task, CausalLMTask):
                raise BundleError("manifest task is malformed")
            if self.loss != "next_token" or self.task.tokenizer not in self.files:
                raise BundleError(f"manifest task {self.task.kind}: the loss must be next_token (is {self.loss!r}) "
                                  f"and {self.task.tokenizer} must be a bundle file")  # fmt: skip
            if self.task.generation_model is not None and self.task.generation_model not in self.files:
                raise BundleError(f"manifest task generation_model {self.task.generation_model} is not a bundle file")
        elif self.loss == "next_token":
            raise BundleError("manifest loss next_token needs a causal_lm `task`")
        if self.preprocessing is not None:
            if not isinstance(self.preprocessing, ImagePreprocessing):
                raise BundleError("manifest preprocessing is malformed")
            spec = next((s for s in self.inputs if s.name == self.preprocessing.input), None)
            if spec is None or spec.dtype != "float32" or tuple(spec.shape[1:]) != self.preprocessing.shape:
                raise BundleError(
                    f"manifest preprocessing makes {self.preprocessing.input!r} of shape "
                    f"{list(self.preprocessing.shape)}, the model input is {spec}"
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
        data = asdict(self)
        for name in ("preprocessing", "task", "frozen_adapter"):  # absent, as the versions before them wrote it
            if not data[name]:
                del data[name]
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

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
                preprocessing=_preprocessing(data.get("preprocessing")),
                task=_task(data.get("task")),
                schema_version=data.get("schema_version", -1),
                frozen_adapter=tuple(ParamSpec(**p) for p in data.get("frozen_adapter", ())),
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


def _preprocessing(data: object) -> ImagePreprocessing | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise BundleError("manifest preprocessing is not an object")
    if data.get("kind") != "image":
        raise BundleError(f"manifest preprocessing kind {data.get('kind')!r} is not known (this edgepeft: 'image')")
    return ImagePreprocessing(**data)


def _task(data: object) -> CausalLMTask | None:
    if data is None:
        return None
    if not isinstance(data, dict):
        raise BundleError("manifest task is not an object")
    if data.get("kind") != CAUSAL_LM:
        raise BundleError(f"manifest task kind {data.get('kind')!r} is not known (this edgepeft: {CAUSAL_LM!r})")
    return CausalLMTask(**data)
