"""The data never leaves the device: a full cycle runs with every network socket refused for the process."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

OFFLINE_CYCLE = textwrap.dedent(
    """
    import json, socket, sys

    attempts = []

    class NoNetwork(socket.socket):
        def __init__(self, family=-1, *args, **kwargs):
            if family in (socket.AF_INET, socket.AF_INET6, -1):
                attempts.append(family)
                raise OSError("network disabled for this process")
            super().__init__(family, *args, **kwargs)

    def refuse(*args, **kwargs):
        attempts.append(args[:1])
        raise OSError("network disabled for this process")

    socket.socket = NoNetwork
    socket.create_connection = refuse
    socket.getaddrinfo = refuse
    sys.modules["torch"] = None

    from edgepeft.runtime import TrainConfig, TrainingSession
    from edgepeft.runtime.store import AdapterStore

    bundle, train_csv, test_csv, out = sys.argv[1:5]
    session = TrainingSession(bundle)
    train = session.load_data(train_csv).take(list(range(16)))
    session.train(train, TrainConfig(epochs=1), checkpoint_dir=out + "/ckpt", checkpoint_every=1)
    result = session.evaluate(session.load_data(test_csv).take(list(range(16))))
    labels = session.predict(["It is a truth universally acknowledged."]).labels
    session.save_adapter(out + "/adapter")
    AdapterStore(out + "/store", session.manifest).save("me", session.trainable_values(), steps=session.step)
    session.load_adapter(out + "/adapter")
    print(json.dumps({"attempts": len(attempts), "accuracy": result.accuracy, "label": labels[0]}))
    """
)


def _network_namespace() -> list[str]:
    """`unshare -n`: a new network namespace with no usable interface, when this machine allows it."""
    if shutil.which("unshare") and subprocess.run(["unshare", "-n", "true"], check=False).returncode == 0:
        return ["unshare", "-n"]
    pytest.skip("unshare -n is not permitted here")


@pytest.mark.parametrize("isolation", ["sockets refused", "network namespace"])
def test_train_eval_predict_save_with_networking_disabled(minilm_int8, austen_split, tmp_path, isolation):
    prefix = _network_namespace() if isolation == "network namespace" else []
    run = subprocess.run(
        [*prefix, sys.executable, "-c", OFFLINE_CYCLE, str(minilm_int8), *map(str, austen_split), str(tmp_path)],
        capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["attempts"] == 0
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "store" / "me" / "adapter_model.safetensors").exists()
