"""No output path destroys what is there: every writer refuses a folder of the user's files and the bundle itself.

Each writer is pointed at a directory holding a user's file: the file survives and the error names the path.
Writers also refuse any path equal to, inside, or holding the bundle being trained.
"""

from __future__ import annotations

import shutil

import numpy as np
import onnxruntime
import pytest

from edgepeft.errors import OutputError
from edgepeft.runtime import TrainConfig, TrainingSession, open_bundle
from edgepeft.runtime.store import AdapterStore


@pytest.fixture
def user_dir(tmp_path):
    """A folder of someone's files."""
    folder = tmp_path / "documents"
    folder.mkdir()
    (folder / "thesis.txt").write_text("four years of work")
    return folder


def _survives(folder) -> None:
    assert (folder / "thesis.txt").read_text() == "four years of work"
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.txt"]


def _bundle_intact(bundle, listing) -> None:
    assert sorted(p.name for p in bundle.iterdir()) == listing
    open_bundle(bundle)  # every file there, every checksum right


def test_save_adapter_refuses_a_folder_of_user_files(mlp_bundle, user_dir):
    session = TrainingSession(mlp_bundle)
    with pytest.raises(OutputError, match=f"refusing to replace {user_dir}: it is not empty and is not an adapter"):
        session.save_adapter(user_dir)
    _survives(user_dir)


def test_save_state_refuses_a_folder_of_user_files(mlp_bundle, user_dir):
    session = TrainingSession(mlp_bundle)
    with pytest.raises(OutputError, match=f"refusing to replace {user_dir}: .*not a training state"):
        session.save_state(user_dir)
    with pytest.raises(OutputError, match=str(user_dir)):
        session.train(session.dataset({"x": np.zeros((4, 16), np.float32)}, [0, 1, 2, 3]), TrainConfig(epochs=1),
                      checkpoint_dir=user_dir)  # fmt: skip
    _survives(user_dir)


def test_store_refuses_a_folder_of_user_files_and_an_adapter_name_that_is_a_user_folder(mlp_bundle, user_dir, tmp_path):
    session = TrainingSession(mlp_bundle)
    with pytest.raises(OutputError, match=f"refusing to replace {user_dir}: .*not an adapter store"):
        AdapterStore(user_dir, session.manifest)
    _survives(user_dir)
    store = AdapterStore(tmp_path / "store", session.manifest)
    shutil.move(user_dir, tmp_path / "store" / "alice")  # the user's folder, where adapter 'alice' would go
    with pytest.raises(OutputError, match=f"refusing to replace {tmp_path / 'store' / 'alice'}"):
        store.save("alice", session.trainable_values(), steps=0)
    _survives(tmp_path / "store" / "alice")
    assert store.list() == []


def test_export_inference_refuses_a_directory_and_a_file_that_is_not_onnx(mlp_bundle, user_dir):
    session = TrainingSession(mlp_bundle)
    with pytest.raises(OutputError, match=f"to {user_dir}: it is a directory"):
        session.export_inference(user_dir)
    with pytest.raises(OutputError, match=f"refusing to replace {user_dir / 'thesis.txt'}: it is not an ONNX model"):
        session.export_inference(user_dir / "thesis.txt")
    _survives(user_dir)
    model = session.export_inference(user_dir / "model.onnx")
    again = session.export_inference(model)  # an ONNX model is replaced by the new one
    onnxruntime.InferenceSession(str(again), providers=["CPUExecutionProvider"])
    assert sorted(p.name for p in user_dir.iterdir()) == ["model.onnx", "thesis.txt"]  # no temporary left


def test_export_refuses_a_folder_of_user_files_and_an_adapter_even_with_overwrite(mlp_bundle, user_dir, tmp_path):
    import tiny_models

    from edgepeft.export import LoraSpec, export

    model, example = tiny_models.mlp()
    lora = LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",))
    with pytest.raises(OutputError, match=f"refusing to replace {user_dir}: .*not a bundle"):
        export(model, user_dir, example_inputs=example, lora=lora, overwrite=True)
    _survives(user_dir)
    TrainingSession(mlp_bundle).save_adapter(tmp_path / "adapter")
    with pytest.raises(OutputError, match="not a bundle"):
        export(model, tmp_path / "adapter", example_inputs=example, lora=lora, overwrite=True)
    bundle = shutil.copytree(mlp_bundle, tmp_path / "bundle")
    with pytest.raises(OutputError, match=f"{bundle} already holds a bundle: pass overwrite=True"):
        export(model, bundle, example_inputs=example, lora=lora)
    export(model, bundle, example_inputs=example, lora=lora, overwrite=True)  # a bundle replaced by a bundle
    open_bundle(bundle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "bundle", "documents"]


def test_bench_and_demo_refuse_a_folder_of_user_files(user_dir):
    from edgepeft.bench.config import BenchConfig
    from edgepeft.bench.run import run_bench
    from edgepeft.demo import run_demo

    with pytest.raises(OutputError, match=f"refusing to replace {user_dir}: .*not a benchmark results directory"):
        run_bench(BenchConfig.smoke(), user_dir)
    with pytest.raises(OutputError, match=f"refusing to replace {user_dir}: .*not a demo directory"):
        run_demo(user_dir)
    _survives(user_dir)


def test_no_writer_touches_the_bundle_being_trained(mlp_bundle, tmp_path):
    bundle = shutil.copytree(mlp_bundle, tmp_path / "work" / "bundle")
    listing = sorted(p.name for p in bundle.iterdir())
    session = TrainingSession(bundle)
    for target in (bundle, bundle / "adapter"):
        with pytest.raises(OutputError, match=f"to {target}: it is inside the bundle {bundle}"):
            session.save_adapter(target)
        with pytest.raises(OutputError, match=f"to {target}: it is inside the bundle {bundle}"):
            session.save_state(target)
    with pytest.raises(OutputError, match=f"to {tmp_path / 'work'}: it holds the bundle {bundle}"):
        session.save_adapter(tmp_path / "work")
    for target in (bundle / "inference.onnx", bundle / "new.onnx"):
        with pytest.raises(OutputError, match=f"to {target}: it is inside the bundle {bundle}"):
            session.export_inference(target)
    with pytest.raises(OutputError, match="inside the bundle"):
        AdapterStore(bundle / "adapters", session.manifest, protect=(bundle,))
    with pytest.raises(OutputError, match="inside the bundle"):
        session.train(session.dataset({"x": np.zeros((4, 16), np.float32)}, [0, 1, 2, 3]), TrainConfig(epochs=1),
                      checkpoint_dir=bundle / "state")  # fmt: skip
    _bundle_intact(bundle, listing)


def test_empty_directories_and_outputs_of_the_same_kind_are_written(mlp_bundle, tmp_path):
    session = TrainingSession(mlp_bundle)
    for name in ("adapter", "state", "store"):
        (tmp_path / name).mkdir()
    session.save_adapter(tmp_path / "adapter")
    session.set_trainable({k: v + 1 for k, v in session.trainable_values().items()})
    session.save_adapter(tmp_path / "adapter")  # an adapter replaced by an adapter
    loaded = TrainingSession(mlp_bundle)
    loaded.load_adapter(tmp_path / "adapter")
    for name, value in session.trainable_values().items():
        np.testing.assert_array_equal(loaded.trainable_values()[name], value)
    session.save_state(tmp_path / "state")
    session.save_state(tmp_path / "state")  # a state updated in place
    assert TrainingSession(mlp_bundle, state=tmp_path / "state").step == session.step
    store = AdapterStore(tmp_path / "store", session.manifest)
    store.save("a", session.trainable_values(), steps=0)
    assert [i.name for i in AdapterStore(tmp_path / "store", session.manifest).list()] == ["a"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "state", "store"]  # nothing hidden left
    with pytest.raises(OutputError, match=f"refusing to write an adapter to {tmp_path / 'state' / 'progress.json'}"):
        session.save_adapter(tmp_path / "state" / "progress.json")


def test_every_cli_output_path_keeps_a_users_folder_and_the_bundle(mlp_bundle, user_dir, tmp_path):
    """Through the CLI: each output flag pointed at a folder of the user's files, or at the bundle, is refused
    with the path named; the files survive, and the bundle given as --adapter-out still trains."""
    from click.testing import CliRunner

    from edgepeft.cli import main

    bundle = tmp_path / "bundle"
    shutil.copytree(mlp_bundle, bundle)
    listing = sorted(p.name for p in bundle.iterdir())
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", x=rng.normal(size=(16, 16)).astype(np.float32), labels=np.arange(16) % 4)
    train = ["train", str(bundle), "--data", str(tmp_path / "d.npz"), "--epochs", "1"]
    runner = CliRunner()
    for target in (user_dir, bundle, bundle / "inside"):
        for flag in ("--adapter-out", "--state-out", "--checkpoint-dir", "--store"):
            result = runner.invoke(main, [*train, flag, str(target)])
            assert result.exit_code == 1, (flag, target, result.output)
            assert result.output.strip().splitlines()[-1].startswith("Error: ") and str(target) in result.output
        _survives(user_dir)
        _bundle_intact(bundle, listing)
    result = runner.invoke(main, ["export", "tiny_models:mlp", "--out", str(user_dir), "--target-modules", "fc1",
                                  "--overwrite"])  # fmt: skip
    assert result.exit_code == 1 and str(user_dir) in result.output
    for command in (["demo", "--out", str(user_dir)], ["bench", "--smoke", "--out", str(user_dir)]):
        result = runner.invoke(main, command)
        assert result.exit_code == 1 and str(user_dir) in result.output, result.output
    result = runner.invoke(main, [*train, "--report", str(user_dir / "thesis.txt")])
    assert result.exit_code == 1 and "not an edgepeft report" in result.output
    _survives(user_dir)
    # JSON that is not a report: the bundle's own manifest, a user's settings
    (user_dir / "settings.json").write_text('{"theme": "dark"}', encoding="utf-8")
    for target in (bundle / "manifest.json", user_dir / "settings.json"):
        before = target.read_bytes()
        result = runner.invoke(main, [*train, "--report", str(target)])
        assert result.exit_code == 1 and "not an edgepeft report" in result.output and str(target) in result.output
        assert target.read_bytes() == before
    _bundle_intact(bundle, listing)
    report = tmp_path / "report.json"  # an earlier report is replaced by the next
    for _ in range(2):
        result = runner.invoke(main, [*train, "--report", str(report)])
        assert result.exit_code == 0, result.output
    same = tmp_path / "same"  # two outputs in one directory: refused before any training, nothing written
    result = runner.invoke(main, [*train, "--adapter-out", str(same), "--state-out", str(same)])
    assert result.exit_code == 2 and "--adapter-out and --state-out name the same directory" in result.output
    assert not same.exists()
    result = runner.invoke(main, [*train, "--adapter-out", str(tmp_path / "adapter")])  # the bundle still works
    assert result.exit_code == 0, result.output
    _bundle_intact(bundle, listing)
