"""`edgepeft eval` and `edgepeft predict`: score a bundle on local data, and run it on new inputs."""

from __future__ import annotations

import json
from typing import Any

import click

from edgepeft.cli.app import Command
from edgepeft.cli.common import check_report, count, open_session, write_report
from edgepeft.cli.data_options import data_options, read_data, read_inputs, text_column_option
from edgepeft.errors import InputError


@click.command(name="eval", cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--data", required=True, type=click.Path(), help="Labelled examples: CSV, JSONL or .npz.")
@data_options
@click.option("--adapter", type=click.Path(), help="Adapter directory to evaluate.")
@click.option("--state", type=click.Path(), help="Training state directory to evaluate.")
@click.option("--report", type=click.Path(), help="Write the figures as JSON here.")
def evaluate(
    bundle: str,
    data: str,
    text_column: str | None,
    label_column: str | None,
    adapter: str | None,
    state: str | None,
    report: str | None,
) -> None:
    """Evaluate BUNDLE (with an adapter or state) on a labelled data file: loss and accuracy."""
    if adapter and state:
        raise click.UsageError("give --adapter or --state, not both")
    check_report(report)
    session = open_session(bundle, adapter, state)
    result = session.evaluate(read_data(session, data, "--data", text_column, label_column))
    figures = {"loss": result.loss, "accuracy": result.accuracy, "examples": result.examples}
    if result.perplexity is not None:  # a causal LM
        figures.update(perplexity=result.perplexity, tokens=result.tokens)
    write_report(report, figures)
    accuracy = f", accuracy {result.accuracy:.1%}" if result.accuracy is not None else ""
    perplexity = ""
    if result.perplexity is not None:
        perplexity = f", perplexity {result.perplexity:.3f} ({count(result.tokens, 'token')})"
    click.echo(f"{count(result.examples, 'example')}: loss {result.loss:.4f}{accuracy}{perplexity}")


@click.command(cls=Command)
@click.argument("bundle", type=click.Path(exists=True, file_okay=False))
@click.option("--text", "texts", multiple=True, help="A text to classify; repeatable.")
@click.option("--data", type=click.Path(), help="Inputs to predict: CSV, JSONL or .npz (labels not needed).")
@text_column_option
@click.option("--adapter", type=click.Path(), help="Adapter directory to use.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per input.")
def predict(
    bundle: str,
    texts: tuple[str, ...],
    data: str | None,
    text_column: str | None,
    adapter: str | None,
    as_json: bool,
) -> None:
    """Predict labels and probabilities with BUNDLE, for texts (--text) or a data file (--data)."""
    if not texts and not data:
        raise click.UsageError("give --text or --data")
    session = open_session(bundle, adapter)
    if session.manifest.task is not None:  # before --data is read: its format is the classifier's
        raise InputError(f"{bundle} is a causal language model, it predicts no labels: continue a text with "
                         "`edgepeft generate --prompt`, score one with `edgepeft eval --data`")  # fmt: skip
    shown: list[Any] = []
    results = []
    if texts:
        if not session.bundle.has_tokenizer:
            raise click.UsageError("--text needs a text bundle (this one takes arrays: use --data)")
        results.append(session.predict(list(texts)))
        shown += [("text", text) for text in texts]
    if data:
        features, rows = read_inputs(session, data, "--data", text_column)
        results.append(session.predict(features))
        shown += rows
    index = 0
    for result in results:
        for i in range(len(result.outputs)):
            _echo_row(result, i, shown[index], as_json)
            index += 1


def _echo_row(result, i: int, shown: tuple[str, Any], as_json: bool) -> None:
    if result.probabilities is None:
        row: dict[str, Any] = {"output": result.outputs[i].tolist()}
    elif result.classes is None:  # bce: one probability per output
        row = {"probabilities": [round(float(p), 6) for p in result.probabilities[i]]}
    else:
        row = {
            "label": result.labels[i] if result.labels else int(result.classes[i]),
            "probability": round(float(result.probabilities[i].max()), 6),
            "probabilities": [round(float(p), 6) for p in result.probabilities[i]],
        }
    if as_json:
        click.echo(json.dumps({shown[0]: shown[1], **row}))
    else:
        value = row.get("label", row.get("output", row.get("probabilities")))
        click.echo(f"{value}\t{row.get('probability', '')}\t{str(shown[1])[:60]}")
