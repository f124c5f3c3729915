"""The CLI's errors, as a user of the CLI meets them: one line, in the flags' words, the right exit status."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepeft.cli import main
from edgepeft.cli.common import Progress, count, human_size


@pytest.fixture
def runner() -> CliRunner:
    return CliRunner()


def _one_error_line(result) -> str:
    """The output ends in exactly one `Error:` line (a progress line such as `exporting to ...` may precede it)."""
    lines = result.output.strip().splitlines()
    errors = [line for line in lines if line.startswith("Error: ")]
    assert errors == lines[-1:], result.output
    assert "Traceback" not in result.output
    return lines[-1]


@pytest.mark.parametrize(
    "args, flag",
    [
        (["--lr", "-1"], "--lr"),
        (["--batch-size", "0"], "--batch-size"),
        (["--epochs", "0"], "--epochs"),
        (["--warmup-steps", "-2"], "--warmup-steps"),
        (["--max-seconds", "0"], "--max-seconds"),
        (["--memory-budget", "-5"], "--memory-budget"),
    ],
)
def test_train_config_errors_name_the_flag(runner, mlp_bundle, tmp_path, args, flag):
    result = runner.invoke(main, ["train", str(mlp_bundle), "--data", str(tmp_path / "none.csv"), *args])
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert flag in line and "`" not in line and "learning_rate" not in line and "batch_size" not in line


def test_export_errors_name_the_flag(runner, mlp_bundle, tmp_path):
    result = runner.invoke(main, ["export", "tiny_models:mlp", "--out", str(mlp_bundle), "--target-modules", "fc1"])
    assert result.exit_code == 1 and "--overwrite" in _one_error_line(result)
    result = runner.invoke(main, ["export", "tiny_models:mlp", "--out", str(tmp_path / "b"), "--rank", "0",
                                  "--target-modules", "fc1"])  # fmt: skip
    assert result.exit_code == 1 and "--rank" in _one_error_line(result)


def test_a_missing_memory_profile_names_the_export_flag(runner, minilm_int8, austen_split, tmp_path):
    small = tmp_path / "small.csv"
    small.write_text("".join(austen_split[0].read_text().splitlines(keepends=True)[:9]))
    result = runner.invoke(main, ["train", str(minilm_int8), "--data", str(small), "--memory-budget", "300"])
    assert result.exit_code == 1 and "--profile-memory" in _one_error_line(result)


@pytest.mark.parametrize(
    "args",
    [
        ["train", "--no-such-flag"],
        ["train", "{bundle}", "--data", "x.csv", "--checkpoint-every", "0"],
        ["train", "{bundle}", "--data", "x.csv", "--epochs", "two"],
        ["train", "{bundle}"],
        ["nosuchcommand"],
    ],
)
def test_usage_errors_are_one_line_with_status_2(runner, mlp_bundle, args):
    result = runner.invoke(main, [a.replace("{bundle}", str(mlp_bundle)) for a in args])
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "--help" in line


def test_checkpoint_dir_with_store_is_refused(runner, mlp_bundle, tmp_path):
    result = runner.invoke(main, ["train", str(mlp_bundle), "--data", "x.csv", "--store", str(tmp_path / "s"),
                                  "--checkpoint-dir", str(tmp_path / "ck")])  # fmt: skip
    assert result.exit_code == 2 and "--checkpoint-dir" in _one_error_line(result)
    assert not (tmp_path / "s").exists() and not (tmp_path / "ck").exists()


def test_state_of_another_bundle_blames_the_state_directory(runner, tmp_path):
    """Same base model, another rank: the checkpoint's shapes differ, and the error names the state."""
    import numpy as np
    from conftest import export_tiny

    from edgepeft.runtime import TrainConfig, TrainingSession

    rank4, rank8 = tmp_path / "rank4", tmp_path / "rank8"
    export_tiny("mlp", rank4, r=4)
    export_tiny("mlp", rank8, r=8)
    session = TrainingSession(rank8)
    rows = np.random.default_rng(0).normal(size=(8, 16)).astype(np.float32)
    session.train(session.dataset({"x": rows}, np.zeros(8, dtype=np.int64)), TrainConfig(batch_size=4))
    session.save_state(tmp_path / "state")
    result = runner.invoke(main, ["eval", str(rank4), "--data", "x.csv", "--state", str(tmp_path / "state")])
    line = _one_error_line(result)
    assert result.exit_code == 1 and f"training state {tmp_path / 'state'}" in line and "shape" in line


def test_inspect_names_the_corrupted_file(runner, mlp_bundle, tmp_path):
    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_bundle, bundle)
    data = bytearray((bundle / "eval_model.onnx").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (bundle / "eval_model.onnx").write_bytes(bytes(data))
    (bundle / "inference.onnx").unlink()
    result = runner.invoke(main, ["inspect", str(bundle)])
    assert result.exit_code == 1
    assert "inputs:     x float32['batch', 16]" in result.output  # what could be read is shown
    lines = result.output.splitlines()
    assert any("eval_model.onnx" in line and "CORRUPTED" in line for line in lines)
    assert any("inference.onnx" in line and "MISSING" in line for line in lines)
    assert any("training_model.onnx" in line and "CORRUPTED" not in line for line in lines)
    assert lines[-1].startswith("Error: ") and "eval_model.onnx, inference.onnx" in lines[-1]


def test_counts_read_in_the_singular_for_one():
    assert (count(1, "token"), count(0, "token"), count(2, "example")) == ("1 token", "0 tokens", "2 examples")


def test_small_sizes_read_in_kb():
    assert human_size(812) == "812 bytes"
    assert human_size(26_214) == "26.2 KB"
    assert human_size(48_300_000) == "48.3 MB"


def test_progress_off_a_terminal_prints_steps_with_their_loss(capsys):
    progress = Progress("training", interactive=False)
    for step in range(1, 21):
        progress.update(step, 20, 1.0 / step)
    progress.close()
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "training: step 1/20, loss 1.0000"
    assert lines[-1] == "training: step 20/20, loss 0.0500"
    assert 5 <= len(lines) <= 12 and not any("nan" in line for line in lines)


def test_progress_bar_never_shows_an_unknown_loss():
    import io

    stream = io.StringIO()
    progress = Progress("training", interactive=True)
    progress._bar = None
    import click

    original = click.progressbar

    def bar(*args, **kwargs):
        kwargs["file"] = stream
        return original(*args, **kwargs)

    click.progressbar = bar
    try:
        progress.update(1, 4, 0.5)
        progress.close()
    finally:
        click.progressbar = original
    assert "nan" not in stream.getvalue()


@pytest.mark.parametrize("with_checkpoint", [True, False])
def test_ctrl_c_says_where_the_progress_is(minilm_int8, austen_split, tmp_path, with_checkpoint):
    checkpoint = tmp_path / "ck"
    args = [sys.executable, "-m", "edgepeft.cli", "train", str(minilm_int8), "--data", str(austen_split[0]),
            "--epochs", "5"]  # fmt: skip
    if with_checkpoint:
        args += ["--checkpoint-dir", str(checkpoint), "--checkpoint-every", "1"]
    # SIGINT's default action in the child: a shell starting this suite in the background without job control
    # (`cmd &`) leaves SIGINT ignored, and an ignored SIGINT stays ignored in every process started under it
    child = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # fmt: skip
    try:
        assert child.stderr is not None
        line = child.stderr.readline()
        while "training: step" not in line:  # the first step is done
            assert line, "the run ended before its first step"
            line = child.stderr.readline()
        if with_checkpoint:
            deadline = time.monotonic() + 120
            while not (checkpoint / "progress.json").exists() and time.monotonic() < deadline:
                time.sleep(0.1)
        child.send_signal(signal.SIGINT)
        _, err = child.communicate(timeout=120)
    finally:
        child.kill()
    assert child.returncode == 130
    last = err.strip().splitlines()[-1]
    assert last.startswith("Error: interrupted")
    if with_checkpoint:
        assert str(checkpoint) in last and "resume" in last
    else:
        assert "nothing was saved" in last and "--checkpoint-dir" in last


def test_export_finds_a_factory_in_the_current_directory(tmp_path):
    (tmp_path / "my_model.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))\n"
        "    return model, {'x': torch.randn(2, 6)}\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "PYTHONPATH"}
    edgepeft = str(Path(sys.executable).with_name("edgepeft"))  # the installed command (`python -m` adds the cwd)
    run = subprocess.run([edgepeft, "export", "my_model:build", "--out", "bundle",
                          "--target-modules", "0", "--train-module", "2"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert (tmp_path / "bundle" / "manifest.json").is_file() and "KB" in run.stdout


def test_a_failure_inside_onnx_runtime_is_one_line_past_its_source_location(runner, mlp_bundle, tmp_path):
    """ORT's C++ core raises plain RuntimeErrors through pybind: the CLI shows one line, its status and message."""
    import hashlib
    import json

    import numpy as np
    import onnx
    from onnx import helper, numpy_helper

    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_bundle, bundle)
    model = onnx.load(bundle / "training_model.onnx")
    first = next(node for node in model.graph.node if "x" in node.input)
    first.input[:] = ["x/bad" if name == "x" else name for name in first.input]
    model.graph.initializer.append(numpy_helper.from_array(np.array([-1, 7], np.int64), "bad_shape"))
    model.graph.node.insert(0, helper.make_node("Reshape", ["x", "bad_shape"], ["x/bad"]))  # 16 values a row: fails
    onnx.save(model, bundle / "training_model.onnx")
    manifest = json.loads((bundle / "manifest.json").read_text())  # a graph the bundle's hash vouches for
    manifest["files"]["training_model.onnx"] = hashlib.sha256((bundle / "training_model.onnx").read_bytes()).hexdigest()
    (bundle / "manifest.json").write_text(json.dumps(manifest))
    np.savez(tmp_path / "d.npz", x=np.ones((8, 16), np.float32), labels=np.arange(8) % 4)
    result = runner.invoke(main, ["train", str(bundle), "--data", str(tmp_path / "d.npz"), "--epochs", "1"])
    assert result.exit_code == 1
    line = _one_error_line(result)
    assert line.startswith("Error: ONNX Runtime failed: ") and "Reshape" in line and "onnxruntime_src" not in line[:80]
