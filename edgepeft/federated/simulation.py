"""Run a federation on Flower's Simulation Engine (Ray) on this machine, offline."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any

from edgepeft.errors import InputError
from edgepeft.federated.settings import FedSettings

logger = logging.getLogger(__name__)

OFFLINE_ENV = {
    "FLWR_TELEMETRY_ENABLED": "0",
    "FLWR_DISABLE_UPDATE_CHECK": "1",
    "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
}


def offline_environment(flwr_home: str | os.PathLike) -> dict[str, str]:
    """Flower's and Ray's settings for a machine with no network: no telemetry, update check or installs."""
    return {**OFFLINE_ENV, "FLWR_HOME": str(flwr_home)}


def simulate(settings: FedSettings, cpus: int = 2, cpus_per_client: float = 1.0) -> dict[str, Any]:
    """Run `settings` with `num_partitions` virtual SuperNodes on Ray; returns the server's report.

    The report (and the final PEFT adapter) are also in `settings.out_dir` when it is set.
    """
    from edgepeft.federated.client_app import make_client_app, make_secagg_client_app
    from edgepeft.federated.server_app import make_server_app

    home = tempfile.mkdtemp(prefix="edgepeft-flwr-")
    os.environ.update(offline_environment(home))
    out = settings.out_dir or str(Path(home) / "out")
    if Path(out).exists() and any(Path(out).iterdir()):
        raise InputError(f"the output directory {out} is not empty")
    settings = FedSettings(**{**settings.__dict__, "out_dir": out})
    client = make_secagg_client_app(settings) if settings.secagg else make_client_app(settings)
    from flwr.simulation import run_simulation

    run_simulation(
        server_app=make_server_app(settings), client_app=client, num_supernodes=settings.num_partitions,
        backend_config={"client_resources": {"num_cpus": cpus_per_client},
                        "init_args": {"num_cpus": cpus, "include_dashboard": False, "log_to_driver": False}},
    )  # fmt: skip
    report = Path(out) / "report.json"
    if not report.is_file():
        raise RuntimeError(f"the simulation ended without a report ({report}): see Flower's log above")
    return json.loads(report.read_text())
