"""Federated adapters on Flower's Simulation Engine: accuracy against centralized and clients alone, cost.

    python benchmarks/federated.py accuracy --clients 100 --rounds 10 --fraction 0.2 --out fed-bench
    python benchmarks/federated.py scale --clients 100 1000 --out fed-bench

`accuracy` exports MiniLM (the demo model) twice, FFA-LoRA (lora_A frozen) and plain LoRA, splits the Austen
train passages over the clients by Dirichlet(alpha), and compares on the Austen test split: FFA-LoRA
federated; FedAvg of A and B; FFA-LoRA with central DP (its epsilon); centralized training on the pooled
data with the same number of examples seen; and clients trained alone (a sample of them, as many passes over
their own data as the federation makes). `scale` times rounds and samples the peak RSS of the whole process
tree (driver + Ray workers) with the tiny MLP bundle, where Flower's and Ray's costs dominate.
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]


class TreeRss:
    """The peak summed RSS of this process and all its descendants, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total)
            time.sleep(0.2)

    def __enter__(self) -> TreeRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def _export(out: Path, freeze_a: bool, max_length: int, optimizer: str = "adamw") -> Path:
    from edgepeft.demo import minilm_path
    from edgepeft.export import ExportOptions, LoraSpec, export
    from conftest import AUSTEN_LABELS

    if not (out / "manifest.json").is_file():
        export(minilm_path(), out, lora=LoraSpec(freeze_a=freeze_a),
               options=ExportOptions(labels=AUSTEN_LABELS, max_length=max_length, optimizer=optimizer))  # fmt: skip
    return out


def _simulate(label: str, settings, results: dict, out: Path) -> dict:
    from edgepeft.federated.simulation import simulate

    with TreeRss() as rss:
        started = time.perf_counter()
        report = simulate(settings)
        seconds = time.perf_counter() - started
    rounds = report["rounds"]
    times = [b["seconds"] - a["seconds"] for a, b in zip(rounds, rounds[1:])]
    entry = {"accuracy": rounds[-1].get("accuracy"), "accuracy_per_round": [r.get("accuracy") for r in rounds],
             "epsilon": rounds[-1].get("epsilon"), "delta": rounds[-1].get("delta"),
             "upload_bytes_per_device_per_round": rounds[-1]["upload_bytes_per_device"],
             "seconds_total": round(seconds, 1), "seconds_per_round_median": round(float(np.median(times)), 2),
             "seconds_first_round": round(times[0], 2), "peak_rss_mb_tree": round(rss.peak / 2**20)}  # fmt: skip
    results[label] = entry
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(label, json.dumps(entry), flush=True)
    return entry


def accuracy(args) -> None:
    from edgepeft.demo import split_austen
    from edgepeft.federated.partition import dirichlet_partition
    from edgepeft.federated.settings import FedSettings
    from edgepeft.runtime import TrainConfig, TrainingSession

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    bundles = Path(args.bundles) if args.bundles else out  # exported once, reused by every --out
    bundles.mkdir(parents=True, exist_ok=True)
    train, test, _ = split_austen(out, seed=0)
    tag = "" if args.client_optimizer == "adamw" else f"-{args.client_optimizer}"  # the bundle's optimizer
    ffa = _export(bundles / f"minilm-ffa{tag}", True, args.max_length, args.client_optimizer)
    plain = _export(bundles / f"minilm-lora{tag}", False, args.max_length, args.client_optimizer)
    common = dict(train_data=str(train), test_data=str(test), num_partitions=args.clients, rounds=args.rounds,
                  fraction_train=args.fraction, alpha=args.alpha, learning_rate=args.lr, batch_size=args.batch_size,
                  local_epochs=args.local_epochs)  # fmt: skip
    server = dict(server_optimizer=args.server_optimizer, server_lr=args.server_lr,
                  server_momentum=args.server_momentum, server_tau=args.server_tau)  # fmt: skip
    runs = {
        "federated_ffa": FedSettings(bundle=str(ffa), out_dir=str(out / "run-ffa"), **common, **server),
        "federated_fedavg_ab": FedSettings(bundle=str(plain), out_dir=str(out / "run-ab"), **common, **server),
        "federated_ffa_dp": FedSettings(bundle=str(ffa), out_dir=str(out / "run-dp"), privacy="central",
                                        noise_multiplier=args.noise, clip=args.clip, **common),  # DP: FedAvg only
    }
    labels = args.only or list(runs) + ["centralized", "alone"]
    if args.central_steps:  # probes: centralized runs of a given length (e.g. the federation's sequential steps)
        labels = [f"centralized_{n}" for n in args.central_steps] + [x for x in labels if x != "centralized"]
    for label in labels:
        if label in results:
            continue
        if label in runs:
            _simulate(label, runs[label], results, out)
            continue
        session = TrainingSession(ffa, threads=2)
        data, test_data = session.load_data(train), session.load_data(test)
        start = session.trainable_values()
        passes = args.rounds * args.fraction * args.local_epochs  # passes over the data the federation makes
        if label.startswith("centralized"):  # pooled data, the same number of examples seen (or a probe's steps)
            bs = args.batch_size
            steps = int(label.split("_")[1]) if "_" in label else int(round(passes * len(data) / bs))
            started = time.perf_counter()
            session.train(data, TrainConfig(epochs=int(np.ceil(steps * bs / len(data))), batch_size=bs,
                                            learning_rate=args.lr, max_steps=steps))  # fmt: skip
            acc = session.evaluate(test_data, batch_size=64).accuracy
            results[label] = {"accuracy": acc, "steps": steps, "batch_size": bs,
                              "seconds": round(time.perf_counter() - started, 1)}  # fmt: skip
        else:  # clients alone: a sample of clients, each training on its own data only
            parts = dirichlet_partition(data.labels, args.clients, args.alpha, 0)
            chosen = np.random.default_rng(1).choice(args.clients, size=min(args.alone_sample, args.clients),
                                                     replace=False)  # fmt: skip
            accs = []
            for c in chosen:
                session.set_trainable(start)
                local = data.take(parts[c])
                session.train(local, TrainConfig(epochs=max(1, int(np.ceil(passes))), batch_size=args.batch_size,
                                                 learning_rate=args.lr))  # fmt: skip
                accs.append(session.evaluate(test_data, batch_size=64).accuracy)
            results[label] = {"accuracy_mean": float(np.mean(accs)), "accuracy_min": float(np.min(accs)),
                              "accuracy_max": float(np.max(accs)), "clients": [int(c) for c in chosen],
                              "epochs": int(np.ceil(passes))}  # fmt: skip
        (out / "results.json").write_text(json.dumps(results, indent=2))
        print(label, json.dumps(results[label]), flush=True)


def scale(args) -> None:
    from conftest import export_tiny
    from fed_helpers import write_blobs
    from edgepeft.federated.settings import FedSettings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    bundle = out / "mlp-ffa"
    if not (bundle / "manifest.json").is_file():
        export_tiny("mlp", bundle, freeze_a=True)
    train = write_blobs(out / "blobs-train.npz", max(args.clients) * 4, 0)
    test = write_blobs(out / "blobs-test.npz", 400, 1)
    for n in args.clients:
        s = FedSettings(bundle=str(bundle), train_data=str(train), test_data=str(test), num_partitions=n,
                        rounds=args.rounds, learning_rate=1e-2, out_dir=str(out / f"scale-{n}"))  # fmt: skip
        _simulate(f"scale_{n}_clients", s, results, out)
    (out / "scale.json").write_text(json.dumps(results, indent=2))


def tiny(args) -> None:
    """FFA-LoRA against FedAvg of A and B, with and without central DP, on the tiny MLP (seconds per run)."""
    from conftest import export_tiny
    from fed_helpers import write_blobs
    from edgepeft.federated.settings import FedSettings

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results: dict = {}
    bundles = {"ffa": out / "mlp-ffa", "ab": out / "mlp-ab"}
    for kind, bundle in bundles.items():
        if not (bundle / "manifest.json").is_file():
            export_tiny("mlp", bundle, freeze_a=kind == "ffa")
    train = write_blobs(out / "blobs-train.npz", 800, 0)
    test = write_blobs(out / "blobs-test.npz", 400, 1)
    for kind, bundle in bundles.items():
        for privacy in ("none", "central"):
            s = FedSettings(bundle=str(bundle), train_data=str(train), test_data=str(test), num_partitions=args.clients,
                            rounds=args.rounds, learning_rate=1e-2, privacy=privacy, noise_multiplier=args.noise,
                            clip=args.clip, out_dir=str(out / f"tiny-{kind}-{privacy}"))  # fmt: skip
            _simulate(f"tiny_{kind}_{privacy}", s, results, out)
    (out / "tiny.json").write_text(json.dumps(results, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("accuracy")
    a.add_argument("--clients", type=int, default=100)
    a.add_argument("--rounds", type=int, default=10)
    a.add_argument("--fraction", type=float, default=0.2)
    a.add_argument("--alpha", type=float, default=0.3)
    a.add_argument("--lr", type=float, default=2e-3)
    a.add_argument("--local-epochs", type=int, default=1)
    a.add_argument("--max-length", type=int, default=64)
    a.add_argument("--batch-size", type=int, default=8, help="clients' batch (and the centralized and alone runs')")
    a.add_argument("--central-steps", type=int, nargs="*", default=[],
                   help="instead of `centralized`: centralized runs of these many steps (labels centralized_N)")
    a.add_argument("--noise", type=float, default=1.0)
    a.add_argument("--clip", type=float, default=0.5)
    a.add_argument("--alone-sample", type=int, default=10)
    a.add_argument("--client-optimizer", default="adamw", choices=["adamw", "sgd"],
                   help="the bundles' training optimizer (clients and the centralized and alone baselines)")
    a.add_argument("--server-optimizer", default="fedavg", choices=["fedavg", "fedavgm", "fedadam"])
    a.add_argument("--server-lr", type=float, default=1.0)
    a.add_argument("--server-momentum", type=float, default=0.0)
    a.add_argument("--server-tau", type=float, default=1e-3)
    a.add_argument("--only", nargs="*")
    a.add_argument("--out", default="fed-bench")
    a.add_argument("--bundles", default="", help="where the MiniLM bundles are exported once (default: --out)")
    s = sub.add_parser("scale")
    s.add_argument("--clients", type=int, nargs="+", default=[100, 1000])
    s.add_argument("--rounds", type=int, default=3)
    s.add_argument("--out", default="fed-bench")
    t = sub.add_parser("tiny")
    t.add_argument("--clients", type=int, default=20)
    t.add_argument("--rounds", type=int, default=5)
    t.add_argument("--noise", type=float, default=1.0)
    t.add_argument("--clip", type=float, default=0.5)
    t.add_argument("--out", default="fed-bench")
    args = parser.parse_args()
    {"accuracy": accuracy, "scale": scale, "tiny": tiny}[args.command](args)


if __name__ == "__main__":
    main()
