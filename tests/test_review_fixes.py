"""What a new user hit after issues 9-11: each case with the behaviour they expected."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgepeft.cli import main
from edgepeft.errors import DataError, ExportError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.data import encode_labels


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def test_an_invalid_target_regex_is_one_error_naming_the_flag(runner, tmp_path):
    with pytest.raises(ExportError, match="is not a regular expression"):
        LoraSpec(target_modules="fc[")
    result = runner.invoke(main, ["export", "tiny_models:mlp", "--out", str(tmp_path / "b"), "--target-modules",
                                  "fc[", "--regex"])  # fmt: skip
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: --target-modules 'fc[' is not a regular")


def test_an_onnx_model_without_targets_lists_what_can_be_adapted(tmp_path):
    import torch
    import tiny_models

    model, example = tiny_models.mlp()
    torch.onnx.export(model.eval(), (example["x"],), str(tmp_path / "m.onnx"), input_names=["x"],
                      output_names=["out"], dynamo=False)  # fmt: skip
    with pytest.raises(ExportError, match=r"needs `target_modules`.*adaptable: .*fc1"):
        export(tmp_path / "m.onnx", tmp_path / "b", options=ExportOptions(labels=("a", "b"), head_on="out"))
    assert not (tmp_path / "b").exists()


def test_class_indices_are_labels_of_a_bundle_with_names(mlp_bundle):
    manifest = TrainingSession(mlp_bundle).manifest
    named = dataclasses.replace(manifest, labels=("bad", "good", "ugly", "odd"))
    assert encode_labels(named, ["good", "1", " 3 ", "bad"]).tolist() == [1, 1, 3, 0]
    with pytest.raises(DataError, match=r"label '4' .* or a class index 0..3"):
        encode_labels(named, ["4"])
    numeric = dataclasses.replace(manifest, labels=("1", "2", "3", "5"))  # "1" is a name here, not an index
    assert encode_labels(numeric, ["1", "5"]).tolist() == [0, 3]
    with pytest.raises(DataError, match="names only"):
        encode_labels(numeric, ["0"])


def test_output_paths_are_checked_before_training(runner, mlp_bundle, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(16, 16)).astype(np.float32), labels=np.arange(16) % 4)
    for flag in ("--adapter-out", "--state-out", "--checkpoint-dir"):
        result = runner.invoke(main, ["train", str(mlp_bundle), "--data", str(tmp_path / "d.npz"), flag, str(folder)])
        assert result.exit_code == 1 and str(folder) in result.output
        assert "training: step" not in result.output  # refused before the first step, not after the run
    assert (folder / "notes.txt").read_text() == "keep me"


def test_max_length_beyond_the_position_embeddings_is_refused(tmp_path):
    import tiny_hf

    directory = tiny_hf.make_dir("roberta", tmp_path / "roberta", perturbed=True)  # 64 positions, ids from pad_token_id 0 + 1
    with pytest.raises(ExportError, match=r"`max_length` 128 exceeds the 63 tokens"):
        export(directory, tmp_path / "b", options=ExportOptions(labels=("a", "b"), max_length=128))
    manifest = export(directory, tmp_path / "ok", options=ExportOptions(labels=("a", "b"), max_length=63))
    session = TrainingSession(tmp_path / "ok")
    session.predict(["word " * 300])  # the longest text the tokenizer keeps runs through the model
    assert manifest.max_length == 63


def test_a_longer_max_steps_is_another_run_said_plainly(runner, mlp_bundle, tmp_path):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(16, 16)).astype(np.float32), labels=np.arange(16) % 4)
    base = ["train", str(mlp_bundle), "--data", str(tmp_path / "d.npz"), "--checkpoint-dir", str(tmp_path / "ck")]
    assert runner.invoke(main, [*base, "--max-steps", "1"]).exit_code == 0
    result = runner.invoke(main, base)
    assert result.exit_code == 1 and "--max-steps 1 there, not given here" in result.output
    assert json.dumps(result.output).count("--new-run") == 1
