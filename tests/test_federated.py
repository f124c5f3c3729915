"""Federated adapters on Flower: partitions, messages, FFA-LoRA bundles, the device side torch-free."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from conftest import export_tiny  # noqa: E402
from fed_helpers import write_blobs  # noqa: E402
from test_no_torch import TORCH_BLOCKED  # noqa: E402

from edgepeft.errors import AdapterError, InputError  # noqa: E402
from edgepeft.federated.partition import dirichlet_partition  # noqa: E402
from edgepeft.federated.settings import FedSettings  # noqa: E402


@pytest.fixture(scope="session")
def ffa_bundle(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ffa") / "bundle"
    export_tiny("mlp", out, freeze_a=True)
    return out


@pytest.fixture(scope="session")
def blobs(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("blobs")
    return write_blobs(root / "train.npz", 400, 0), write_blobs(root / "test.npz", 200, 1)


def test_dirichlet_partition_is_a_seeded_non_iid_split():
    labels = np.repeat(np.arange(6), 300)
    parts = dirichlet_partition(labels, 100, 0.3, seed=0)
    assert len(parts) == 100 and all(len(p) for p in parts)
    joined = np.concatenate(parts)
    assert sorted(joined.tolist()) == list(range(len(labels)))  # every example exactly once
    top_share = [np.bincount(labels[p], minlength=6).max() / len(p) for p in parts]
    assert np.mean(top_share) > 0.6  # mostly one or two classes per client (IID would be ~1/6)
    again = dirichlet_partition(labels, 100, 0.3, seed=0)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    iid = dirichlet_partition(labels, 10, 1000.0, seed=0)
    assert np.mean([np.bincount(labels[p], minlength=6).max() / len(p) for p in iid]) < 0.3
    with pytest.raises(InputError, match="cannot split 1800 examples over 2000 clients"):
        dirichlet_partition(labels, 2000, 0.3)


def test_settings_travel_as_a_run_config_and_refuse_bad_values():
    s = FedSettings(bundle="b", train_data="t", num_partitions=5, privacy="central", noise_multiplier=0.8)
    assert FedSettings.from_run_config(s.to_run_config()) == s
    assert all(isinstance(v, (str, int, float, bool)) for v in s.to_run_config().values())
    with pytest.raises(InputError, match="`privacy` must be one of"):
        FedSettings(bundle="b", train_data="t", num_partitions=5, privacy="strong")
    with pytest.raises(InputError, match="lacks"):
        FedSettings.from_run_config({"edgepeft-bundle": "b"})


def test_ffa_bundle_freezes_lora_a_and_its_adapter_round_trips(ffa_bundle, blobs, tmp_path):
    from edgepeft.runtime import TrainConfig, TrainingSession

    session = TrainingSession(ffa_bundle)
    m = session.manifest
    assert m.frozen_adapter and all(".lora_A." in p.adapter_key for p in m.frozen_adapter)
    assert not any(".lora_A." in p.adapter_key for p in m.trainable) and m.schema_version == 4
    a_before, b_before = session.frozen_adapter_values(), session.trainable_values()
    session.train(session.load_data(blobs[0]), TrainConfig(batch_size=16, learning_rate=1e-2))
    assert all(np.array_equal(session.frozen_adapter_values()[k], v) for k, v in a_before.items())
    assert all(not np.array_equal(session.trainable_values()[k], v) for k, v in b_before.items())
    adapter = session.save_adapter(tmp_path / "adapter")
    from safetensors.numpy import load_file

    keys = set(load_file(str(adapter / "adapter_model.safetensors")))
    assert {p.adapter_key for p in (*m.trainable, *m.frozen_adapter)} == keys  # a full PEFT adapter: A and B
    other = TrainingSession(ffa_bundle)
    other.load_adapter(adapter)
    assert all(np.array_equal(other.trainable_values()[k], v) for k, v in session.trainable_values().items())
    # an adapter whose A is not the bundle's cannot be computed by it: refused
    from safetensors.numpy import save_file

    tensors = load_file(str(adapter / "adapter_model.safetensors"))
    key = m.frozen_adapter[0].adapter_key
    tensors[key] = tensors[key] + 0.1
    save_file(tensors, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(AdapterError, match="differs from this bundle's fixed"):
        other.load_adapter(adapter)


def test_freeze_a_keeps_the_base_fingerprint(ffa_bundle, mlp_bundle):
    from edgepeft.manifest import Manifest

    assert Manifest.load(ffa_bundle).base_fingerprint == Manifest.load(mlp_bundle).base_fingerprint
    assert not Manifest.load(mlp_bundle).frozen_adapter


CLIENT_SCRIPT = TORCH_BLOCKED + textwrap.dedent(
    """
    from flwr.app import ConfigRecord, Context, Message, RecordDict, RecordDict as State
    from edgepeft.federated.arrays import to_record
    from edgepeft.federated.client_app import TRAIN_METRICS, make_client_app
    from edgepeft.federated.settings import FedSettings
    from edgepeft.runtime import TrainingSession

    bundle, train = sys.argv[1:3]
    settings = FedSettings(bundle=bundle, train_data=train, num_partitions=4, learning_rate=1e-2)
    app = make_client_app(settings)
    start = TrainingSession(bundle).trainable_values()
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 7, 1  # what a SuperNode sets
    content = RecordDict({"arrays": to_record(start), "config": ConfigRecord({"server-round": 1})})
    msg = Message(content=content, dst_node_id=7, message_type="train")
    context = Context(run_id=1, node_id=7, node_config={"partition-id": 2}, state=State(), run_config={})
    reply = app(msg, context)
    arrays = {k: list(r.keys()) for k, r in reply.content.array_records.items()}
    metrics = {k: dict(r) for k, r in reply.content.metric_records.items()}
    moved = any(not (r["arrays"][n].numpy() == start[n]).all() for r in [reply.content.array_records] for n in start)
    print(json.dumps({"arrays": arrays, "metrics": metrics, "configs": list(reply.content.config_records.keys()),
                      "moved": moved, "allowed": list(TRAIN_METRICS),
                      "torch": [m for m in sys.modules if m.split(".")[0] == "torch" and sys.modules[m] is not None]}))
    """
)


def test_client_app_trains_torch_free_and_replies_only_adapter_tensors_and_metrics(ffa_bundle, blobs):
    from edgepeft.manifest import Manifest

    done = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, str(ffa_bundle), str(blobs[0])],
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout.strip().splitlines()[-1])
    manifest = Manifest.load(ffa_bundle)
    assert out["torch"] == [] and out["moved"]
    assert out["arrays"] == {"arrays": sorted(p.name for p in manifest.trainable)}  # B and head only, no lora_A
    assert out["configs"] == [] and list(out["metrics"]) == ["metrics"]
    assert set(out["metrics"]["metrics"]) <= set(out["allowed"])
    assert out["metrics"]["metrics"]["num-examples"] > 0
    assert out["metrics"]["metrics"]["upload-bytes"] == sum(4 * int(np.prod(p.shape)) for p in manifest.trainable)


def test_cli_federate_runs_a_simulation_and_reports(ffa_bundle, blobs, tmp_path):
    from click.testing import CliRunner

    from edgepeft.cli import main

    report = tmp_path / "report.json"
    args = ["federate", str(ffa_bundle), "--data", str(blobs[0]), "--test", str(blobs[1]), "--clients", "4",
            "--rounds", "1", "--lr", "1e-2", "--out", str(tmp_path / "out"), "--report", str(report)]  # fmt: skip
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output[-2000:]
    figures = json.loads(report.read_text())
    assert figures["accuracy"] > figures["accuracy_before"] and figures["upload_bytes_per_device_per_round"] == 2576
    assert (tmp_path / "out" / "adapter" / "adapter_config.json").is_file()
    again = CliRunner().invoke(main, args)  # the output directory now holds a run: refused, not overwritten
    assert again.exit_code == 1 and "is not empty" in again.output
    both = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "o2"), "--dp", "--local-dp"])
    assert both.exit_code == 2 and "--dp or --local-dp" in both.output
    momentum_dp = CliRunner().invoke(main, [*args[:-4], "--out", str(tmp_path / "o3"), "--dp",
                                            "--server-optimizer", "fedavgm"])  # fmt: skip
    assert momentum_dp.exit_code == 1 and "run with --server-optimizer 'fedavg'" in momentum_dp.output


def test_a_manifest_with_frozen_adapter_tensors_needs_schema_4(ffa_bundle):
    from edgepeft.errors import BundleError
    from edgepeft.manifest import Manifest

    data = json.loads((ffa_bundle / "manifest.json").read_text())
    assert Manifest.from_dict(data) == Manifest.load(ffa_bundle) and data["schema_version"] == 4
    data["schema_version"] = 3  # a runtime reading version 3 would save adapters without lora_A
    with pytest.raises(BundleError, match="version 3 has no `frozen_adapter`"):
        Manifest.from_dict(data)


def test_server_optimizers_refuse_dp_and_secagg_and_bad_values():
    base = dict(bundle="b", train_data="t", num_partitions=5)
    with pytest.raises(InputError, match="run with `server_optimizer` 'fedavg'"):
        FedSettings(**base, server_optimizer="fedavgm", privacy="central")
    with pytest.raises(InputError, match="run with `server_optimizer` 'fedavg'"):
        FedSettings(**base, server_optimizer="fedadam", secagg=True)
    with pytest.raises(InputError, match="`server_optimizer` must be one of"):
        FedSettings(**base, server_optimizer="sgd")
    with pytest.raises(InputError, match="`server_momentum` in"):
        FedSettings(**base, server_optimizer="fedavgm", server_momentum=1.0)
    s = FedSettings(**base, server_optimizer="fedadam", server_lr=1e-2, server_tau=1e-4)
    assert FedSettings.from_run_config(s.to_run_config()) == s
