"""What a transformers model directory holds: a text or an image classifier, its LoRA targets, its preprocessing.

One small table per question, keyed by the config's `model_type`; families not listed get the BERT-like default.
"""

from __future__ import annotations

import inspect
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from edgepeft import manifest as mf
from edgepeft.errors import ExportError

logger = logging.getLogger(__name__)

TEXT, IMAGE = "text", "image"
TASKS = {TEXT: "text-classification", IMAGE: "image-classification"}  # optimum's task names
# LoRA targets when the caller names none, by model_type (a tuple: module names; a string: one regex).
# Each entry is proven by tests/test_hf_families.py; add a family here together with its test there.
DEFAULT_TARGETS: dict[str, tuple[str, ...] | str] = {
    "distilbert": ("q_lin", "v_lin"),
    "deberta-v2": ("query_proj", "value_proj"),
    "vit": ("query", "value"),
    "resnet": r".*\.convolution",  # every Conv2d (stem, blocks, shortcuts); its BatchNorms stay frozen
}
BERT_LIKE_TARGETS = ("query", "value")  # BERT, RoBERTa, XLM-R, ALBERT, ELECTRA, MobileBERT, MiniLM, ...
# the head of transformers' image classifiers (ViT, ResNet, ...), trained in full; for text, PEFT's SEQ_CLS
# task adds the heads (`classifier`, `score`) itself
IMAGE_HEAD = "classifier"
_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}  # PIL's codes


@dataclass(frozen=True)
class ModelKind:
    """What the directory's model is: its modality, its config's model_type, and its preprocessing (images)."""

    modality: str
    model_type: str
    preprocessing: mf.ImagePreprocessing | None = None

    @property
    def task(self) -> str:
        return TASKS[self.modality]


def model_kind(source: Path) -> ModelKind:
    """Tell a text from an image classifier by config.json (architectures, model_type) and the files beside it."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES,
        MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES,
    )

    try:
        config = json.loads((source / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ExportError(f"{source / 'config.json'} cannot be read: {e}") from None
    if not isinstance(config, dict):
        raise ExportError(f"{source / 'config.json'} is not a JSON object")
    model_type = str(config.get("model_type", ""))
    architectures = [str(a) for a in config.get("architectures") or []]
    image_ok = model_type in MODEL_FOR_IMAGE_CLASSIFICATION_MAPPING_NAMES
    text_ok = model_type in MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES
    has_processor = (source / "preprocessor_config.json").is_file()
    if any(a.endswith("ForImageClassification") for a in architectures) and image_ok:
        modality = IMAGE
    elif any(a.endswith("ForSequenceClassification") for a in architectures) and text_ok:
        modality = TEXT
    elif image_ok and (not text_ok or has_processor):
        modality = IMAGE
    elif text_ok:
        modality = TEXT
    else:
        raise ExportError(
            f"{source}: model_type {model_type!r} has no sequence or image classifier in transformers; "
            f"export a text classifier (BERT, RoBERTa, DeBERTa-v2, ...) or an image classifier (ViT, ResNet, ...)"
        )
    if modality == IMAGE and not has_processor:
        raise ExportError(
            f"{source} holds an image model but no preprocessor_config.json: save its image processor there "
            f"(`AutoImageProcessor.from_pretrained(...).save_pretrained(dir)`): the device needs its size, mean, std"
        )
    preprocessing = image_preprocessing(source, config) if modality == IMAGE else None
    return ModelKind(modality, model_type, preprocessing)


def default_targets(model_type: str) -> tuple[str, ...] | str:
    return DEFAULT_TARGETS.get(model_type, BERT_LIKE_TARGETS)


def image_preprocessing(source: Path, config: dict) -> mf.ImagePreprocessing:
    """The image processor's steps as the manifest states them, from preprocessor_config.json."""
    from transformers import AutoImageProcessor

    where = f"{source / 'preprocessor_config.json'}"
    try:
        processor = AutoImageProcessor.from_pretrained(source)
    except Exception as e:  # transformers raises many kinds on a bad processor config
        raise ExportError(f"{where} cannot be loaded as an image processor: {e}") from None
    size = dict(getattr(processor, "size", None) or {})
    resize: dict[str, int] = {}
    crop: tuple[int, int] | None = None
    if getattr(processor, "do_resize", False) and size:
        if "height" in size and "width" in size:
            resize = {"height": int(size["height"]), "width": int(size["width"])}
        elif "shortest_edge" in size:
            edge = int(size["shortest_edge"])
            resize = {"shortest_edge": edge}
            if type(processor).__name__.startswith("ConvNext"):  # ConvNeXt's (and ResNet's) own rule
                if edge < 384:  # resize the short side to edge / crop_pct, then crop edge x edge
                    resize, crop = {"shortest_edge": int(edge / processor.crop_pct)}, (edge, edge)
                else:  # warp straight to edge x edge
                    resize = {"height": edge, "width": edge}
        else:
            raise ExportError(f"{where}: image size {size} is not understood (height/width or shortest_edge)")
    crop_size = getattr(processor, "crop_size", None)
    if getattr(processor, "do_center_crop", False) and crop_size:
        crop = (int(crop_size["height"]), int(crop_size["width"]))
    if crop is not None:
        final = crop
    elif "height" in resize:
        final = (resize["height"], resize["width"])
    elif not resize and isinstance(config.get("image_size"), int):  # no resizing: images come at the model's size
        final = (config["image_size"], config["image_size"])
    else:
        raise ExportError(f"{where}: the model's input size cannot be told (no fixed size, no center crop)")
    channels = int(config.get("num_channels", 3))
    mean = std = None
    if getattr(processor, "do_normalize", False):
        mean, std = _per_channel(processor.image_mean, channels), _per_channel(processor.image_std, channels)
    rescale = float(processor.rescale_factor) if getattr(processor, "do_rescale", False) else None
    return mf.ImagePreprocessing(
        input="pixel_values",
        size=final,
        channels=channels,
        resize=resize,
        center_crop=crop,
        resample=_RESAMPLE.get(int(getattr(processor, "resample", 2)), "bilinear"),
        rescale=rescale,
        mean=mean,
        std=std,
    )


def _per_channel(values: object, channels: int) -> tuple[float, ...]:
    values = [float(values)] * channels if isinstance(values, (int, float)) else [float(v) for v in values]
    if len(values) != channels:
        raise ExportError(f"image mean/std {values} do not have one value per channel ({channels})")
    return tuple(values)


def model_inputs(module: nn.Module, onnx_names: list[str], available: dict) -> dict:
    """The tokenizer's outputs the model takes: those named by optimum's ONNX config and the model's forward."""
    accepted = set(inspect.signature(module.forward).parameters)
    unknown = [name for name in onnx_names if name not in accepted]
    if unknown:
        raise ExportError(f"optimum's ONNX inputs {unknown} are not arguments of {type(module).__name__}.forward")
    dropped = sorted(set(available) - set(onnx_names))
    if dropped:
        logger.info("tokenizer outputs %s are not inputs of %s: not used", dropped, type(module).__name__)
    return {name: available[name] for name in onnx_names if name in available}


def onnx_input_names(module: nn.Module, task: str) -> list[str]:
    """The inputs optimum's ONNX config exports for this model and task, in its order."""
    import optimum.exporters.onnx.convert  # noqa: F401  (registers optimum's ONNX configs)
    from optimum.exporters.tasks import TasksManager

    try:
        constructor = TasksManager.get_exporter_config_constructor(
            exporter="onnx", model=module, task=task, library_name="transformers"
        )
    except (KeyError, ValueError) as e:
        raise ExportError(f"optimum cannot export {type(module).__name__} for task {task!r}: {e}") from None
    return list(constructor(module.config).inputs)


def fix_image_input_(model, preprocessing: mf.ImagePreprocessing) -> None:
    """Give the image input its fixed (channels, height, width): optimum leaves them dynamic."""
    value = next((v for v in model.graph.input if v.name == preprocessing.input), None)
    if value is None:
        raise ExportError(f"the exported graph has no input {preprocessing.input!r}")
    dims = value.type.tensor_type.shape.dim
    if len(dims) != 4:
        raise ExportError(f"image input {preprocessing.input!r} has {len(dims)} dimensions, expected 4 (NCHW)")
    for dim, size in zip(list(dims)[1:], preprocessing.shape):
        dim.Clear()
        dim.dim_value = size


# model types whose position ids start after the padding index (RoBERTa's `create_position_ids_from_input_ids`)
_OFFSET_POSITIONS = ("roberta", "xlm-roberta", "camembert", "longformer", "mpnet", "data2vec-text", "ibert")


def text_positions(config) -> int | None:
    """The longest token sequence a text model's absolute position embeddings hold (None: no such limit)."""
    positions = getattr(config, "max_position_embeddings", None)
    if not isinstance(positions, int) or getattr(config, "position_biased_input", True) is False:
        return None  # relative positions only (DeBERTa-v2's default)
    if getattr(config, "model_type", None) in _OFFSET_POSITIONS:
        positions -= (getattr(config, "pad_token_id", None) or 0) + 1
    return positions
