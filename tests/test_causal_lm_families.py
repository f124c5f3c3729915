"""Causal LM families edgepeft names no LoRA targets for (Qwen2, Gemma, Falcon with multi-query attention): LoRA goes
on every Linear but the output layer (PEFT's "all-linear"), and the bundle trains on the device to the loss PEFT
computes on the host."""

from __future__ import annotations

import json

import pytest
import tiny_lm
import torch

from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainConfig, TrainingSession

TEXT = "the cat sat on a mat . she said hello world to the dog and he was very happy to see her again . " * 12
ALL_LINEAR = {"qwen2": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "gemma": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
              "falcon": ["query_key_value", "dense", "dense_h_to_4h", "dense_4h_to_h"]}  # fmt: skip


@pytest.mark.parametrize("family", sorted(ALL_LINEAR))
def test_a_family_without_default_targets_trains_as_peft_computes(family, tmp_path):
    import peft
    from transformers import AutoModelForCausalLM

    source = tiny_lm.make_dir(family, tmp_path / "model")
    export(source, tmp_path / "bundle", lora=LoraSpec(r=4), options=ExportOptions(max_length=32))
    config = json.loads((tmp_path / "bundle" / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == sorted(ALL_LINEAR[family])

    (tmp_path / "novel.txt").write_text(TEXT, encoding="utf-8")
    session = TrainingSession(tmp_path / "bundle")
    data = session.load_data(tmp_path / "novel.txt")
    before = session.evaluate(data, batch_size=2).loss
    session.train(data, TrainConfig(epochs=3, batch_size=2, learning_rate=1e-2, seed=0))
    after = session.evaluate(data, batch_size=2).loss
    assert after < before - 0.1
    session.save_adapter(tmp_path / "adapter")

    host = AutoModelForCausalLM.from_pretrained(source, dtype=torch.float32)
    host = peft.PeftModel.from_pretrained(host, tmp_path / "adapter").eval()
    with torch.no_grad():
        out = host(input_ids=torch.from_numpy(data.features["input_ids"]),
                   attention_mask=torch.from_numpy(data.features["attention_mask"]),
                   labels=torch.from_numpy(data.labels))  # fmt: skip
    assert float(out.loss) == pytest.approx(after, rel=2e-3)  # int8 backbone against fp32
