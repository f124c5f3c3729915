"""`edgepeft train`: train a bundle on a local data file, on this device (torch is never loaded)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from edgepeft.cli.app import EXIT_ERROR, EXIT_INTERRUPTED, Command
from edgepeft.cli.common import Progress, check_report, open_session, write_report
from edgepeft.cli.data_options import data_options, read_data
from edgepeft.fileio import disk_bytes


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(),
              help="Training examples: CSV or JSONL of text,label; for array bundles .npz, JSONL or CSV of the inputs.")
@data_options
@click.option("--eval-data", type=click.Path(), help="Held-out file: accuracy is measured before and after training.")
@click.option("--epochs", default=2, show_default=True)
@click.option("--batch-size", default=8, show_default=True)
@click.option("--lr", "learning_rate", default=2e-3, show_default=True, help="Learning rate.")
@click.option(
    "--schedule",
    type=click.Choice(["constant", "linear", "cosine"]),
    default="constant",
    show_default=True,
    help="Learning-rate decay over the run.",
)
@click.option("--warmup-steps", default=0, show_default=True, help="Steps of linear learning-rate warm-up.")
@click.option("--grad-accumulation", default=1, show_default=True, help="Batches per optimizer step.")
@click.option("--seed", default=0, show_default=True, help="Shuffling seed.")
@click.option("--max-steps", type=int, help="Stop the run after this many optimizer steps.")
@click.option("--max-seconds", type=float, help="Stop this call after this many seconds (resumable).")
@click.option(
    "--checkpoint-dir",
    type=click.Path(file_okay=False),
    help="Save crash-safe state here and resume from it: rerun the same command after a kill.",
)
@click.option(
    "--new-run",
    "replace_other_run",
    is_flag=True,
    help="With --checkpoint-dir holding another run: start a new run there (its state is replaced).",
)
@click.option(
    "--checkpoint-every",
    default=50,
    show_default=True,
    type=click.IntRange(min=1),
    help="Steps between saves to --checkpoint-dir.",
)
@click.option(
    "--memory-budget",
    "memory_budget_mb",
    type=float,
    help="MB: refuse to start when the bundle's memory profile estimates more.",
)
@click.option("--lower-batch", "lower_batch_to_fit", is_flag=True,
              help="With --memory-budget: lower the batch size until it fits.")  # fmt: skip
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    help="Adapter store: hold out a validation split, stop early, keep the best, replace --name only if better.",
)
@click.option("--name", default="default", show_default=True, help="Adapter name in --store.")
@click.option("--validation-fraction", "fraction", default=0.1, show_default=True,
              help="Share of --data held out with --store.")  # fmt: skip
@click.option("--eval-every", default=50, show_default=True, help="Steps between validations with --store.")
@click.option("--patience", default=3, show_default=True, type=click.IntRange(min=1),
              help="Validations in a row without improvement before stopping.")  # fmt: skip
@click.option("--adapter", type=click.Path(), help="Adapter directory to start from.")
@click.option("--resume", "state", type=click.Path(), help="Training state directory to resume from.")
@click.option("--adapter-out", type=click.Path(), help="Write the trained adapter here.")
@click.option("--state-out", type=click.Path(), help="Write the full training state (with optimizer) here.")
@click.option("--report", type=click.Path(), help="Write the figures as JSON here.")
def train(
    bundle: str,
    data: str,
    text_column: str | None,
    label_column: str | None,
    eval_data: str | None,
    epochs: int,
    batch_size: int,
    learning_rate: float,
    schedule: str,
    warmup_steps: int,
    grad_accumulation: int,
    seed: int,
    max_steps: int | None,
    max_seconds: float | None,
    checkpoint_dir: str | None,
    replace_other_run: bool,
    checkpoint_every: int,
    memory_budget_mb: float | None,
    lower_batch_to_fit: bool,
    store: str | None,
    name: str,
    fraction: float,
    eval_every: int,
    patience: int,
    adapter: str | None,
    state: str | None,
    adapter_out: str | None,
    state_out: str | None,
    report: str | None,
) -> None:
    """Train BUNDLE on a local data file, on this device."""
    from edgepeft.runtime import TrainConfig

    check_report(report)
    if store and checkpoint_dir:
        raise click.UsageError("--checkpoint-dir does not apply with --store (fit keeps the best adapter instead)")
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, schedule=schedule,
        warmup_steps=warmup_steps, grad_accumulation=grad_accumulation, seed=seed,
        max_steps=max_steps, max_seconds=max_seconds, memory_budget_mb=memory_budget_mb,
        lower_batch_to_fit=lower_batch_to_fit,
    )  # fmt: skip
    session = open_session(bundle, adapter, state)
    _check_outputs(session, adapter_out, state_out, checkpoint_dir, store)  # before any work, not after it
    train_set = read_data(session, data, "--data", text_column, label_column)
    held_out = read_data(session, eval_data, "--eval-data", text_column, label_column) if eval_data else None
    figures: dict[str, Any] = {
        "examples": len(train_set), "epochs": epochs, "batch_size": batch_size, "learning_rate": learning_rate,
    }  # fmt: skip
    if held_out is not None:
        figures.update(_held_out_figures(session.evaluate(held_out), "before"))
    progress = Progress("training")
    try:
        if store:
            figures.update(_fit(session, train_set, config, store, name, fraction, eval_every, patience, adapter,
                                progress))  # fmt: skip
        else:
            result = session.train(train_set, config, progress.update, checkpoint_dir=checkpoint_dir,
                                   checkpoint_every=checkpoint_every, replace_other_run=replace_other_run)  # fmt: skip
            figures.update(_run_figures(result))
            _say_where_the_run_stands(result, checkpoint_dir)
    except KeyboardInterrupt:
        progress.close()
        _interrupted(checkpoint_dir)
    finally:
        progress.close()
    figures["session_step"] = session.step
    if held_out is not None:
        figures.update(_held_out_figures(session.evaluate(held_out), "after"))
    if adapter_out:
        session.save_adapter(adapter_out)
        figures["adapter_bytes"] = disk_bytes(Path(adapter_out))
    if state_out:
        session.save_state(state_out)
    _finish(figures, report)


def _check_outputs(session, adapter_out, state_out, checkpoint_dir, store) -> None:
    """Refuse an output directory the run could not write at its end: a user's folder, or the bundle."""
    from edgepeft.fileio import check_output_directory
    from edgepeft.runtime.adapter import ADAPTER
    from edgepeft.runtime.checkpoint import STATE
    from edgepeft.runtime.store import STORE

    protect = (session.bundle.path,)
    outputs = {"--adapter-out": (adapter_out, ADAPTER), "--state-out": (state_out, STATE),
               "--checkpoint-dir": (checkpoint_dir, STATE), "--store": (store, STORE)}  # fmt: skip
    taken: dict[Path, str] = {}
    for flag, (path, kind) in outputs.items():
        if not path:
            continue
        check_output_directory(path, kind, overwrite=True, protect=protect)
        where = Path(path).resolve()
        if where in taken:
            raise click.UsageError(f"{taken[where]} and {flag} name the same directory {path}: give each its own")
        taken[where] = flag


def _fit(session, train_set, config, store, name, fraction, eval_every, patience, adapter, progress) -> dict[str, Any]:
    """Train against a validation split with early stopping; store the adapter only if it beats the stored one."""
    from edgepeft.runtime.fit import fit, split_validation
    from edgepeft.runtime.store import AdapterStore

    adapters = AdapterStore(store, session.manifest, protect=(session.bundle.path,))
    if not adapter and name in {info.name for info in adapters.list()}:
        session.set_trainable(adapters.load(name))  # improve on the stored adapter
    train_set, validation = split_validation(train_set, fraction, config.seed)
    fitted = fit(session, train_set, validation, config, eval_every=eval_every, patience=patience,
                 store=adapters, name=name, on_step=progress.update)  # fmt: skip
    return {
        **_run_figures(fitted.training), "stopped": fitted.stopped, "validation_scores": fitted.scores,
        "best_score": fitted.best_score, "stored": fitted.stored, "stored_score": fitted.stored_score,
        "store": store, "name": name,
    }  # fmt: skip


def _run_figures(result) -> dict[str, Any]:
    return {
        "stopped": result.stopped, "steps": result.steps, "median_step_ms": result.median_step_ms,
        "epoch_losses": result.epoch_losses, "train_seconds": result.seconds, "run_steps": result.run_steps,
        "total_steps": result.total_steps, "resumed_from": result.resumed_from,
        "already_complete": result.already_complete, "new_run_replaced_another": result.replaced_run,
    }  # fmt: skip


def _say_where_the_run_stands(result, checkpoint_dir: str | None) -> None:
    """Tell the user what a call with --checkpoint-dir did with the state it found there."""
    if result.already_complete:
        click.echo(f"the run in {checkpoint_dir} is already complete ({result.run_steps}/{result.total_steps} "
                   "steps): nothing to train", err=True)  # fmt: skip
    elif result.replaced_run:
        click.echo(f"{checkpoint_dir} held another run: started a new one there (--new-run)", err=True)


def _interrupted(checkpoint_dir: str | None) -> None:
    from edgepeft.runtime.checkpoint import PROGRESS

    if checkpoint_dir and (Path(checkpoint_dir) / PROGRESS).is_file():
        where = f"the last checkpoint is in {checkpoint_dir}: rerun the same command to resume"
    elif checkpoint_dir:
        where = f"no checkpoint was saved yet in {checkpoint_dir}"
    else:
        where = "nothing was saved (--checkpoint-dir would have kept the progress)"
    click.echo(f"Error: interrupted; {where}", err=True)
    sys.exit(EXIT_INTERRUPTED)


def _finish(figures: dict[str, Any], report: str | None) -> None:
    from edgepeft.runtime.memory import peak_rss_mb

    figures["peak_rss_mb"] = peak_rss_mb()
    figures["torch_loaded"] = sys.modules.get("torch") is not None
    write_report(report, figures)
    click.echo(summary(figures))
    if figures["stopped"] == "non_finite":
        click.echo(
            "Error: training stopped: the loss became NaN or infinite; the last parameters that gave a finite "
            "loss were kept (try a lower --lr)",
            err=True,
        )
        sys.exit(EXIT_ERROR)


def _store_outcome(figures: dict[str, Any]) -> str:
    """Whether --store kept the new adapter, and the two validation scores that decided it."""
    name, best, incumbent = figures["name"], figures["best_score"], figures["stored_score"]
    if incumbent is None:
        return f"adapter {name!r} stored (validation score {best:.4f}; the store had none)"
    verdict = "stored" if figures["stored"] else "not stored"
    relation = "beats" if figures["stored"] else "does not beat"
    return f"adapter {name!r} {verdict}: validation score {best:.4f} {relation} the stored adapter's {incumbent:.4f}"


def _held_out_figures(report, when: str) -> dict[str, Any]:
    """--eval-data's figures before or after training: loss, and accuracy (a classifier) or perplexity (a causal
    LM); `eval_loss` is the loss after training."""
    figures = {f"accuracy_{when}": report.accuracy, "eval_loss" if when == "after" else "eval_loss_before": report.loss}
    if report.perplexity is not None:
        figures[f"perplexity_{when}"] = report.perplexity
    return figures


def summary(figures: dict[str, Any]) -> str:
    """One line: what the run did, as a person reads it."""
    parts = []
    if figures.get("accuracy_after") is not None:
        parts.append(f"accuracy {figures['accuracy_before']:.1%} -> {figures['accuracy_after']:.1%}")
    elif figures.get("perplexity_after") is not None:
        parts.append(f"perplexity {figures['perplexity_before']:.2f} -> {figures['perplexity_after']:.2f}")
    elif figures.get("eval_loss") is not None:
        parts.append(f"held-out loss {figures['eval_loss_before']:.4f} -> {figures['eval_loss']:.4f}")
    if figures["steps"] and figures["median_step_ms"] is not None:
        ms = figures["median_step_ms"]
        parts.append(f"{figures['steps']} steps, {ms:.{0 if ms >= 10 else 2}f} ms/step (median)")
    else:
        parts.append("0 steps")
    parts.append(f"stopped: {figures['stopped']}")
    if "stored" in figures:
        parts.append(_store_outcome(figures))
    parts.append(f"peak RSS {figures['peak_rss_mb']:.0f} MB")
    return ", ".join(parts)
