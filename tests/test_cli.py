"""The command line: help on every command, the export/train/eval/predict/inspect path, one-line errors."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgepeft.cli import main

COMMANDS = [
    "export",
    "train",
    "eval",
    "predict",
    "inspect",
    "demo",
    "adapters",
    "adapters list",
    "adapters activate",
    "adapters delete",
    "adapters export",
]


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.mark.parametrize("command", COMMANDS)
def test_help(runner, command):
    result = runner.invoke(main, [*command.split(), "--help"])
    assert result.exit_code == 0
    assert f"main {command}" in result.output
    assert "--help" in result.output


def test_top_level_help_lists_every_command(runner):
    result = runner.invoke(main, ["--help"])
    assert result.exit_code == 0
    for command in COMMANDS:
        assert command.split()[0] in result.output


def test_export_a_torch_module_then_inspect(runner, tmp_path):
    out = tmp_path / "bundle"
    result = runner.invoke(main, ["export", "tiny_models:convnet", "--out", str(out), "--target-modules", "conv1,conv2",
                                  "--train-module", "head", "--quantize", "fp32"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "trainable parameters, fp32 backbone" in result.output
    result = runner.invoke(main, ["inspect", str(out)])
    assert result.exit_code == 0, result.output
    assert "image float32['batch', 1, 12, 12]" in result.output
    assert "training_model.onnx" in result.output


def test_text_bundle_train_eval_predict(runner, minilm_int8, austen_split, tmp_path):
    train_csv, test_csv = austen_split
    small_train, small_test = tmp_path / "train.csv", tmp_path / "test.csv"
    small_train.write_text("".join(train_csv.read_text().splitlines(keepends=True)[:17]))
    small_test.write_text("".join(test_csv.read_text().splitlines(keepends=True)[:17]))
    report = tmp_path / "train.json"
    result = runner.invoke(main, ["train", str(minilm_int8), "--data", str(small_train), "--eval-data", str(small_test),
                                  "--epochs", "1", "--adapter-out", str(tmp_path / "adapter"),
                                  "--state-out", str(tmp_path / "state"), "--report", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["steps"] == 2 and figures["examples"] == 16
    assert {"accuracy_before", "accuracy_after", "median_step_ms", "peak_rss_mb", "adapter_bytes"} <= set(figures)

    result = runner.invoke(main, ["eval", str(minilm_int8), "--data", str(small_test), "--adapter", str(tmp_path / "adapter"),
                                  "--report", str(tmp_path / "eval.json")])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "eval.json").read_text())["accuracy"] == pytest.approx(figures["accuracy_after"])

    result = runner.invoke(main, ["predict", str(minilm_int8), "--adapter", str(tmp_path / "adapter"), "--json",
                                  "--text", "Mr. Darcy bowed.", "--text", "Captain Wentworth wrote a letter."])  # fmt: skip
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in result.output.strip().splitlines()]
    assert len(rows) == 2 and len(rows[0]["probabilities"]) == 6
    assert sum(rows[0]["probabilities"]) == pytest.approx(1.0, abs=1e-4)

    result = runner.invoke(main, ["inspect", str(tmp_path / "adapter")])
    assert result.exit_code == 0 and "LORA r=8" in result.output

    result = runner.invoke(main, ["train", str(minilm_int8), "--data", str(small_train), "--epochs", "1",
                                  "--resume", str(tmp_path / "state"), "--report", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert json.loads(report.read_text())["session_step"] == 4


@pytest.mark.parametrize(
    "args, message",
    [
        (["export", "tiny_models:mlp", "--target-modules", "nothing_here"], "match no module of MLP"),
        (["export", "tiny_models:not_a_factory"], "must return (torch.nn.Module"),
        (["export", "no_such_module:f"], "cannot load 'no_such_module:f'"),
        (["export", "tiny_models:mlp", "--target-modules", "fc1", "--rank", "0"], "rank"),
    ],
)
def test_export_errors_are_one_line(runner, tmp_path, args, message):
    result = runner.invoke(main, args[:2] + ["--out", str(tmp_path / "b")] + args[2:])
    assert result.exit_code == 1
    last = result.output.strip().splitlines()[-1]
    assert last.startswith("Error: ") and message in last
    assert "Traceback" not in result.output
    assert not (tmp_path / "b").exists()


def test_runtime_errors_are_one_line(runner, minilm_int8, tmp_path):
    empty = tmp_path / "empty.csv"
    empty.write_text("text,label\n")
    result = runner.invoke(main, ["eval", str(minilm_int8), "--data", str(empty)])
    assert result.exit_code == 1 and result.output.strip() == f"Error: --data {empty} holds no examples"
    result = runner.invoke(main, ["train", str(tmp_path), "--data", str(empty)])
    assert result.exit_code == 1 and "is not a bundle: manifest.json is missing" in result.output
    result = runner.invoke(main, ["inspect", str(tmp_path)])
    assert result.exit_code == 1 and "is neither a bundle (manifest.json) nor an adapter" in result.output
    result = runner.invoke(main, ["predict", str(minilm_int8)])
    assert result.exit_code == 2 and "give --text or --data" in result.output


def test_memory_budget_from_the_command_line(runner, tmp_path):
    out = tmp_path / "bundle"
    result = runner.invoke(main, ["export", "tiny_models:mlp", "--out", str(out), "--target-modules", "fc1",
                                  "--profile-memory"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "memory_profile" in (out / "manifest.json").read_text()


def test_store_train_list_activate_export(runner, minilm_int8, austen_split, tmp_path):
    rows = austen_split[0].read_text().splitlines(keepends=True)
    small = tmp_path / "train.csv"
    small.write_text("".join(rows[:41]))
    store = tmp_path / "store"
    args = ["train", str(minilm_int8), "--data", str(small), "--epochs", "1", "--store", str(store), "--name", "me",
            "--eval-every", "2", "--validation-fraction", "0.2", "--report", str(tmp_path / "r.json")]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    figures = json.loads((tmp_path / "r.json").read_text())
    assert figures["stored"] is True and figures["steps"] == 4 and len(figures["validation_scores"]) >= 2
    result = runner.invoke(main, ["adapters", "activate", str(store), "me", "--bundle", str(minilm_int8)])
    assert result.exit_code == 0, result.output
    result = runner.invoke(main, ["adapters", "list", str(store), "--bundle", str(minilm_int8)])
    assert result.exit_code == 0 and result.output.startswith("* me\tsteps ")
    out = tmp_path / "me.onnx"
    result = runner.invoke(
        main, ["adapters", "export", str(store), "me", "--bundle", str(minilm_int8), "--out", str(out)]
    )
    assert result.exit_code == 0, result.output
    assert out.stat().st_size > 1e6
    result = runner.invoke(main, ["adapters", "delete", str(store), "nobody", "--bundle", str(minilm_int8)])
    assert result.exit_code == 1 and "no adapter named 'nobody'" in result.output


def test_array_bundle_train_eval_predict_from_npz(runner, mlp_bundle, tmp_path):
    """A bundle exported from an nn.Module trains, evaluates and predicts from the CLI on an .npz file."""
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(48, 16)).astype(np.float32)
    labels = (x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0)
    np.savez(tmp_path / "data.npz", x=x, labels=labels.astype(np.float64))  # whole floats convert to int64
    adapter, report = tmp_path / "adapter", tmp_path / "r.json"
    result = runner.invoke(main, ["train", str(mlp_bundle), "--data", str(tmp_path / "data.npz"), "--epochs", "4",
                                  "--lr", "1e-2", "--adapter-out", str(adapter), "--report", str(report)])  # fmt: skip
    assert result.exit_code == 0, result.output
    figures = json.loads(report.read_text())
    assert figures["steps"] == 24 and figures["epoch_losses"][-1] < figures["epoch_losses"][0]
    result = runner.invoke(main, ["eval", str(mlp_bundle), "--data", str(tmp_path / "data.npz"), "--adapter",
                                  str(adapter)])  # fmt: skip
    assert result.exit_code == 0 and result.output.startswith("48 examples: loss "), result.output
    result = runner.invoke(main, ["predict", str(mlp_bundle), "--data", str(tmp_path / "data.npz"), "--adapter",
                                  str(adapter), "--json"])  # fmt: skip
    rows = [json.loads(line) for line in result.output.splitlines()]
    assert result.exit_code == 0 and len(rows) == 48 and rows[0]["row"] == 1 and 0 <= rows[0]["label"] < 4
    np.savez(tmp_path / "wide.npz", x=x[:, :10], labels=labels)
    result = runner.invoke(main, ["train", str(mlp_bundle), "--data", str(tmp_path / "wide.npz")])
    assert result.exit_code == 1 and "this bundle takes x float32[batch, 16]" in result.output
    assert result.output.startswith("Error: --data ")


def test_excel_csv_with_renamed_columns_trains(runner, minilm_int8, austen_split, tmp_path):
    """Excel's "CSV UTF-8" (BOM + CRLF) with columns review,score trains with --text-column/--label-column."""
    import csv

    with austen_split[0].open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))[:16]
    excel = tmp_path / "reviews.csv"
    with excel.open("w", encoding="utf-8-sig", newline="") as f:
        writer = csv.writer(f, dialect="excel")  # CRLF line ends
        writer.writerow(["review", "score"])
        writer.writerows([row["text"], row["label"]] for row in rows)
    assert excel.read_bytes().startswith(b"\xef\xbb\xbfreview,score\r\n")
    result = runner.invoke(main, ["train", str(minilm_int8), "--data", str(excel), "--text-column", "review",
                                  "--label-column", "score", "--epochs", "1"])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "2 steps" in result.output
    result = runner.invoke(main, ["train", str(minilm_int8), "--data", str(excel)])
    assert result.exit_code == 1 and "text" in result.output and "review" in result.output
