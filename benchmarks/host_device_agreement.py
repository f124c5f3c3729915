"""Agreement between the device and a host on the Austen test split, for an adapter the demo trained.

    edgepeft demo --out edgepeft-demo && python benchmarks/host_device_agreement.py edgepeft-demo

The device predicts with the int8 bundle and the adapter; the host loads the same adapter into the fp32
base with `peft.PeftModel.from_pretrained`, as any PEFT user would, and predicts the same passages.
"""

from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

import numpy as np
import peft
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from edgepeft.demo import minilm_path
from edgepeft.runtime import TrainingSession


def main(demo: Path) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with open(demo / "austen-test.csv", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    texts = [row["text"] for row in rows]
    session = TrainingSession(demo / "bundle-int8")
    session.load_adapter(demo / "adapter")
    device = session.predict(texts)
    labels = session.manifest.labels
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(labels))
    model = peft.PeftModel.from_pretrained(base, demo / "adapter").eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    with torch.no_grad():
        host = np.concatenate([
            model(**tokenizer(texts[i : i + 64], truncation=True, max_length=128, padding=True, return_tensors="pt")).logits.numpy()
            for i in range(0, len(texts), 64)
        ])  # fmt: skip
    truth = np.array([labels.index(row["label"]) for row in rows])
    print(f"passages: {len(texts)}")
    print(f"host (fp32 + PEFT) and device (int8) agree on {np.mean(host.argmax(1) == device.classes):.2%}")
    print(f"largest logit difference: {np.abs(host - device.outputs).max():.3f}")
    print(f"accuracy: device {np.mean(device.classes == truth):.2%}, host {np.mean(host.argmax(1) == truth):.2%}")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "edgepeft-demo"))
