"""Flower's Deployment Engine on 127.0.0.1: a SuperLink and 3 SuperNodes as separate processes, one killed
mid-run; the run still completes its 3 rounds (judged from the server's report and logs, not `flwr run`'s
exit code). Every process started here is killed by its id at the end."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("flwr")

from test_federated import blobs, ffa_bundle  # noqa: E402,F401  (fixtures)

from edgepeft.federated.app_project import write_app_project  # noqa: E402
from edgepeft.federated.settings import FedSettings  # noqa: E402
from edgepeft.federated.simulation import offline_environment  # noqa: E402

BIN = Path(sys.executable).parent


def _free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start(command: list[str], log: Path, env: dict) -> subprocess.Popen:
    """A Flower process in a session of its own, so it and the children it spawns are killed by its id."""
    return subprocess.Popen(command, stdout=log.open("w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env=env, start_new_session=True)  # fmt: skip


def _kill(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # SuperNodes may survive SIGTERM; their superexec children linger
    except ProcessLookupError:
        pass
    process.wait(timeout=10)


def _wait_for(path: Path, text: str, seconds: float) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text(errors="replace"):
            return True
        time.sleep(0.5)
    return False


def test_superlink_and_three_supernodes_finish_three_rounds_with_one_killed(ffa_bundle, blobs, tmp_path):
    home = tmp_path / "flwr-home"
    home.mkdir()
    env = {**os.environ, **offline_environment(home), "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    link, *node_ports = _free_ports(4)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "local-test"\n\n[superlink.local-test]\n'
                                      f'address = "127.0.0.1:{link}"\ninsecure = true\n')  # fmt: skip
    out = tmp_path / "out"
    settings = FedSettings(bundle=str(ffa_bundle), train_data=str(blobs[0]), test_data=str(blobs[1]), num_partitions=3,
                           rounds=3, learning_rate=1e-2, min_clients=2, round_timeout=20, out_dir=str(out))  # fmt: skip
    app = write_app_project(tmp_path / "app", settings)
    processes: list[subprocess.Popen] = []
    try:
        processes.append(_start([str(BIN / "flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(link),
                                 "--disable-runtime-dependency-installation", "--database", str(tmp_path / "state.db")],
                                tmp_path / "superlink.log", env))  # fmt: skip
        assert _wait_for(tmp_path / "superlink.log", "Uvicorn running", 30), (tmp_path / "superlink.log").read_text()
        for i, port in enumerate(node_ports):
            processes.append(_start([str(BIN / "flower-supernode"), "--insecure", "--superlink", f"127.0.0.1:{link}",
                                     "--port", str(port), "--node-config", f"partition-id={i} num-partitions=3"],
                                    tmp_path / f"node{i}.log", env))  # fmt: skip
        time.sleep(3)
        run_log = tmp_path / "run.log"
        run = _start([str(BIN / "flwr"), "run", str(app), "local-test", "--stream"], run_log, env)
        processes.append(run)
        assert _wait_for(run_log, "[ROUND 2/", 120), run_log.read_text()[-3000:]
        _kill(processes[3])  # SuperNode 2 dies as round 2 starts
        run.wait(timeout=150)
        report = json.loads((out / "report.json").read_text())
        log = run_log.read_text(errors="replace")
    finally:
        for process in processes:
            _kill(process)
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2, 3]
    assert report["rounds"][-1]["accuracy"] > report["rounds"][0]["accuracy"] + 0.3
    assert len(report["train_metrics"]) == 3 and "[ROUND 3/3]" in log
    # round 1 had all three SuperNodes; rounds 2 and 3 went on with the two left
    assert log.count("Received 3 results") == 1 and log.count("Received 2 results") == 2, log[-3000:]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()
    assert all(p.poll() is not None for p in processes)
