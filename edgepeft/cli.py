"""The `edgepeft` command line: export, train, eval, predict, inspect, demo, bench."""

from __future__ import annotations

import json
import logging
import math
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgepeft.errors import EdgePeftError, InputError

logger = logging.getLogger(__name__)


class _Command(click.Command):
    """Library errors become one clear line and exit status 1 (click's own usage errors exit 2)."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (EdgePeftError, FileExistsError, FileNotFoundError) as e:
            raise click.ClickException(str(e)) from None


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="Log what each step does.")
@click.version_option(package_name="edgepeft")
def main(verbose: bool) -> None:
    """edgepeft: compile a model into an on-device training bundle, and train it on local data."""
    logging.basicConfig(
        level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )


def _write_report(path: str | None, report: dict[str, Any]) -> None:
    if path:
        Path(path).write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")


def _csv(value: str | None) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


@main.command(cls=_Command)
@click.argument("model")
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Bundle directory to write.")
@click.option("--labels", help="Class names, comma-separated (required for a transformers classifier).")
@click.option(
    "--target-modules",
    default="query,value",
    show_default=True,
    help="Modules to adapt: comma-separated names, or one regular expression with --regex.",
)
@click.option("--regex", is_flag=True, help="Treat --target-modules as one regular expression.")
@click.option("--rank", "r", default=8, show_default=True, help="LoRA rank.")
@click.option("--alpha", default=16.0, show_default=True, help="LoRA alpha (scaling = alpha / rank).")
@click.option("--dropout", default=0.0, show_default=True, help="LoRA dropout.")
@click.option("--bias", type=click.Choice(["none", "all", "lora_only"]), default="none", show_default=True)
@click.option(
    "--train-module", "train_modules", multiple=True, help="A module trained in full (e.g. a new head); repeatable."
)
@click.option("--loss", type=click.Choice(["cross_entropy", "mse", "bce"]), default="cross_entropy", show_default=True)
@click.option("--optimizer", type=click.Choice(["adamw", "sgd"]), default="adamw", show_default=True)
@click.option(
    "--quantize",
    type=click.Choice(["int8", "fp32"]),
    default="int8",
    show_default=True,
    help="Storage of the frozen Linear/Conv/Embedding weights.",
)
@click.option("--max-length", default=128, show_default=True, help="Longest token sequence for text models.")
@click.option("--profile-memory", is_flag=True, help="Measure peak memory at a few sizes, for --memory-budget.")
@click.option("--overwrite", is_flag=True, help="Replace an existing bundle directory.")
def export(
    model: str,
    out: str,
    labels: str | None,
    target_modules: str,
    regex: bool,
    r: int,
    alpha: float,
    dropout: float,
    bias: str,
    train_modules: tuple[str, ...],
    loss: str,
    optimizer: str,
    quantize: str,
    max_length: int,
    profile_memory: bool,
    overwrite: bool,
) -> None:
    """Compile MODEL into a training bundle.

    MODEL is a Hugging Face transformers model directory (loaded offline), or `package.module:function`
    naming a function that returns `(torch_module, example_inputs_dict)`.
    """
    from edgepeft.export import ExportOptions, LoraSpec, load_factory
    from edgepeft.export import export as export_bundle

    targets: tuple[str, ...] | str = target_modules if regex else _csv(target_modules)
    spec = LoraSpec(r=r, alpha=alpha, dropout=dropout, target_modules=targets, bias=bias, modules_to_save=train_modules)
    options = ExportOptions(
        loss=loss, optimizer=optimizer, quantization=quantize, max_length=max_length, labels=_csv(labels),
        profile_memory=profile_memory,
    )  # fmt: skip
    example_inputs = None
    if not Path(model).is_dir():
        model, example_inputs = load_factory(model)
    click.echo(f"exporting to {out} ...", err=True)
    manifest = export_bundle(model, out, example_inputs=example_inputs, lora=spec, options=options, overwrite=overwrite)
    size = sum(f.stat().st_size for f in Path(out).iterdir())
    click.echo(
        f"bundle {out}: {size / 1e6:.1f} MB, {manifest.stats['trainable_parameters']:,} trainable parameters, "
        f"{manifest.quantization} backbone"
    )


def _session(bundle: str, adapter: str | None = None, state: str | None = None):
    from edgepeft.runtime import TrainingSession

    session = TrainingSession(bundle, state=state)
    if adapter:
        session.load_adapter(adapter)
    return session


def _progress_bar(label: str) -> tuple[Callable[[int, int, float], None], Callable[[], None]]:
    """A click progress bar fed by the runtime's progress callback (step, total, loss)."""
    state: dict[str, Any] = {"loss": float("nan")}

    def update(step: int, total: int, loss: float) -> None:
        if "bar" not in state:
            state["bar"] = click.progressbar(
                length=total, label=label, file=sys.stderr, show_pos=True,
                item_show_func=lambda _: f"loss {state['loss']:.3f}",
            )  # fmt: skip
            state["bar"].__enter__()
        state["loss"] = loss
        state["bar"].update(1)

    def close() -> None:
        if "bar" in state:
            state["bar"].__exit__(None, None, None)

    return update, close


@main.command(cls=_Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(), help="CSV (text,label) or JSONL file of training examples.")
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
    "--memory-budget",
    "memory_budget_mb",
    type=float,
    help="MB: refuse to start when the bundle's memory profile estimates more.",
)
@click.option("--lower-batch", is_flag=True, help="With --memory-budget: lower the batch size until it fits.")
@click.option("--checkpoint-every", default=50, show_default=True, help="Steps between saves to --checkpoint-dir.")
@click.option(
    "--store",
    type=click.Path(file_okay=False),
    help="Adapter store: hold out a validation split, stop early, keep the best, replace --name only if better.",
)
@click.option("--name", default="default", show_default=True, help="Adapter name in --store.")
@click.option("--validation-fraction", default=0.1, show_default=True, help="Share of --data held out with --store.")
@click.option("--eval-every", default=50, show_default=True, help="Steps between validations with --store.")
@click.option("--patience", default=3, show_default=True, help="Validations without improvement before stopping.")
@click.option("--adapter", help="Adapter directory to start from.")
@click.option("--resume", "state", type=click.Path(), help="Training state directory to resume from.")
@click.option("--adapter-out", type=click.Path(), help="Write the trained adapter here.")
@click.option("--state-out", type=click.Path(), help="Write the full training state (with optimizer) here.")
@click.option("--report", type=click.Path(), help="Write the figures as JSON here.")
def train(
    bundle: str,
    data: str,
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
    checkpoint_every: int,
    memory_budget_mb: float | None,
    lower_batch: bool,
    store: str | None,
    name: str,
    validation_fraction: float,
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
    from edgepeft.runtime.memory import peak_rss_mb

    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, schedule=schedule,
        warmup_steps=warmup_steps, grad_accumulation=grad_accumulation, seed=seed,
        max_steps=max_steps, max_seconds=max_seconds, memory_budget_mb=memory_budget_mb,
        lower_batch_to_fit=lower_batch,
    )  # fmt: skip
    session = _session(bundle, adapter, state)
    train_set = session.load_data(data)
    held_out = session.load_data(eval_data) if eval_data else None
    figures: dict[str, Any] = {
        "examples": len(train_set),
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
    }
    if held_out is not None:
        figures["accuracy_before"] = session.evaluate(held_out).accuracy
    update, close = _progress_bar("training")
    try:
        if store:
            from edgepeft.runtime.fit import fit, split_validation
            from edgepeft.runtime.store import AdapterStore

            adapters = AdapterStore(store, session.manifest)
            if not adapter and name in {info.name for info in adapters.list()}:
                session.set_trainable(adapters.load(name))  # improve on the stored adapter
            train_set, validation = split_validation(train_set, validation_fraction, seed)
            fitted = fit(session, train_set, validation, config, eval_every=eval_every, patience=patience,
                         store=adapters, name=name, on_step=update)  # fmt: skip
            result = fitted.training
            figures.update(validation_scores=fitted.scores, best_score=fitted.best_score, stored=fitted.stored)
        else:
            result = session.train(
                train_set, config, update, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every
            )
    finally:
        close()
    figures.update(
        stopped=result.stopped,
        steps=result.steps,
        total_steps=session.step,
        epoch_losses=result.epoch_losses,
        median_step_ms=result.median_step_ms,
        train_seconds=result.seconds,
    )
    if held_out is not None:
        after = session.evaluate(held_out)
        figures.update(accuracy_after=after.accuracy, eval_loss=after.loss)
    if adapter_out:
        session.save_adapter(adapter_out)
        figures["adapter_bytes"] = sum(f.stat().st_size for f in Path(adapter_out).iterdir())
    if state_out:
        session.save_state(state_out)
    figures["peak_rss_mb"] = peak_rss_mb()
    figures["torch_loaded"] = sys.modules.get("torch") is not None
    _write_report(report, figures)
    click.echo(_summary(figures))


def _summary(figures: dict[str, Any]) -> str:
    parts = [
        f"{figures['steps']} steps",
        f"{figures['median_step_ms']:.0f} ms/step (median)",
        f"stopped: {figures['stopped']}",
        f"peak RSS {figures['peak_rss_mb']:.0f} MB",
    ]
    if "accuracy_after" in figures:
        parts.insert(0, f"accuracy {figures['accuracy_before']:.1%} -> {figures['accuracy_after']:.1%}")
    return ", ".join(parts)


@main.command(name="eval", cls=_Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(), help="CSV (text,label) or JSONL file.")
@click.option("--adapter", help="Adapter directory to evaluate.")
@click.option("--state", type=click.Path(), help="Training state directory to evaluate.")
@click.option("--report", type=click.Path(), help="Write the figures as JSON here.")
def evaluate(bundle: str, data: str, adapter: str | None, state: str | None, report: str | None) -> None:
    """Evaluate BUNDLE (with an adapter or state) on a labelled data file: loss and accuracy."""
    session = _session(bundle, adapter, state)
    result = session.evaluate(session.load_data(data))
    figures = {"loss": result.loss, "accuracy": result.accuracy, "examples": result.examples}
    _write_report(report, figures)
    accuracy = f", accuracy {result.accuracy:.1%}" if result.accuracy is not None else ""
    click.echo(f"{result.examples} examples: loss {result.loss:.4f}{accuracy}")


@main.command(cls=_Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "texts", multiple=True, help="A text to classify; repeatable.")
@click.option("--data", type=click.Path(), help="CSV or JSONL file of texts.")
@click.option("--adapter", help="Adapter directory to use.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input.")
def predict(bundle: str, texts: tuple[str, ...], data: str | None, adapter: str | None, as_json: bool) -> None:
    """Predict labels and probabilities for texts with BUNDLE."""
    from edgepeft.runtime.data import read_text_file

    inputs = list(texts) + (read_text_file(data)[0] if data else [])
    if not inputs:
        raise click.UsageError("give --text or --data")
    session = _session(bundle, adapter)
    result = session.predict(inputs)
    for i, text in enumerate(inputs):
        if result.probabilities is None:
            row: dict[str, Any] = {"output": result.outputs[i].tolist()}
        else:
            row = {
                "label": result.labels[i] if result.labels else int(result.classes[i]),
                "probability": float(result.probabilities[i].max()),
                "probabilities": [round(float(p), 6) for p in result.probabilities[i]],
            }
        if as_json:
            click.echo(json.dumps({"text": text, **row}))
        else:
            click.echo(f"{row.get('label', row.get('output'))}\t{row.get('probability', '')}\t{text[:60]}")


@main.command(cls=_Command)
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def inspect(path: str) -> None:
    """Show what a bundle or an adapter directory holds."""
    from edgepeft.manifest import MANIFEST_FILE

    if (Path(path) / MANIFEST_FILE).exists():
        from edgepeft.runtime import open_bundle

        m = open_bundle(path).manifest
        click.echo(f"bundle {path}")
        click.echo(f"  inputs:     {', '.join(f'{s.name} {s.dtype}{list(s.shape)}' for s in m.inputs)}")
        click.echo(f"  outputs:    {', '.join(f'{s.name} {s.dtype}{list(s.shape)}' for s in m.outputs)}")
        click.echo(f"  labels:     {', '.join(m.labels) or '-'}")
        click.echo(f"  loss:       {m.loss}   optimizer: {m.optimizer}   backbone: {m.quantization}")
        click.echo(f"  trainable:  {len(m.trainable)} tensors, {m.stats.get('trainable_parameters', 0):,} parameters")
        click.echo(f"  base:       sha256 {m.base_fingerprint[:16]}...")
        for name in sorted(m.files):
            click.echo(f"  file:       {name} ({(Path(path) / name).stat().st_size:,} bytes)")
        return
    from safetensors import safe_open

    from edgepeft.errors import AdapterError
    from edgepeft.fileio import read_json_object
    from edgepeft.runtime.adapter import FINGERPRINT_KEY, WEIGHTS

    weights = Path(path) / WEIGHTS
    if not weights.is_file():
        raise EdgePeftError(f"{path} is neither a bundle ({MANIFEST_FILE}) nor an adapter ({WEIGHTS})")
    config = read_json_object(Path(path) / "adapter_config.json", AdapterError, "adapter config")
    with safe_open(str(weights), framework="numpy") as f:
        meta = f.metadata() or {}
        shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    click.echo(f"adapter {path}: {config.get('peft_type')} r={config.get('r')} targets={config.get('target_modules')}")
    click.echo(f"  base:    sha256 {meta.get(FINGERPRINT_KEY, 'not recorded')[:16]}")
    click.echo(f"  tensors: {len(shapes)}, {sum(math.prod(s) for s in shapes.values()):,} values")


@main.group()
def adapters() -> None:
    """Manage an adapter store: named adapters beside one bundle."""


def _store(bundle: str, store: str):
    from edgepeft.runtime import open_bundle
    from edgepeft.runtime.store import AdapterStore

    return AdapterStore(store, open_bundle(bundle).manifest)


_bundle_option = click.option("--bundle", required=True, type=click.Path(exists=True, file_okay=False),
                              help="The bundle the store's adapters belong to.")  # fmt: skip


@adapters.command(name="list", cls=_Command)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@_bundle_option
def adapters_list(store: str, bundle: str) -> None:
    """List the adapters in STORE with their metadata; * marks the active one."""
    adapter_store = _store(bundle, store)
    active = adapter_store.active
    for info in adapter_store.list():
        score = "-" if info.score is None else f"{info.score:.4f}"
        click.echo(
            f"{'*' if info.name == active else ' '} {info.name}\tsteps {info.steps}\tscore {score}\t{info.created}"
        )


@adapters.command(name="activate", cls=_Command)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@_bundle_option
def adapters_activate(store: str, name: str, bundle: str) -> None:
    """Make NAME the active adapter of STORE."""
    _store(bundle, store).activate(name)
    click.echo(f"active adapter: {name}")


@adapters.command(name="delete", cls=_Command)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@_bundle_option
def adapters_delete(store: str, name: str, bundle: str) -> None:
    """Delete adapter NAME from STORE."""
    _store(bundle, store).delete(name)
    click.echo(f"deleted adapter: {name}")


@adapters.command(name="export", cls=_Command)
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.argument("name")
@_bundle_option
@click.option("--out", required=True, type=click.Path(dir_okay=False), help="The .onnx file to write.")
def adapters_export(store: str, name: str, bundle: str, out: str) -> None:
    """Write a standalone inference model (int8 base + adapter NAME) for a plain ONNX Runtime session."""
    session = _session(bundle)
    session.set_trainable(_store(bundle, store).load(name))
    path = session.export_inference(out)
    click.echo(f"inference model {path}: {path.stat().st_size / 1e6:.1f} MB")


@main.command(cls=_Command)
@click.option(
    "--out",
    default="edgepeft-demo",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Working directory for the bundles, data split and adapter.",
)
@click.option("--epochs", default=2, show_default=True)
@click.option("--lr", "learning_rate", default=2e-3, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--report", type=click.Path(), help="Write the figures as JSON here.")
def demo(out: str, epochs: int, learning_rate: float, seed: int, report: str | None) -> None:
    """Fine-tune all-MiniLM-L6-v2 on Jane Austen passages on this device, and print the figures."""
    from edgepeft.demo import run_demo

    figures = run_demo(Path(out), epochs=epochs, learning_rate=learning_rate, seed=seed)
    _write_report(report, figures)
    click.echo(json.dumps(figures, indent=2, sort_keys=True))


def _ints(option: str, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in _csv(value))
    except ValueError:
        raise InputError(f"{option} must be comma-separated integers, got {value!r}") from None


def _command_line() -> str:
    program = sys.argv[0]
    head = ["python", program] if program.endswith(".py") else [Path(program).name]
    return shlex.join([*head, *sys.argv[1:]])


@main.command(cls=_Command)
@click.option("--out", default="edgepeft-bench", show_default=True, type=click.Path(file_okay=False),
              help="Directory for results.json, results.md and chart.png.")  # fmt: skip
@click.option("--systems", help="Comma-separated, from edgepeft, ort-fp32, pytorch-peft [default: all three].")
@click.option("--batches", help="Batch sizes of the speed grid, comma-separated [default: 1,8,16].")
@click.option("--seqs", help="Sequence lengths of the speed grid, comma-separated [default: 64,128].")
@click.option("--steps", type=int, help="Timed training steps per grid point and round [default: 20].")
@click.option("--rounds", type=int, help="Rounds of the speed grid, in a rotated system order [default: 3].")
@click.option("--seeds", help="Seeds of the accuracy runs, comma-separated [default: 0,1,2].")
@click.option("--epochs", type=int, help="Epochs of each accuracy run [default: 2, as the demo].")
@click.option("--threads", type=int, help="Threads for ONNX Runtime and torch [default: all cores].")
@click.option("--smoke", is_flag=True,
              help="A tiny run for CI (batch 2 x 16, 2 rounds of 3 steps, 1 seed, a small subset).")
def bench(
    out: str,
    systems: str | None,
    batches: str | None,
    seqs: str | None,
    steps: int | None,
    rounds: int | None,
    seeds: str | None,
    epochs: int | None,
    threads: int | None,
    smoke: bool,
) -> None:
    """Benchmark edgepeft against ORT with an fp32 backbone and PyTorch + PEFT, each measurement in its own process.

    Measures ms per training step over a grid of batch sizes and sequence lengths, peak RSS, cold starts,
    one-sample latency, bundle and adapter sizes, accuracy on the Austen task over seeds, and each step's
    share of this machine's matmul FLOP/s. Ratios are taken within the run.
    """
    from edgepeft.bench.config import BenchConfig
    from edgepeft.bench.run import run_bench

    config = (BenchConfig.smoke() if smoke else BenchConfig()).with_overrides(
        systems=_csv(systems) or None, batches=_ints("--batches", batches), seqs=_ints("--seqs", seqs),
        steps=steps, rounds=rounds, seeds=_ints("--seeds", seeds), epochs=epochs, threads=threads,
    )  # fmt: skip
    run_bench(config, out, command=_command_line(), progress=lambda line: click.echo(line, err=True))
    click.echo((Path(out) / "results.md").read_text(encoding="utf-8"))


if __name__ == "__main__":
    main()
