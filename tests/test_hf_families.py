"""The Hugging Face families a user brings, each from a tiny random config, fresh and perturbed (issue 11 point 2).

Each case: the directory exports through the same `export(model_dir, ...)` call (LoRA on the family's default
targets, a new head of 3 classes replacing the directory's), trains a few steps on the device (the loss falls),
its device-trained adapter loads into `peft.PeftModel.from_pretrained(AutoModelFor...(dir), adapter)` with the
same logits, and a host PEFT adapter (random, non-zero LoRA) loads into the bundle with the same logits.
"""

from __future__ import annotations

import json

import numpy as np
import peft
import pytest
import torch
from tiny_hf import IMAGE_FAMILIES, IMAGE_SIZE, TEXT_FAMILIES, TEXTS, WITH_TOKEN_TYPES, config, make_dir

from edgepeft import manifest as mf
from edgepeft.errors import BundleError, ExportError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.export.transformers_models import default_targets
from edgepeft.runtime import TrainConfig, TrainingSession

LABELS = ("a", "b", "c")
FAMILIES = [*TEXT_FAMILIES, *IMAGE_FAMILIES]
FP32_ATOL = 1e-4
# int8 backbone against the fp32 host: |logit difference| within this share of the largest |host logit|
# (measured at most 5.2%, ELECTRA fresh; most 0.3-2%: per-channel int8 rows of only 32 weights are coarse)
INT8_RTOL = 0.08
# the host adapter's random lora_B, scaled so LoRA moves the logits well past FP32_ATOL: in these tiny text
# models the attention output projections (std 0.02) damp what LoRA on query/value changes (MobileBERT most)
TEXT_LORA_B_SCALE = 10.0
TAKES_TOKEN_TYPES = {"bert", "albert", "electra", "mobilebert"}  # optimum's ONNX inputs for these
# (family, weights, quantization): int8 fresh and perturbed, fp32 perturbed
CASES = [(f, w, "int8") for f in FAMILIES for w in ("fresh", "perturbed")]
CASES += [(f, "perturbed", "fp32") for f in FAMILIES]


def _features(session: TrainingSession) -> dict[str, np.ndarray]:
    if session.bundle.has_tokenizer:
        return session.encode(TEXTS)
    rng = np.random.default_rng(0)
    return {"pixel_values": rng.standard_normal((len(TEXTS), 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)}


def _host_base(directory, family: str) -> torch.nn.Module:
    """The directory's model as a host loads it for these labels (the head is then the adapter's)."""
    from transformers import AutoModelForImageClassification, AutoModelForSequenceClassification

    from transformers.utils import logging as hf_logging

    auto = AutoModelForImageClassification if family in IMAGE_FAMILIES else AutoModelForSequenceClassification
    hf_logging.set_verbosity_error()  # "newly initialized because the shapes did not match": the new head
    return auto.from_pretrained(directory, num_labels=len(LABELS), ignore_mismatched_sizes=True).eval()


def _logits(model: torch.nn.Module, features: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(**{k: torch.from_numpy(v) for k, v in features.items()}).logits.numpy()


def _assert_close(device: np.ndarray, host: np.ndarray, quantization: str) -> None:
    error = float(np.abs(device - host).max())
    if quantization == "fp32":
        assert error <= FP32_ATOL, f"fp32 bundle {error:.2e} from PEFT's logits"
    else:
        assert error <= INT8_RTOL * float(np.abs(host).max()), f"int8 {error:.2e}, largest |logit| {np.abs(host).max()}"


@pytest.mark.parametrize(("family", "weights", "quantization"), CASES, ids=["-".join(c) for c in CASES])
def test_family_exports_trains_and_round_trips_through_peft(family, weights, quantization, tmp_path):
    directory = make_dir(family, tmp_path / family, perturbed=weights == "perturbed", num_labels=5)
    bundle = tmp_path / "bundle"
    options = ExportOptions(labels=LABELS, quantization=quantization, max_length=16)
    manifest = export(directory, bundle, options=options)  # no LoRA spec: the family's default targets

    targets = default_targets(config(family).model_type)
    assert manifest.peft_config["target_modules"] in (targets, sorted(targets)), manifest.peft_config
    if family in IMAGE_FAMILIES:
        assert [(s.name, s.shape) for s in manifest.inputs] == [("pixel_values", ("batch_size", 3, 32, 32))]
        assert manifest.preprocessing is not None and manifest.schema_version == 2
        assert manifest.peft_config["modules_to_save"] == ["classifier"]
    else:
        expected = ["input_ids", "attention_mask"] + (["token_type_ids"] if family in TAKES_TOKEN_TYPES else [])
        assert [s.name for s in manifest.inputs] == expected
        assert manifest.preprocessing is None and manifest.schema_version == 1
    assert manifest.output.shape[-1] == len(LABELS)

    session = TrainingSession(bundle)
    features = _features(session)
    data = session.dataset(features, np.arange(len(TEXTS)) % len(LABELS))
    before = session.evaluate(data).loss
    session.train(data, TrainConfig(epochs=10, batch_size=len(TEXTS), learning_rate=1e-2, shuffle=False))
    assert session.evaluate(data).loss < before
    values = session.trainable_values()
    assert max(float(np.abs(v).max()) for n, v in values.items() if ".lora_B." in n) > 0

    # the device's adapter in PEFT on the host
    session.save_adapter(tmp_path / "device-adapter")
    host = peft.PeftModel.from_pretrained(_host_base(directory, family), tmp_path / "device-adapter")
    _assert_close(session.predict(features).outputs, _logits(host, features), quantization)

    # a host PEFT adapter (non-zero LoRA, another head) in the bundle
    torch.manual_seed(1)
    lora_config = peft.LoraConfig.from_pretrained(str(bundle))  # the bundle's r, alpha, targets and head
    lora_config.init_lora_weights = False
    lora_config.inference_mode = False
    host = peft.get_peft_model(_host_base(directory, family), lora_config)
    with torch.no_grad():  # a head that reads the features sharply, so that LoRA's change of them shows
        for name, parameter in host.named_parameters():
            if ".modules_to_save." in name:
                parameter.mul_(30.0)
            elif ".lora_B." in name and family not in IMAGE_FAMILIES:
                parameter.mul_(TEXT_LORA_B_SCALE)
    host.save_pretrained(tmp_path / "host-adapter")
    expected = _logits(host, features)
    session.load_adapter(tmp_path / "host-adapter")
    _assert_close(session.predict(features).outputs, expected, quantization)
    if quantization == "fp32":  # LoRA matters: with its matrices zeroed the bundle is far from the host
        loaded = session.trainable_values()
        session.set_trainable({n: np.zeros_like(v) if ".lora_" in n else v for n, v in loaded.items()})
        assert np.abs(session.predict(features).outputs - expected).max() > 10 * FP32_ATOL


@pytest.mark.parametrize("family", ["distilbert", "deberta-v2"])
def test_a_tokenizer_output_the_model_does_not_take_is_left_out(family, tmp_path):
    """DistilBERT's forward has no token_type_ids (old code: TypeError); DeBERTa-v2 (type_vocab_size 0) ignores it."""
    directory = make_dir(family, tmp_path / family, perturbed=True, input_names=WITH_TOKEN_TYPES)
    manifest = export(directory, tmp_path / "b", options=ExportOptions(labels=LABELS, max_length=16))
    assert [s.name for s in manifest.inputs] == ["input_ids", "attention_mask"]
    session = TrainingSession(tmp_path / "b")
    assert set(session.encode(TEXTS)) == {"input_ids", "attention_mask"}
    assert session.predict(TEXTS).outputs.shape == (len(TEXTS), len(LABELS))


def test_given_targets_replace_the_familys_default(tmp_path):
    directory = make_dir("vit", tmp_path / "vit", perturbed=True)
    lora = LoraSpec(target_modules=("query", "key", "value"))
    manifest = export(directory, tmp_path / "b", lora=lora, options=ExportOptions(labels=LABELS))
    assert sorted(manifest.peft_config["target_modules"]) == ["key", "query", "value"]
    assert any(".key.lora_A." in p.name for p in manifest.trainable)


def _preprocess_from_manifest(image, p: mf.ImagePreprocessing) -> np.ndarray:
    """What a second runtime does, from the manifest alone (PIL for decoding and resizing)."""
    from PIL import Image

    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[p.resample]
    image = image.convert(p.color)
    if "shortest_edge" in p.resize:
        width, height = image.size
        short, long = sorted((width, height))
        edge = p.resize["shortest_edge"]
        size = (edge, int(edge * long / short)) if width <= height else (int(edge * long / short), edge)
        image = image.resize(size, resample)
    elif p.resize:
        image = image.resize((p.resize["width"], p.resize["height"]), resample)
    array = np.asarray(image, dtype=np.float32)
    if p.center_crop is not None:
        top, left = (array.shape[0] - p.center_crop[0]) // 2, (array.shape[1] - p.center_crop[1]) // 2
        array = array[top : top + p.center_crop[0], left : left + p.center_crop[1]]
    if p.rescale is not None:
        array = array * np.float32(p.rescale)
    if p.mean is not None:
        array = (array - np.array(p.mean, np.float32)) / np.array(p.std, np.float32)
    return array.transpose(2, 0, 1)


@pytest.mark.parametrize("family", IMAGE_FAMILIES)
def test_a_second_runtime_preprocesses_images_from_the_manifest_alone(family, tmp_path):
    from PIL import Image
    from transformers import AutoImageProcessor

    directory = make_dir(family, tmp_path / family, perturbed=True)
    export(directory, tmp_path / "b", options=ExportOptions(labels=LABELS))
    data = json.loads((tmp_path / "b" / mf.MANIFEST_FILE).read_text())
    assert data["schema_version"] == 2 and data["preprocessing"]["kind"] == "image"
    p = mf.Manifest.load(tmp_path / "b").preprocessing
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (50, 41, 3), dtype=np.uint8))  # not square, not the size
    ours = _preprocess_from_manifest(image, p)
    theirs = AutoImageProcessor.from_pretrained(directory)(image, return_tensors="np")["pixel_values"][0]
    assert ours.shape == theirs.shape == p.shape
    np.testing.assert_allclose(ours, theirs, atol=1e-5)
    session = TrainingSession(tmp_path / "b")
    session.train(session.dataset({"pixel_values": ours[None]}, [1]), TrainConfig(epochs=1, batch_size=1))


def test_an_image_model_without_its_image_processor_is_refused(tmp_path):
    directory = make_dir("resnet", tmp_path / "resnet", perturbed=True)
    (directory / "preprocessor_config.json").unlink()
    with pytest.raises(ExportError, match="preprocessor_config.json"):
        export(directory, tmp_path / "b", options=ExportOptions(labels=LABELS))
    assert not (tmp_path / "b").exists()


def _manifest_dict(tmp_path, family: str) -> dict:
    make_dir(family, tmp_path / family, perturbed=True)
    export(tmp_path / family, tmp_path / "b", options=ExportOptions(labels=LABELS, max_length=16))
    return json.loads((tmp_path / "b" / mf.MANIFEST_FILE).read_text())


def test_a_text_manifest_stays_version_1(tmp_path):
    data = _manifest_dict(tmp_path, "distilbert")
    assert data["schema_version"] == 1 and "preprocessing" not in data  # a version-1 runtime reads it as before
    assert mf.Manifest.from_dict(data).preprocessing is None


MALFORMED = {
    "version-1": (lambda d: d.update(schema_version=1), "version 1 has no `preprocessing`"),
    "version-5": (lambda d: d.update(schema_version=5), "schema version 5 is not supported"),
    "kind": (lambda d: d["preprocessing"].update(kind="audio"), "kind 'audio' is not known"),
    "size": (lambda d: d["preprocessing"].update(size=[16, 16]), "makes 'pixel_values' of shape"),
    "mean": (lambda d: d["preprocessing"].update(mean=[0.5]), "mean"),
    "std": (lambda d: d["preprocessing"].update(std=[0.5, 0.0, 0.5]), "std must not be zero"),
    "resize": (lambda d: d["preprocessing"].update(resize={"shortest": 3}), "resize"),
    "resample": (lambda d: d["preprocessing"].update(resample="magic"), "resample"),
    "missing": (lambda d: d["preprocessing"].pop("size"), "malformed"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_a_malformed_preprocessing_field_is_refused_by_name(tmp_path, case):
    change, message = MALFORMED[case]
    data = _manifest_dict(tmp_path, "vit")
    change(data)
    with pytest.raises(BundleError, match=message):
        mf.Manifest.from_dict(data)


def _ids(family: str) -> tuple[str, ...]:
    cases = [c for c in CASES if c[0] == family]
    return tuple(f"test_family_exports_trains_and_round_trips_through_peft[{'-'.join(c)}]" for c in cases)


# What this module proves is supported, for the support table: (name, what, tests), as tests/support_table.py reads
_PROVED = [
    ("BERT", "text classifier directory; LoRA on query, value", _ids("bert")),
    ("DistilBERT", "text classifier directory; LoRA on q_lin, v_lin; no token_type_ids",
     _ids("distilbert") + tuple(f"test_a_tokenizer_output_the_model_does_not_take_is_left_out[{f}]"
                                for f in ("distilbert", "deberta-v2"))),
    ("RoBERTa", "text classifier directory; LoRA on query, value", _ids("roberta")),
    ("XLM-RoBERTa", "text classifier directory; LoRA on query, value", _ids("xlm-roberta")),
    ("ALBERT", "text classifier directory (layers share weights); LoRA on query, value", _ids("albert")),
    ("ELECTRA", "text classifier directory; LoRA on query, value", _ids("electra")),
    ("DeBERTa-v2", "text classifier directory; LoRA on query_proj, value_proj", _ids("deberta-v2")),
    ("MobileBERT", "text classifier directory; LoRA on query, value", _ids("mobilebert")),
    ("ViT", "image classifier directory (size, mean, std in the manifest); LoRA on query, value; new head",
     _ids("vit") + ("test_a_second_runtime_preprocesses_images_from_the_manifest_alone[vit]",
                    "test_given_targets_replace_the_familys_default")),
    ("ResNet", "image classifier directory (resize, crop, mean, std in the manifest); LoRA on its convolutions "
     "(BatchNorm frozen); new head",
     _ids("resnet") + ("test_a_second_runtime_preprocesses_images_from_the_manifest_alone[resnet]",)),
]  # fmt: skip

SUPPORTED = [
    {
        "what": name,
        "kind": "Hugging Face family",
        "status": "supported",
        "lora": what.split("LoRA on ", 1)[1].split(";")[0] if "LoRA on " in what else "",
        "note": what,
        "tests": [f"tests/test_hf_families.py::{test}" for test in tests],
    }
    for name, what, tests in _PROVED
]
