"""The transformers path of the exporter on a tiny BERT: what it says while exporting, what it names the base."""

from __future__ import annotations

import json
import logging

import pytest
from tiny_bert import make_tiny_bert

from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.adapter import ADAPTER_CONFIG

LABELS = ("a", "b")


def test_the_new_head_is_announced_once_without_transformers_training_warning(tmp_path, capfd, caplog):
    model_dir = make_tiny_bert(tmp_path / "tiny-bert")
    with caplog.at_level(logging.INFO, logger="edgepeft"):
        options = ExportOptions(labels=LABELS, max_length=32)
        manifest = export(model_dir, tmp_path / "b", lora=LoraSpec(), options=options)
    printed = capfd.readouterr()
    everything = printed.out + printed.err + caplog.text
    assert "TRAIN this model" not in everything and "newly initialized" not in everything
    assert [r.getMessage() for r in caplog.records if "new head" in r.getMessage()] == [
        "new head ['classifier.bias', 'classifier.weight'] initialised (seed 0): it trains on the device"
    ]
    # the base is called by its hub name (config.json's _name_or_path), never by a path into this machine
    assert manifest.peft_config["base_model_name_or_path"] == "edgepeft-tests/tiny-bert"
    assert manifest.base_names == ("edgepeft-tests/tiny-bert", "tiny-bert")
    TrainingSession(tmp_path / "b").save_adapter(tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / ADAPTER_CONFIG).read_text())
    assert config["base_model_name_or_path"] == "edgepeft-tests/tiny-bert" and config["inference_mode"] is True


@pytest.mark.parametrize("recorded", [None, "/home/someone/.venv/lib/models/tiny"])
def test_a_base_without_a_hub_name_is_called_by_its_directorys_name(tmp_path, recorded):
    model_dir = make_tiny_bert(tmp_path / "my-bert", name_or_path=recorded)
    options = ExportOptions(labels=LABELS, max_length=32)
    manifest = export(model_dir, tmp_path / "b", lora=LoraSpec(), options=options)
    assert manifest.peft_config["base_model_name_or_path"] == "my-bert"
    assert json.loads((tmp_path / "b" / ADAPTER_CONFIG).read_text())["base_model_name_or_path"] == "my-bert"
