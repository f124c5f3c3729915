"""End to end on the real all-MiniLM-L6-v2: ORT against torch, and adapters both ways with Hugging Face PEFT."""

from __future__ import annotations

import csv

import numpy as np
import peft
import pytest
import torch
from conftest import AUSTEN_LABELS
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from edgepeft.errors import DataError
from edgepeft.runtime import TrainConfig, TrainingSession

FP32_ATOL = 1e-4
# int8 weights against the fp32 host model: logits move by at most this much, predictions agree on >= 98%.
INT8_LOGIT_ATOL = 0.05
MIN_AGREEMENT = 0.98
MIN_AGREEMENT_AFTER_SHORT_TRAINING = 0.97
# A host PEFT adapter trained 24 steps at 5e-3 (batch 8 x 64 tokens): largest logit 0.83, int8 bundle
# within 0.017 of the host, labels 100% the same; with its LoRA matrices zeroed, 0.93 away (measured).
HOST_STEPS = 24
HOST_LEARNING_RATE = 5e-3


def _texts(path, limit=None):
    with open(path, encoding="utf-8") as f:
        return [row["text"] for row in csv.DictReader(f)][:limit]


def _host_logits(minilm_dir, adapter_dir, texts) -> np.ndarray:
    """Load an adapter into the fp32 base with PEFT, as a host would, and run it."""
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=len(AUSTEN_LABELS))
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    outputs = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(
                texts[start : start + 64], truncation=True, max_length=128, padding=True, return_tensors="pt"
            )
            outputs.append(model(**batch).logits.numpy())
    return np.concatenate(outputs)


def test_fp32_bundle_matches_torch(minilm_fp32, minilm_dir, austen_split, tmp_path):
    session = TrainingSession(minilm_fp32)
    session.save_adapter(tmp_path / "initial")  # the head the exporter initialised, for the host model
    texts = _texts(austen_split[1], 48)
    device = session.predict(texts).outputs
    host = _host_logits(minilm_dir, tmp_path / "initial", texts)
    np.testing.assert_allclose(device, host, atol=FP32_ATOL, rtol=0)


def test_device_trained_adapter_loads_into_peft_and_agrees(minilm_int8, minilm_dir, austen_split, tmp_path):
    train_csv, test_csv = austen_split
    session = TrainingSession(minilm_int8)
    data = session.load_data(train_csv)
    session.train(data.take(np.arange(320)), TrainConfig(epochs=1, batch_size=8, learning_rate=2e-3))
    values = session.trainable_values()
    assert np.abs(values["bert.encoder.layer.0.attention.self.query.lora_B.default.weight"]).max() > 0
    session.save_adapter(tmp_path / "adapter")

    texts = _texts(test_csv)
    device = session.predict(texts)
    host = _host_logits(minilm_dir, tmp_path / "adapter", texts)
    assert np.abs(host - device.outputs).max() <= INT8_LOGIT_ATOL
    same = host.argmax(axis=1) == device.classes
    top2 = np.sort(host, axis=1)[:, -2:]
    decisive = top2[:, 1] - top2[:, 0] > 2 * INT8_LOGIT_ATOL
    assert same[decisive].all(), "a passage the host decides clearly got another class on the device"
    # After 40 steps some passages are near-ties: 97.5% measured, the 12 others within 0.005 of a tie.
    assert same.mean() >= MIN_AGREEMENT_AFTER_SHORT_TRAINING, f"agree on {same.mean():.1%} of {len(texts)} passages"
    assert device.labels[0] in AUSTEN_LABELS


def test_host_trained_peft_adapter_loads_into_the_bundle(minilm_int8, minilm_dir, austen_split, tmp_path):
    """Trained long enough that LoRA moves the logits well past the tolerance: zeroing it fails the check."""
    torch.manual_seed(0)
    base = AutoModelForSequenceClassification.from_pretrained(minilm_dir, num_labels=len(AUSTEN_LABELS))
    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"], task_type="SEQ_CLS")
    model = peft.get_peft_model(base, config)
    tokenizer = AutoTokenizer.from_pretrained(minilm_dir)
    with open(austen_split[0], encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[: HOST_STEPS * 8]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=HOST_LEARNING_RATE)
    model.train()
    for start in range(0, len(rows), 8):
        batch = tokenizer([r["text"] for r in rows[start : start + 8]], truncation=True, max_length=64,
                          padding=True, return_tensors="pt")  # fmt: skip
        labels = torch.tensor([AUSTEN_LABELS.index(r["label"]) for r in rows[start : start + 8]])
        model(**batch, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.save_pretrained(tmp_path / "host-adapter")

    texts = _texts(austen_split[1], 96)
    host = _host_logits(minilm_dir, tmp_path / "host-adapter", texts)
    session = TrainingSession(minilm_int8)
    session.load_adapter(tmp_path / "host-adapter")
    device = session.predict(texts)
    assert np.abs(host - device.outputs).max() <= INT8_LOGIT_ATOL
    assert float((host.argmax(axis=1) == device.classes).mean()) >= MIN_AGREEMENT
    # the same adapter with every LoRA matrix zeroed (the head kept) would fail the tolerance by far
    values = session.trainable_values()
    session.set_trainable({n: np.zeros_like(v) if ".lora_" in n else v for n, v in values.items()})
    assert np.abs(host - session.predict(texts).outputs).max() > 3 * INT8_LOGIT_ATOL


def test_text_data_with_an_unknown_label(minilm_int8, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "It is a truth universally acknowledged", "label": "prideprejudice"}\n'
                    '{"text": "Call me Ishmael.", "label": "mobydick"}\n')  # fmt: skip
    with pytest.raises(DataError, match="label 'mobydick' \\(row 2\\) is not one the bundle knows"):
        TrainingSession(minilm_int8).load_data(path)


def test_text_is_tokenized_like_the_host(minilm_int8, minilm_dir):
    texts = ["It is a truth universally acknowledged.", "Emma Woodhouse, handsome, clever, and rich " * 40]
    device = TrainingSession(minilm_int8).encode(texts)
    host = AutoTokenizer.from_pretrained(minilm_dir)(
        texts, truncation=True, max_length=128, padding=True, return_tensors="np"
    )
    for name in ("input_ids", "attention_mask", "token_type_ids"):
        np.testing.assert_array_equal(device[name], host[name])
    assert device["input_ids"].shape == (2, 128)
