"""`edgepeft federate`: a federated run of many simulated devices on Flower's Simulation Engine (this machine)."""

from __future__ import annotations

import importlib.util
import json

import click

from edgepeft.cli.app import Command
from edgepeft.cli.common import check_report, write_report
from edgepeft.errors import InputError


@click.command(name="federate", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(exists=True, dir_okay=False),
              help="Labelled training examples, split over the clients (CSV, JSONL or .npz).")
@click.option("--test", "test_data", type=click.Path(exists=True, dir_okay=False),
              help="Held-out examples the server scores the global adapter on after every round.")
@click.option("--out", required=True, type=click.Path(file_okay=False),
              help="New or empty directory: the final adapter (PEFT format) and report.json.")
@click.option("--clients", default=10, show_default=True, type=click.IntRange(1), help="Simulated devices.")
@click.option("--rounds", default=3, show_default=True, type=click.IntRange(1))
@click.option("--fraction", default=1.0, show_default=True, type=click.FloatRange(0, 1, min_open=True),
              help="Share of the clients that train in each round.")
@click.option("--alpha", default=0.3, show_default=True, type=float,
              help="Dirichlet alpha of the non-IID split over the labels (small: one or two labels per client).")
@click.option("--local-epochs", default=1, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1))
@click.option("--lr", default=1e-3, show_default=True, type=float, help="Learning rate on the devices.")
@click.option("--max-steps", default=0, show_default=True, type=click.IntRange(0),
              help="Optimizer steps per client and round (0: no limit).")
@click.option("--dp", is_flag=True, help="Central DP: clients clip their update, the server adds Gaussian noise "
              "and reports (epsilon, delta) with Flower's RDP accountant.")
@click.option("--local-dp", is_flag=True, help="Local DP: each client clips and noises its own upload.")
@click.option("--noise-multiplier", default=1.0, show_default=True, type=float)
@click.option("--clip", default=1.0, show_default=True, type=float, help="L2 clipping norm of a client's update.")
@click.option("--delta", default=1e-5, show_default=True, type=float)
@click.option("--local-epsilon", default=10.0, show_default=True, type=float)
@click.option("--secagg", is_flag=True, help="SecAgg+: the server sees only masked vectors and their sum.")
@click.option("--server-optimizer", default="fedavg", show_default=True,
              type=click.Choice(["fedavg", "fedavgm", "fedadam"]),
              help="How the server applies the round's mean update: Flower's FedAvg, FedAvgM (server momentum) or "
              "FedAdam. --dp and --secagg run FedAvg only. (FedAvgM and FedAdam lost to FedAvg on the Austen "
              "benchmark: benchmarks/FEDERATED.md.)")
@click.option("--server-lr", type=float, help="Server step size (default: 1.0; FedAdam: 1e-2).")
@click.option("--server-momentum", default=0.9, show_default=True, type=float, help="FedAvgM's server momentum.")
@click.option("--cpus", default=2, show_default=True, type=click.IntRange(1), help="CPUs Ray may use.")
@click.option("--report", type=click.Path(), help="Also write the report as JSON here.")
def federate(bundle: str, data: str, test_data: str | None, out: str, clients: int, rounds: int, fraction: float,
             alpha: float, local_epochs: int, batch_size: int, lr: float, max_steps: int, dp: bool, local_dp: bool,
             noise_multiplier: float, clip: float, delta: float, local_epsilon: float, secagg: bool,
             server_optimizer: str, server_lr: float | None, server_momentum: float, cpus: int,
             report: str | None) -> None:  # fmt: skip
    """Train one adapter of BUNDLE on --clients simulated devices, each holding a non-IID part of --data.

    Only the adapter's trainable tensors (with FFA-LoRA, a bundle exported with lora_A frozen: B and the head)
    and a few metrics leave a device; the report gives their bytes per round.
    """
    if dp and local_dp:
        raise click.UsageError("give --dp or --local-dp, not both")
    if importlib.util.find_spec("flwr") is None:
        raise InputError("federation needs Flower: pip install 'edgepeft[federated]' (Python 3.11)")
    check_report(report)
    from edgepeft.federated.settings import FedSettings
    from edgepeft.federated.simulation import simulate

    if server_lr is None:
        server_lr = 1e-2 if server_optimizer == "fedadam" else 1.0
    settings = FedSettings(
        bundle=bundle, train_data=data, test_data=test_data or "", num_partitions=clients, rounds=rounds,
        fraction_train=fraction, alpha=alpha, local_epochs=local_epochs, batch_size=batch_size, learning_rate=lr,
        max_steps=max_steps, privacy="central" if dp else "local" if local_dp else "none",
        noise_multiplier=noise_multiplier, clip=clip, delta=delta, local_epsilon=local_epsilon, secagg=secagg,
        server_optimizer=server_optimizer, server_lr=server_lr,
        server_momentum=server_momentum if server_optimizer == "fedavgm" else 0.0, out_dir=out,
    )  # fmt: skip
    result = simulate(settings, cpus=cpus)
    last = result["rounds"][-1]
    summary = {
        "rounds": rounds, "clients": clients, "clients_per_round": settings.clients_per_round,
        "accuracy": last.get("accuracy"), "accuracy_before": result["rounds"][0].get("accuracy"),
        "epsilon": last.get("epsilon"), "delta": last.get("delta"),
        "upload_bytes_per_device_per_round": last["upload_bytes_per_device"],
        "adapter": f"{out}/adapter", "secagg": secagg, "privacy": settings.privacy,
        "server_optimizer": server_optimizer,
    }  # fmt: skip
    click.echo(json.dumps(summary, indent=2))
    write_report(report, {**summary, "per_round": result["rounds"]})
