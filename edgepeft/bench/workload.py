"""The workload every system gets: fixed-shape random batches for speed, the demo's Austen split for accuracy.

Numpy only: the ONNX Runtime workers import this with torch blocked.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

TOKEN_RANGE = (1000, 20000)  # ordinary word pieces of the BERT vocabulary, no special tokens


def fixed_batch(batch: int, seq: int, seed: int, classes: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """`batch` x `seq` random token ids with a full attention mask, and labels cycling through the classes.

    A full mask means no system can trim padding, so all of them compute exactly `batch * seq` tokens.
    """
    rng = np.random.default_rng(seed)
    features = {
        "input_ids": rng.integers(*TOKEN_RANGE, size=(batch, seq), dtype=np.int64),
        "attention_mask": np.ones((batch, seq), dtype=np.int64),
        "token_type_ids": np.zeros((batch, seq), dtype=np.int64),
    }
    return features, np.arange(batch, dtype=np.int64) % classes


def epoch_order(seed: int, epoch: int, examples: int) -> np.ndarray:
    """The example order of one epoch, as edgepeft's runtime draws it for a fresh run (`shuffle=True`).

    PyTorch's accuracy run uses it too, so both systems see the same batches in the same order.
    """
    return np.random.default_rng([seed, 0, epoch]).permutation(examples)


def head_rows(source: Path, target: Path, rows: int | None) -> Path:
    """Copy the header and the first `rows` examples of a CSV (all of them for None); returns `target`."""
    with source.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        kept = [row for i, row in enumerate(reader) if rows is None or i < rows]
        fields = reader.fieldnames or ["text", "label"]
    with target.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(kept)
    return target


def austen_split(
    out: Path, seed: int, train_rows: int | None, test_rows: int | None
) -> tuple[Path, Path, tuple[str, ...]]:
    """The demo's seeded train/test split of the Austen passages (optionally cut), and the sorted labels."""
    from edgepeft.demo import split_austen

    out.mkdir(parents=True, exist_ok=True)
    train, test, labels = split_austen(out, seed)
    if train_rows is not None:
        train = head_rows(train, out / "austen-train-cut.csv", train_rows)
    if test_rows is not None:
        test = head_rows(test, out / "austen-test-cut.csv", test_rows)
    return train, test, labels
