"""The data flags of the device commands, and reading a data file in their words."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from edgepeft.errors import DataError, InputError


text_column_option = click.option("--text-column", help="Column (CSV) or field (JSONL) of the texts [default: text].")
label_column_option = click.option(
    "--label-column", help="Column (CSV), field (JSONL) or array (.npz) of the labels [default: label, labels in .npz]."
)


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --text-column and --label-column: where a data file keeps its texts and labels."""
    return text_column_option(label_column_option(command))


def _in_flag(flag: str, error: Exception) -> Exception:
    """`data file x.csv does not exist` -> `--data x.csv does not exist`."""
    message = str(error)
    message = message[len("data file "):] if message.startswith("data file ") else message
    return type(error)(f"{flag} {message}")


def read_data(session, path: str, flag: str, text_column: str | None, label_column: str | None):
    """Read a labelled data file into a Dataset for the session's bundle; an error names the flag that gave it."""
    try:
        return session.load_data(path, text_column=text_column, label_column=label_column)
    except (DataError, InputError) as e:
        raise _in_flag(flag, e) from None


def read_inputs(session, path: str, flag: str, text_column: str | None) -> tuple[dict, list[tuple[str, object]]]:
    """Read a file of inputs to predict (labels not needed): the bundle's inputs, and how to show each row."""
    from edgepeft.runtime.data import read_text_file

    try:
        features = session.load_inputs(path, text_column=text_column)
        if session.bundle.has_tokenizer:
            return features, [("text", text) for text in read_text_file(path, text_column or "text")[0]]
    except (DataError, InputError) as e:
        raise _in_flag(flag, e) from None
    rows = len(next(iter(features.values())))
    return features, [("row", i + 1) for i in range(rows)]
