"""Flower's Simulation Engine (Ray, offline, 127.0.0.1): non-IID clients, SecAgg+ against plain FedAvg, DP."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from fed_helpers import write_blobs  # noqa: E402
from test_federated import blobs, ffa_bundle  # noqa: E402,F401  (fixtures)

from edgepeft.federated.settings import FedSettings  # noqa: E402
from edgepeft.federated.simulation import simulate  # noqa: E402


def _settings(bundle: Path, data: tuple[Path, Path], out: Path, **kw) -> FedSettings:
    base = dict(bundle=str(bundle), train_data=str(data[0]), test_data=str(data[1]), learning_rate=1e-2,
                out_dir=str(out), num_partitions=4, rounds=1)  # fmt: skip
    return FedSettings(**{**base, **kw})


def _final(bundle: Path, out: Path) -> dict[str, np.ndarray]:
    from edgepeft.runtime import TrainingSession

    session = TrainingSession(bundle)
    session.load_adapter(out / "adapter")  # the final adapter, in PEFT format
    return session.trainable_values()


def test_hundred_non_iid_clients_improve_the_adapter(ffa_bundle, blobs, tmp_path):
    report = simulate(_settings(ffa_bundle, blobs, tmp_path / "out", num_partitions=100, rounds=2, alpha=0.3))
    accuracy = [r["accuracy"] for r in report["rounds"]]
    assert [r["round"] for r in report["rounds"]] == [0, 1, 2]
    assert accuracy[-1] > accuracy[0] + 0.1, accuracy
    assert len(report["train_metrics"]) == 2
    assert report["rounds"][-1]["upload_bytes_per_device"] == 2576  # lora_B of fc1, fc2 and the head, fp32
    assert (tmp_path / "out" / "adapter" / "adapter_model.safetensors").is_file()


def test_secagg_server_sees_only_masked_vectors_and_the_same_aggregate(ffa_bundle, blobs, tmp_path):
    plain = simulate(_settings(ffa_bundle, blobs, tmp_path / "plain", record_dir=str(tmp_path / "rec-plain")))
    secure = simulate(_settings(ffa_bundle, blobs, tmp_path / "secure", secagg=True,
                                record_dir=str(tmp_path / "rec-secure")))  # fmt: skip
    a, b = _final(ffa_bundle, tmp_path / "plain"), _final(ffa_bundle, tmp_path / "secure")
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-5
    assert plain["rounds"][-1]["accuracy"] == pytest.approx(secure["rounds"][-1]["accuracy"], abs=0.01)

    # the same check on the plain run finds every client's upload: the recording and the check work
    assert _leaks(tmp_path / "rec-plain") == 4
    assert _leaks(tmp_path / "rec-secure") == 0
    masked = []
    for path in (tmp_path / "rec-secure").glob("server-received-*.npz"):
        with np.load(path) as f:
            masked += [f[k] for k in f.files if "masked" in k]
    assert len(masked) == 4 * 5  # each client's masked weight and its 4 weighted arrays: all the server saw of them


def _client_vectors(rec: Path) -> list[np.ndarray]:
    """Each client's uploaded values and its update, as one vector each (arrays in name order)."""
    out = []
    for path in sorted(rec.glob("client-*.npz")):
        with np.load(path) as f:
            for kind in ("values", "update"):
                keys = sorted(k for k in f.files if k.startswith(kind + "/"))
                out.append(np.concatenate([f[k].ravel() for k in keys]).astype(np.float64))
    return out


def _leaks(rec: Path) -> int:
    """How many arrays the server received equal, or correlate with, a client's values or update: |r| >= 0.3 and
    at least 5 standard errors of two unrelated vectors' r (5 / sqrt(n)), so a short masked vector does not
    correlate by chance (a 128-long one reached r = -0.31, 3.6 standard errors, in one CI run).

    A received message's arrays are joined in name order; SecAgg+ vectors are compared on their common length."""
    clients = _client_vectors(rec)
    assert len(clients) == 8  # 4 clients x (values, update)
    found = 0
    for path in sorted(rec.glob("server-received-*.npz")):
        with np.load(path) as f:
            keys = sorted(f.files)
            joined = [np.concatenate([np.asarray(f[k], dtype=np.float64).ravel() for k in keys])]
            joined += [np.asarray(f[k], dtype=np.float64).ravel() for k in keys]
        hit = False
        for r in joined:
            for c in clients:
                n = min(len(r), len(c))
                if n < 8:
                    continue
                bar = max(0.3, 5 / np.sqrt(n))
                x, y = r[:n] - r[:n].mean(), c[:n] - c[:n].mean()
                denominator = np.sqrt((x * x).sum() * (y * y).sum())
                if np.allclose(r[:n], c[:n], atol=1e-6) or (denominator and abs((x * y).sum() / denominator) >= bar):
                    hit = True
        found += hit
    return found


def test_central_dp_reports_epsilon_per_round(ffa_bundle, blobs, tmp_path):
    report = simulate(_settings(ffa_bundle, blobs, tmp_path / "out", rounds=2, privacy="central",
                                noise_multiplier=1.0, clip=0.5))  # fmt: skip
    eps = [r["epsilon"] for r in report["rounds"][1:]]
    assert eps[0] == pytest.approx(4.73, abs=0.05) and eps[1] > eps[0]  # RDP, no amplification, delta 1e-5
    assert all(r["delta"] == 1e-5 for r in report["rounds"][1:])


def _round_records(rec: Path, rnd: int) -> dict[int, dict[str, np.ndarray]]:
    """What each client computed in round `rnd`: {partition: {"values/<name>": ..., "update/<name>": ...}}."""
    out = {}
    for path in rec.glob(f"client-*-round-{rnd}.npz"):
        with np.load(path) as f:
            out[int(path.name.split("-")[1])] = {k: f[k] for k in f.files}
    return out


def test_fedavgm_steps_with_server_momentum_not_the_plain_mean(ffa_bundle, blobs, tmp_path):
    from edgepeft.federated.device import local_data

    s = _settings(ffa_bundle, blobs, tmp_path / "out", rounds=2, server_optimizer="fedavgm", server_lr=1.0,
                  server_momentum=0.9, record_dir=str(tmp_path / "rec"))  # fmt: skip
    report = simulate(s)
    assert report["engine"] == "fedavgm"
    weights = {p: len(local_data(s, p)) for p in range(4)}
    r1, r2 = _round_records(tmp_path / "rec", 1), _round_records(tmp_path / "rec", 2)
    assert sorted(r1) == sorted(r2) == [0, 1, 2, 3]
    names = [k.split("/", 1)[1] for k in r1[0] if k.startswith("values/")]

    def start(records, name):  # the global adapter a round started from (every client got the same one)
        starts = [r[f"values/{name}"] - r[f"update/{name}"] for r in records.values()]
        assert all(np.allclose(x, starts[0], atol=1e-6) for x in starts)
        return starts[0]

    def mean(records, name):
        return sum(weights[p] * r[f"values/{name}"] for p, r in records.items()) / sum(weights.values())

    final = _final(ffa_bundle, tmp_path / "out")
    gaps = []
    for name in names:
        w0, w1 = start(r1, name), start(r2, name)
        g1 = w0 - mean(r1, name)  # round 1's pseudo-gradient; momentum starts at it, so w1 is the mean
        np.testing.assert_allclose(w1, w0 - g1, atol=1e-5)
        g2 = w1 - mean(r2, name)
        np.testing.assert_allclose(final[name], w1 - (0.9 * g1 + g2), atol=1e-5)  # heavy ball, server lr 1
        gaps.append(float(np.abs(final[name] - mean(r2, name)).max()))  # plain FedAvg's answer
    assert max(gaps) > 1e-3, gaps  # the momentum term is not negligible: ignoring the setting would fail above

