"""PyTorch eager + Hugging Face PEFT as a benchmarked system: what a user would train with instead.

The same LoRA spec as the bundle, the head trained through PEFT's `modules_to_save` (task SEQ_CLS), AdamW
with the bundle optimizer's betas, eps and weight decay, the model in eval() mode (dropout off, as the
exported bundle is), and `torch.set_num_threads` equal to ONNX Runtime's intra-op threads. The model is
built after `torch.manual_seed(init_seed)`, the exporter's seed, which gives the bundle's initial head
and LoRA matrices exactly.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.bench.workload import epoch_order


class TorchSystem:
    """A transformers classifier with PEFT LoRA, trained eagerly."""

    def __init__(
        self, model_dir: str | os.PathLike, threads: int, *, labels: list[str], lora: dict[str, Any],
        adamw: dict[str, Any], init_seed: int, max_length: int,
    ):  # fmt: skip
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        import peft
        import torch
        from transformers import AutoModelForSequenceClassification

        self.torch = torch
        torch.set_num_threads(threads)
        torch.manual_seed(init_seed)
        base = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=len(labels), id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
        )  # fmt: skip
        config = peft.LoraConfig(
            r=lora["r"], lora_alpha=lora["alpha"], lora_dropout=lora["dropout"],
            target_modules=lora["target_modules"], bias=lora["bias"],
            modules_to_save=list(lora["modules_to_save"]) or None, task_type="SEQ_CLS",
        )  # fmt: skip
        self.model = peft.get_peft_model(base, config)
        self.model.eval()  # dropout off: the bundle's exported graph has none
        self._model_dir = model_dir
        self._labels = list(labels)
        self._adamw = adamw
        self._max_length = max_length

    def _optimizer(self, learning_rate: float):
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        return self.torch.optim.AdamW(trainable, lr=learning_rate, **self._adamw)

    def _tensors(self, features: dict[str, np.ndarray]) -> dict[str, Any]:
        return {name: self.torch.from_numpy(array) for name, array in features.items()}

    def step_function(
        self, features: dict[str, np.ndarray], labels: np.ndarray, learning_rate: float
    ) -> Callable[[], Any]:
        """A function that takes one optimizer step on this fixed batch."""
        inputs, targets = self._tensors(features), self.torch.from_numpy(labels)
        optimizer = self._optimizer(learning_rate)

        def step() -> None:
            self.model(**inputs, labels=targets).loss.backward()
            optimizer.step()
            optimizer.zero_grad()

        return step

    def predict(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """Class probabilities for a batch of arrays."""
        with self.torch.inference_mode():
            logits = self.model(**self._tensors(features)).logits
            return self.torch.softmax(logits, dim=-1).numpy()

    def fit_and_evaluate(
        self, train_csv: Path, test_csv: Path, *, epochs: int, batch_size: int, learning_rate: float, seed: int,
        max_steps: int | None,
    ) -> dict[str, Any]:  # fmt: skip
        """Train with a plain PyTorch loop (edgepeft's batch order, dynamic padding per batch), then evaluate."""
        from transformers import AutoTokenizer

        from edgepeft.runtime.data import read_text_file

        tokenizer = AutoTokenizer.from_pretrained(self._model_dir)
        index = {label: i for i, label in enumerate(self._labels)}

        def load(path: Path) -> tuple[list[str], np.ndarray]:
            texts, labels = read_text_file(path)
            return texts, np.array([index[label] for label in labels], dtype=np.int64)

        def batch(texts: list[str], rows: np.ndarray) -> dict[str, Any]:
            return dict(tokenizer([texts[i] for i in rows], truncation=True, max_length=self._max_length,
                                  padding=True, return_tensors="pt"))  # fmt: skip

        train_texts, train_labels = load(train_csv)
        optimizer = self._optimizer(learning_rate)
        steps, started, losses = 0, time.perf_counter(), []
        for epoch in range(epochs):
            order = epoch_order(seed, epoch, len(train_texts))
            epoch_loss = 0.0
            for start in range(0, len(order), batch_size):
                if max_steps is not None and steps >= max_steps:
                    break
                rows = order[start : start + batch_size]
                loss = self.model(**batch(train_texts, rows), labels=self.torch.from_numpy(train_labels[rows])).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                steps += 1
                epoch_loss += float(loss) * len(rows)
            else:
                losses.append(epoch_loss / len(order))
        seconds = time.perf_counter() - started

        test_texts, test_labels = load(test_csv)
        correct, loss_sum = 0, 0.0
        with self.torch.inference_mode():
            for start in range(0, len(test_texts), batch_size):
                rows = np.arange(start, min(start + batch_size, len(test_texts)))
                targets = self.torch.from_numpy(test_labels[rows])
                out = self.model(**batch(test_texts, rows), labels=targets)
                loss_sum += float(out.loss) * len(rows)
                correct += int((out.logits.argmax(dim=-1) == targets).sum())
        return {"accuracy": correct / len(test_texts), "test_loss": loss_sum / len(test_texts), "steps": steps,
                "train_seconds": seconds, "last_epoch_loss": losses[-1] if losses else None}  # fmt: skip

    def save_adapter(self, directory: Path) -> Path:
        """Write the trained adapter with PEFT's `save_pretrained` (LoRA matrices and the head)."""
        self.model.save_pretrained(directory)
        return directory
