"""The device runtime never imports torch: it opens, trains, evaluates and saves with torch blocked."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

# A device process: any import of torch fails (also imported by the other tests that train with torch blocked).
TORCH_BLOCKED = textwrap.dedent(
    """
    import importlib.abc, json, sys

    class NoTorch(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "torch" or name.startswith("torch."):
                raise ImportError(f"torch is blocked on this device: {name}")

    sys.meta_path.insert(0, NoTorch())
    sys.modules["torch"] = None
    """
)

DEVICE_SCRIPT = TORCH_BLOCKED + textwrap.dedent(
    """
    from edgepeft.runtime import TrainConfig, TrainingSession

    bundle, train_csv, test_csv, adapter = sys.argv[1:5]
    session = TrainingSession(bundle)
    train = session.load_data(train_csv)
    before = session.trainable_values()
    report = session.train(train.take(list(range(24))), TrainConfig(epochs=1, batch_size=8))
    result = session.evaluate(session.load_data(test_csv).take(list(range(32))))
    session.save_adapter(adapter)
    moved = any((before[k] != v).any() for k, v in session.trainable_values().items())
    loaded = sorted(m for m in sys.modules if m == "torch" or m.startswith("torch."))
    print(json.dumps({"steps": report.steps, "accuracy": result.accuracy, "moved": moved,
                      "torch_modules": [m for m in loaded if sys.modules[m] is not None]}))
    """
)


def test_runtime_trains_with_torch_blocked(minilm_int8, austen_split, tmp_path):
    adapter = tmp_path / "adapter"
    run = subprocess.run(
        [sys.executable, "-c", DEVICE_SCRIPT, str(minilm_int8), *map(str, austen_split), str(adapter)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["steps"] == 3 and result["moved"] and result["torch_modules"] == []
    assert 0.0 <= result["accuracy"] <= 1.0
    assert (adapter / "adapter_model.safetensors").stat().st_size > 0


def test_importing_the_runtime_loads_no_torch():
    code = "import sys, edgepeft.runtime, edgepeft.runtime.ort as o; o.training_api(); import edgepeft.cli; print('torch' in sys.modules)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.strip() == "False"


CLI_SCRIPT = textwrap.dedent(
    """
    import importlib.util, json, sys
    from edgepeft.cli import main

    assert importlib.util.find_spec("torch") is not None, "this test needs torch installed"
    try:
        main(sys.argv[1:], prog_name="edgepeft")
    except SystemExit as e:
        code = e.code
    print(json.dumps({"code": code, "torch": sys.modules.get("torch") is not None}))
    """
)


def _device_command(*args: str) -> dict:
    run = subprocess.run([sys.executable, "-c", CLI_SCRIPT, *args], capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-2000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_device_commands_never_load_torch_where_it_is_installed(minilm_int8, austen_split, tmp_path):
    """Each device command, run in a process where torch is importable, finishes with torch not loaded."""
    train_csv, test_csv = austen_split
    small = tmp_path / "small.csv"
    small.write_text("".join(train_csv.read_text().splitlines(keepends=True)[:17]))
    adapter, store, report = tmp_path / "adapter", tmp_path / "store", tmp_path / "train.json"
    commands = [
        ["train", str(minilm_int8), "--data", str(small), "--epochs", "1", "--adapter-out", str(adapter),
         "--report", str(report)],
        ["eval", str(minilm_int8), "--data", str(small), "--adapter", str(adapter)],
        ["predict", str(minilm_int8), "--text", "Mr. Darcy bowed.", "--adapter", str(adapter)],
        ["train", str(minilm_int8), "--data", str(small), "--epochs", "1", "--store", str(store), "--name", "me",
         "--eval-every", "1"],
        ["adapters", "list", str(store), "--bundle", str(minilm_int8)],
        ["adapters", "activate", str(store), "me", "--bundle", str(minilm_int8)],
        ["adapters", "export", str(store), "me", "--bundle", str(minilm_int8), "--out", str(tmp_path / "me.onnx")],
        ["inspect", str(minilm_int8)],
        ["inspect", str(adapter)],
    ]  # fmt: skip
    for command in commands:
        result = _device_command(*command)
        assert result == {"code": 0, "torch": False}, command
    assert json.loads(report.read_text())["torch_loaded"] is False
