"""The Flower ClientApp: the device side. Torch-free; replies only adapter tensors and metrics.

`app` reads its `FedSettings` from the run config (a Flower app project, `flwr run`); `make_client_app(settings)`
closes over them (the simulation). The SecAgg+ variant (`make_secagg_client_app`) is a legacy NumPyClient,
since Flower 1.42's `secaggplus_mod` reads the legacy reply layout.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from edgepeft.federated import device  # first: loads ONNX Runtime's training API torch-free
from edgepeft.federated.arrays import from_ordered, from_record, nbytes, ordered, to_record
from edgepeft.federated.settings import FedSettings

from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict  # noqa: E402
from flwr.clientapp import ClientApp  # noqa: E402
from flwr.clientapp.mod import LocalDpMod, fixedclipping_mod  # noqa: E402

logger = logging.getLogger(__name__)

# what a reply may hold: one ArrayRecord of the trainable adapter tensors, one MetricRecord of these metrics
TRAIN_METRICS = ("num-examples", "unit-weight", "train-loss", "train-seconds", "upload-bytes")
EVAL_METRICS = ("num-examples", "eval-loss", "eval-accuracy")


def _settings(fixed: FedSettings | None, context: Context) -> FedSettings:
    return fixed if fixed is not None else FedSettings.from_run_config(dict(context.run_config))


def _partition(context: Context) -> int:
    try:
        return int(context.node_config["partition-id"])
    except KeyError:
        raise ValueError("this SuperNode has no `partition-id` in its node config (--node-config "
                         "'partition-id=0 num-partitions=N')") from None  # fmt: skip


def _record(settings: FedSettings, name: str, start: dict[str, np.ndarray], values: dict[str, np.ndarray]) -> None:
    """Tests: write what this client really computed (its new values and update), to compare with what the
    server receives."""
    if settings.record_dir:
        path = Path(settings.record_dir) / f"{name}.npz"
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, **{f"values/{k}": v for k, v in values.items()},
                 **{f"update/{k}": values[k] - start[k] for k in values})  # fmt: skip


def make_client_app(settings: FedSettings | None = None) -> ClientApp:
    """A message-API ClientApp (`@app.train()`, `@app.evaluate()`), with the run's privacy mod."""

    def privacy_mod(msg: Message, context: Context, call_next):
        s = _settings(settings, context)
        if s.privacy == "central" and msg.metadata.message_type.startswith("train"):
            return fixedclipping_mod(msg, context, call_next)
        if s.privacy == "local" and msg.metadata.message_type.startswith("train"):
            return LocalDpMod(s.clip, s.clip, s.local_epsilon, s.delta)(msg, context, call_next)
        return call_next(msg, context)

    app = ClientApp(mods=[privacy_mod])

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        s = _settings(settings, context)
        partition = _partition(context)
        session = device.session(s)
        start = from_record(msg.content["arrays"], session.manifest)
        server_round = int(msg.content["config"].get("server-round", 0)) if "config" in msg.content else 0
        result = device.train_round(s, partition, start, server_round)
        _record(s, f"client-{partition}-round-{server_round}", start, result.values)
        metrics = MetricRecord({"num-examples": result.examples, "unit-weight": 1, "train-loss": result.loss,
                                "train-seconds": result.seconds, "upload-bytes": nbytes(result.values)})  # fmt: skip
        device.assert_torch_free()
        return Message(RecordDict({"arrays": to_record(result.values), "metrics": metrics}), reply_to=msg)

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        s = _settings(settings, context)
        session = device.session(s)
        values = from_record(msg.content["arrays"], session.manifest)
        examples, loss, accuracy = device.evaluate_local(s, _partition(context), values)
        metrics = MetricRecord({"num-examples": examples, "eval-loss": loss, "eval-accuracy": accuracy})
        device.assert_torch_free()
        return Message(RecordDict({"metrics": metrics}), reply_to=msg)

    return app


def make_secagg_client_app(settings: FedSettings | None = None) -> ClientApp:
    """A legacy NumPyClient ClientApp behind `secaggplus_mod` (and `fixedclipping_mod` for central DP)."""
    from flwr.client import NumPyClient
    from flwr.client.mod import fixedclipping_mod as legacy_clipping_mod
    from flwr.client.mod import secaggplus_mod

    class AdapterClient(NumPyClient):
        def __init__(self, s: FedSettings, partition: int) -> None:
            self.s, self.partition = s, partition
            self.session = device.session(s)

        def get_parameters(self, config):
            return ordered(self.session.trainable_values())

        def fit(self, parameters, config):
            start = from_ordered(parameters, self.session.manifest)
            server_round = int(config.get("server-round", 0))
            result = device.train_round(self.s, self.partition, start, server_round)
            _record(self.s, f"client-{self.partition}-round-{server_round}", start, result.values)
            device.assert_torch_free()
            return ordered(result.values), result.examples, {"train-loss": result.loss,
                                                             "upload-bytes": nbytes(result.values)}  # fmt: skip

        def evaluate(self, parameters, config):
            values = from_ordered(parameters, self.session.manifest)
            examples, loss, accuracy = device.evaluate_local(self.s, self.partition, values)
            return loss, examples, {"eval-accuracy": accuracy}

    def client_fn(context: Context):
        s = _settings(settings, context)
        return AdapterClient(s, _partition(context)).to_client()

    mods = [secaggplus_mod]
    if settings is not None and settings.privacy == "central":
        mods.append(legacy_clipping_mod)
    return ClientApp(client_fn=client_fn, mods=mods)


app = make_client_app()  # `flwr run`: settings from the run config
