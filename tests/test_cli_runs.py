"""The CLI says what a training run did: resumed, already finished, a new run, early stopped, failed."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from edgepeft.cli import main


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


@pytest.fixture
def npz(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 16)).astype(np.float32)
    path = tmp_path / "data.npz"
    np.savez(path, x=x, labels=(x[:, 0] > 0).astype(np.int64) + 2 * (x[:, 1] > 0))
    return path


def test_resume_finish_and_new_run_are_said(runner, mlp_bundle, npz, tmp_path):
    ck = tmp_path / "ck"
    base = ["train", str(mlp_bundle), "--data", str(npz), "--epochs", "2", "--batch-size", "8",
            "--checkpoint-dir", str(ck), "--checkpoint-every", "3"]  # fmt: skip
    first = runner.invoke(main, [*base, "--max-seconds", "0.002", "--report", str(tmp_path / "a.json")])
    assert first.exit_code == 0, first.output
    assert "stopped: max_seconds" in first.output
    done = json.loads((tmp_path / "a.json").read_text())["steps"]
    assert 0 < done < 16
    # the same command without the time budget (which is not part of the run) continues: 16 steps in all
    second = runner.invoke(main, [*base, "--report", str(tmp_path / "b.json")])
    assert second.exit_code == 0, second.output
    assert f"resuming from step {done} of 16" in second.output
    figures = json.loads((tmp_path / "b.json").read_text())
    assert figures["resumed_from"] == done and figures["steps"] == 16 - done and figures["run_steps"] == 16
    third = runner.invoke(main, [*base, "--report", str(tmp_path / "c.json")])
    assert third.exit_code == 0, third.output
    assert "already complete (16/16 steps): nothing to train" in third.output
    assert "nan" not in third.output and "0 steps" in third.output
    assert json.loads((tmp_path / "c.json").read_text())["already_complete"] is True
    # another config is another run: refused in the flags' words, then started with --new-run
    other = runner.invoke(main, [*base[:-4], "--batch-size", "4", *base[-4:]])
    assert other.exit_code == 1 and "belongs to another run" in other.output
    assert "--batch-size 8 there, 4 here" in other.output and "--new-run" in other.output
    new = runner.invoke(main, [*base[:-4], "--batch-size", "4", *base[-4:], "--new-run"])
    assert new.exit_code == 0, new.output
    assert "held another run: started a new one there" in new.output


def test_a_non_finite_loss_exits_1(runner, tmp_path, npz):
    from conftest import export_tiny

    from edgepeft.export import ExportOptions  # noqa: F401  (export_tiny exports with the defaults)

    bundle = tmp_path / "sgd"
    export_tiny("mlp", bundle, quantization="fp32")
    result = runner.invoke(main, ["train", str(bundle), "--data", str(npz), "--lr", "1e30", "--epochs", "3",
                                  "--adapter-out", str(tmp_path / "adapter")])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "stopped: non_finite" in result.output
    assert result.output.strip().splitlines()[-1].startswith("Error: training stopped: the loss became NaN")
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()  # the last finite parameters are kept


def test_store_says_what_was_kept_and_why(runner, mlp_bundle, npz, tmp_path):
    store = tmp_path / "store"
    args = ["train", str(mlp_bundle), "--data", str(npz), "--epochs", "30", "--store", str(store), "--name", "me",
            "--eval-every", "2", "--patience", "1", "--validation-fraction", "0.25", "--lr", "1e-6"]  # fmt: skip
    result = runner.invoke(main, args)
    assert result.exit_code == 0, result.output
    assert "stopped: early_stopped" in result.output and "adapter 'me' stored" in result.output
    again = runner.invoke(main, args)
    assert again.exit_code == 0, again.output
    assert "adapter 'me' not stored: validation score" in again.output
    assert "does not beat the stored adapter's" in again.output
