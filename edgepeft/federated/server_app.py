"""The Flower ServerApp: FedAvg over adapters in an ArrayRecord, optional DP (RDP-accounted) or SecAgg+.

The initial adapter is the bundle's own; the final one is written in PEFT format to `out_dir/adapter`, with
`out_dir/report.json` (per round: centralized accuracy, epsilon, bytes a device uploads). The server opens
the bundle with the runtime only to evaluate and save the adapter (no torch either).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.federated import device  # first: loads ONNX Runtime's training API torch-free
from edgepeft.federated.arrays import from_ordered, from_record, nbytes, ordered, to_record
from edgepeft.federated.settings import FedSettings
from edgepeft.fileio import write_json_atomic
from edgepeft.runtime import TrainingSession

from flwr.app import ArrayRecord, ConfigRecord, Context, MetricRecord  # noqa: E402
from flwr.serverapp import Grid, ServerApp  # noqa: E402
from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping, FedAdam, FedAvg, FedAvgM  # noqa: E402

logger = logging.getLogger(__name__)


class _Evaluator:
    """Centralized accuracy of the global adapter on the server's held-out data, and the round log."""

    def __init__(self, settings: FedSettings) -> None:
        self.settings = settings
        self.session = TrainingSession(settings.bundle, threads=settings.threads)
        self.test = self.session.load_data(settings.test_data) if settings.test_data else None
        self.rounds: list[dict[str, Any]] = []
        self.accountant = None
        self.started = time.perf_counter()

    def __call__(self, server_round: int, values: dict[str, np.ndarray]) -> dict[str, float]:
        entry: dict[str, Any] = {"round": server_round, "seconds": round(time.perf_counter() - self.started, 3),
                                 "upload_bytes_per_device": nbytes(values)}  # fmt: skip
        if self.test is not None:
            self.session.set_trainable(values)
            report = self.session.evaluate(self.test, batch_size=64)
            entry.update(loss=float(report.loss), accuracy=report.accuracy)
        if self.accountant is not None and self.accountant.num_releases:
            spent = self.accountant.get_privacy_spent()
            entry.update(epsilon=spent.epsilon, delta=spent.delta)
        self.rounds.append(entry)
        logger.info("round %d: %s", server_round, entry)
        return {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k != "round"}

    def finish(self, values: dict[str, np.ndarray], extra: dict[str, Any]) -> dict[str, Any]:
        """Write the final adapter (PEFT format) and report.json to `out_dir`; return the report."""
        report = {"settings": self.settings.__dict__, "rounds": self.rounds, **extra}
        if self.settings.out_dir:
            out = Path(self.settings.out_dir)
            out.mkdir(parents=True, exist_ok=True)
            self.session.set_trainable(values)
            self.session.save_adapter(out / "adapter")
            write_json_atomic(out / "report.json", report)
        return report


def _record_received(settings: FedSettings, grid: Grid) -> Grid:
    """Tests: a Grid that writes every array the server receives to `record_dir/server-received-*.npz`."""
    if not settings.record_dir:
        return grid
    from flwr.common import bytes_to_ndarray

    count = [0]

    class Recording:
        def __getattr__(self, name):
            return getattr(grid, name)

        def send_and_receive(self, messages, *args, **kwargs):
            replies = list(grid.send_and_receive(messages, *args, **kwargs))
            for reply in replies:
                if reply.has_content():
                    arrays = {}
                    for rkey, record in reply.content.array_records.items():
                        for akey, array in record.items():
                            arrays[f"{rkey}/{akey}"] = array.numpy()
                    for rkey, record in reply.content.config_records.items():  # SecAgg+ ships vectors here
                        for ckey, value in record.items():
                            if not isinstance(value, list) or not value:
                                continue
                            if isinstance(value[0], bytes):  # serialized arrays (the masked vectors), else opaque
                                for i, item in enumerate(value):
                                    try:
                                        arrays[f"{rkey}/{ckey}/{i}"] = bytes_to_ndarray(item)
                                    except Exception:  # noqa: BLE001  (encrypted shares are not arrays)
                                        pass
                            elif isinstance(value[0], (int, float)):
                                arrays[f"{rkey}/{ckey}"] = np.asarray(value)
                    if arrays:
                        np.savez(Path(settings.record_dir) / f"server-received-{count[0]}.npz", **arrays)
                        count[0] += 1
            return replies

    Path(settings.record_dir).mkdir(parents=True, exist_ok=True)
    return Recording()  # type: ignore[return-value]


def make_strategy(settings: FedSettings) -> FedAvg:
    """Flower's FedAvg, FedAvgM or FedAdam (`settings.server_optimizer`), sampling `fraction_train` a round."""
    # Flower's RDP accounting holds only for an unweighted mean (every client's clipped update counts the same)
    weight = "unit-weight" if settings.privacy == "central" else "num-examples"
    low = min(settings.round_minimum, settings.clients_per_round)
    common: dict[str, Any] = dict(fraction_train=settings.fraction_train, fraction_evaluate=0.0, min_train_nodes=low,
                                  min_available_nodes=low, min_evaluate_nodes=0, weighted_by_key=weight)  # fmt: skip
    if settings.server_optimizer == "fedavgm":
        return FedAvgM(server_learning_rate=settings.server_lr, server_momentum=settings.server_momentum, **common)
    if settings.server_optimizer == "fedadam":
        return FedAdam(eta=settings.server_lr, eta_l=settings.learning_rate, tau=settings.server_tau, **common)
    return FedAvg(**common)


def run_fedavg(settings: FedSettings, grid: Grid) -> dict[str, Any]:
    """The message-API run: FedAvg (or FedAvgM / FedAdam), wrapped for central DP (client-side clipping, server
    noise, RDP)."""
    evaluator = _Evaluator(settings)
    manifest = evaluator.session.manifest
    initial = evaluator.session.trainable_values()
    per_round = settings.clients_per_round
    strategy: Any = make_strategy(settings)
    if settings.privacy == "central":
        from flwr.serverapp import RdpAccountant
        from flwr.supercore.privacy_accounting import NeighboringRelation, PrivacyConfig, SamplingMethod

        accountant = RdpAccountant(PrivacyConfig(
            target_delta=settings.delta, population_size=settings.num_partitions,
            neighboring_relation=NeighboringRelation.ADD_OR_REMOVE_ONE, sampling_method=SamplingMethod.NO_AMPLIFICATION,
        ))  # fmt: skip
        strategy = DifferentialPrivacyClientSideFixedClipping(strategy, settings.noise_multiplier, settings.clip,
                                                               per_round, accountant=accountant)  # fmt: skip
        evaluator.accountant = accountant

    def evaluate_fn(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        return MetricRecord(evaluator(server_round, from_record(arrays, manifest)))

    result = strategy.start(grid=grid, initial_arrays=to_record(initial), num_rounds=settings.rounds,
                            timeout=settings.round_timeout, train_config=ConfigRecord({}),
                            evaluate_fn=evaluate_fn)  # fmt: skip
    final = from_record(result.arrays, manifest)
    train_metrics = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
    return evaluator.finish(final, {"train_metrics": train_metrics, "engine": settings.server_optimizer})


def run_secagg(settings: FedSettings, grid: Grid, context: Context) -> dict[str, Any]:
    """SecAgg+ (legacy strategy API): the server sees only masked vectors and their sum."""
    from flwr.common import ndarrays_to_parameters
    from flwr.server import LegacyContext, ServerConfig
    from flwr.server.strategy import FedAvg as LegacyFedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    evaluator = _Evaluator(settings)
    manifest = evaluator.session.manifest
    initial = evaluator.session.trainable_values()
    per_round = settings.clients_per_round

    def evaluate_fn(server_round, arrays, config):
        metrics = evaluator(server_round, from_ordered(list(arrays), manifest))
        return metrics.get("loss", 0.0), metrics

    strategy = LegacyFedAvg(
        fraction_fit=settings.fraction_train, fraction_evaluate=0.0, min_fit_clients=per_round,
        min_available_clients=per_round, min_evaluate_clients=0, evaluate_fn=evaluate_fn,
        initial_parameters=ndarrays_to_parameters(ordered(initial)),
        on_fit_config_fn=lambda server_round: {"server-round": server_round},
    )  # fmt: skip
    legacy = LegacyContext(context=context, config=ServerConfig(num_rounds=settings.rounds), strategy=strategy)
    largest = max(len(p) for p in device._parts(settings.bundle, settings.train_data, settings.threads,
                                                  settings.num_partitions, settings.alpha, settings.partition_seed))
    # fine quantization: modulus 2^32 holds the sum of `per_round` values below 2^32 / per_round
    secagg = SecAggPlusWorkflow(num_shares=max(3, min(per_round, 10)), reconstruction_threshold=max(2, min(per_round, 10) // 2 + 1),
                                max_weight=float(largest), clipping_range=8.0,
                                quantization_range=(2**32 // (per_round + 1)) // 2 * 2)  # fmt: skip
    DefaultWorkflow(fit_workflow=secagg)(_record_received(settings, grid), legacy)
    arrays = legacy.state.array_records["parameters"].to_numpy_ndarrays()
    final = from_ordered([a.astype(np.float32) for a in arrays], manifest)
    return evaluator.finish(final, {"engine": "secagg+"})


def make_server_app(settings: FedSettings | None = None) -> ServerApp:
    """A ServerApp running `settings` (None: read from the run config)."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        s = settings if settings is not None else FedSettings.from_run_config(dict(context.run_config))
        if s.secagg:
            run_secagg(s, grid, context)
        else:
            run_fedavg(s, _record_received(s, grid) if s.record_dir else grid)

    return app


app = make_server_app()  # `flwr run`: settings from the run config
