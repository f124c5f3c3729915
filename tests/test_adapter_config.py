"""Adapters that travel: portable config, free fields users edit, checks of what the bundle can compute."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import peft
import pytest
import tiny_models
import torch
from conftest import export_tiny

from edgepeft.errors import AdapterError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.adapter import ADAPTER_CONFIG, WEIGHTS

FP32_ATOL = 1e-4
MLP_LORA = LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",))


@pytest.fixture(scope="module")
def named_bundle(tmp_path_factory):
    """The tiny MLP, fp32, whose base is called `edgepeft-tests/mlp`."""
    model, example = tiny_models.mlp()
    out = tmp_path_factory.mktemp("named") / "bundle"
    export(model, out, example_inputs=example, lora=MLP_LORA,
           options=ExportOptions(quantization="fp32", base_name="edgepeft-tests/mlp"))  # fmt: skip
    return out, {k: v.numpy() for k, v in example.items()}


def _edit(path, **fields):
    data = json.loads(path.read_text())
    data.update(fields)
    path.write_text(json.dumps(data))


def _host_adapter(directory, base_name=None, **config):
    """A LoRA adapter trained (here: set at random) with PEFT on the host; returns its fp32 host model."""
    model, example = tiny_models.mlp()
    settings = {"r": 8, "lora_alpha": 16, "target_modules": ["fc1", "fc2"], "modules_to_save": ["head"], **config}
    peft_model = peft.get_peft_model(model, peft.LoraConfig(**settings))
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, parameter in peft_model.named_parameters():
            if parameter.requires_grad:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)
    peft_model.save_pretrained(directory)
    if base_name is not None:
        _edit(directory / ADAPTER_CONFIG, base_model_name_or_path=base_name)
    with torch.no_grad():
        return peft_model.eval()(*example.values()).numpy()


def test_saved_config_says_inference_mode_and_a_portable_base(named_bundle, tmp_path):
    bundle, _ = named_bundle
    TrainingSession(bundle).save_adapter(tmp_path / "a")
    for path in (tmp_path / "a" / ADAPTER_CONFIG, bundle / ADAPTER_CONFIG):
        config = json.loads(path.read_text())
        assert config["inference_mode"] is True, path  # as PEFT writes a saved adapter
        assert config["base_model_name_or_path"] == "edgepeft-tests/mlp", path


def test_fields_users_edit_do_not_stop_an_adapter_loading(named_bundle, tmp_path):
    bundle, _ = named_bundle
    session = TrainingSession(bundle)
    saved = session.save_adapter(tmp_path / "a")
    _edit(saved / ADAPTER_CONFIG, base_model_name_or_path="someone/renamed", inference_mode=False, revision="v2")
    loaded = TrainingSession(bundle)
    loaded.load_adapter(saved)  # the fingerprint in the weights file decides the base, not the name
    for name, value in session.trainable_values().items():
        np.testing.assert_array_equal(loaded.trainable_values()[name], value)


def test_a_field_that_shapes_the_computation_is_covered_by_the_checksum(named_bundle, tmp_path):
    bundle, _ = named_bundle
    saved = TrainingSession(bundle).save_adapter(tmp_path / "a")
    _edit(saved / ADAPTER_CONFIG, lora_alpha=32)
    with pytest.raises(AdapterError, match="corrupted"):
        TrainingSession(bundle).load_adapter(saved)


def test_both_adapter_files_get_the_users_umask(named_bundle, tmp_path):
    bundle, _ = named_bundle
    old = os.umask(0o027)
    try:
        saved = TrainingSession(bundle).save_adapter(tmp_path / "a")
    finally:
        os.umask(old)
    modes = {name: stat.S_IMODE((saved / name).stat().st_mode) for name in (ADAPTER_CONFIG, WEIGHTS)}
    assert modes == {ADAPTER_CONFIG: 0o640, WEIGHTS: 0o640}
    assert stat.S_IMODE(saved.stat().st_mode) == 0o750  # the directory as mkdir would make it


def test_store_records_get_the_users_umask(mlp_bundle, tmp_path):
    from edgepeft.runtime.store import AdapterStore

    session = TrainingSession(mlp_bundle)
    old = os.umask(0o027)
    try:
        store = AdapterStore(tmp_path / "store", session.manifest)
        store.save("me", session.trainable_values(), steps=0)
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "store").rglob("*") if p.is_file() and p.name != ".lock"]
    assert len(files) >= 4 and {stat.S_IMODE(p.stat().st_mode) for p in files} == {0o640}


@pytest.mark.parametrize("config", [{"lora_alpha": 4}, {"lora_alpha": 16, "use_rslora": True}, {"lora_alpha": 16}])
def test_a_host_adapter_with_another_lora_scale_is_rescaled_exactly(named_bundle, tmp_path, config):
    bundle, example = named_bundle
    host = _host_adapter(tmp_path / "host", **config)
    session = TrainingSession(bundle)
    session.load_adapter(tmp_path / "host")
    np.testing.assert_allclose(session.predict(example).outputs, host, atol=FP32_ATOL, rtol=0)


@pytest.mark.parametrize(
    "config, field",
    [
        ({"r": 4}, "r is 4"),
        ({"use_dora": True}, "use_dora"),
        ({"rank_pattern": {"fc1": 4}}, "rank_pattern"),
        ({"target_modules": ["fc1"]}, "target_modules"),
        ({"bias": "all"}, "bias"),
    ],
)
def test_a_host_adapter_the_bundle_cannot_compute_is_refused(named_bundle, tmp_path, config, field):
    bundle, _ = named_bundle
    _host_adapter(tmp_path / "host", **config)
    with pytest.raises(AdapterError, match=field):
        TrainingSession(bundle).load_adapter(tmp_path / "host")


def test_a_host_adapter_for_another_named_base_is_refused_and_loads_once_renamed(named_bundle, tmp_path):
    bundle, example = named_bundle
    _host_adapter(tmp_path / "host", base_name="bert-base-uncased")
    with pytest.raises(AdapterError, match="'bert-base-uncased'.*set base_model_name_or_path to 'edgepeft-tests/mlp'"):
        TrainingSession(bundle).load_adapter(tmp_path / "host")
    for same in ("edgepeft-tests/mlp", "/home/me/models/edgepeft-tests/mlp/", "MLP"):
        _edit(tmp_path / "host" / ADAPTER_CONFIG, base_model_name_or_path=same)
        TrainingSession(bundle).load_adapter(tmp_path / "host")


def test_a_device_adapter_for_another_base_is_refused_whatever_its_name(named_bundle, tmp_path):
    bundle, _ = named_bundle
    other = export_tiny("textnet", tmp_path / "other")
    saved = TrainingSession(tmp_path / "other").save_adapter(tmp_path / "a")
    assert other.base_fingerprint != TrainingSession(bundle).manifest.base_fingerprint
    _edit(saved / ADAPTER_CONFIG, base_model_name_or_path="edgepeft-tests/mlp")
    with pytest.raises(AdapterError, match="different base model"):
        TrainingSession(bundle).load_adapter(saved)
