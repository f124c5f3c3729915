"""The data flags of the device commands, and reading a data file in their words."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click

from edgepeft.errors import DataError, InputError


def data_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """Add --text-column and --label-column (the columns or fields a data file's texts and labels are in)."""
    command = click.option("--label-column", help="Column (CSV) or field (JSONL) of the labels [default: label].")(
        command
    )
    return click.option("--text-column", help="Column (CSV) or field (JSONL) of the texts [default: text].")(command)


def read_data(session, path: str, flag: str, text_column: str | None, label_column: str | None, labels: bool = True):
    """Read a data file into a Dataset for the session's bundle; an error names the flag that gave the file."""
    columns = {k: v for k, v in {"text_column": text_column, "label_column": label_column}.items() if v}
    try:
        if labels:
            return session.load_data(path, **columns)
        return session.load_inputs(path, **columns)
    except (DataError, InputError) as e:
        raise type(e)(f"{flag} {e}") from None
