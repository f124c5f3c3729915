"""Read users' data files by each format's own rules: CSV/TSV (csv module), JSONL (one object a line), .npz.

Nothing here knows about bundles: a file becomes `Records` (rows of named cells) or a dict of arrays.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepeft.errors import DataError

logger = logging.getLogger(__name__)

MAX_DATA_BYTES = 1 << 30  # a local data file larger than this is not personal data: refuse, don't read
CSV_DELIMITERS = {".csv": ",", ".tsv": "\t"}
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
NPZ_SUFFIX = ".npz"
SUFFIXES = (*CSV_DELIMITERS, *JSONL_SUFFIXES, NPZ_SUFFIX)


@dataclass(frozen=True)
class Records:
    """The rows of a CSV or JSONL file.

    `rows` map a column (CSV) or field (JSONL) to its cell: a str for CSV (empty cells are left out), the
    parsed JSON value for JSONL. `lines[i]` is the line of the file where row i starts, for messages.
    """

    path: Path
    columns: tuple[str, ...]
    rows: list[dict[str, Any]]
    lines: list[int]
    is_csv: bool

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def kind(self) -> str:
        """What the format calls a named cell, for messages."""
        return "column" if self.is_csv else "field"


def check_data_path(path: str | os.PathLike) -> Path:
    """The path of an existing data file of a known format and a size we read; else a DataError."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    if path.suffix.lower() not in SUFFIXES:
        raise DataError(f"{path}: unknown data format {path.suffix!r} (use .csv, .tsv, .jsonl or .npz)")
    size = path.stat().st_size
    if size > MAX_DATA_BYTES:
        raise DataError(f"data file {path} is larger than {MAX_DATA_BYTES >> 20} MiB: split it")
    if size == 0:
        raise DataError(f"{path} is empty: it holds no examples")
    return path


def is_npz(path: str | os.PathLike) -> bool:
    return Path(path).suffix.lower() == NPZ_SUFFIX


def read_records(path: str | os.PathLike, expect: str = "the fields the bundle needs") -> Records:
    """Read a CSV/TSV (header row, then one row an example) or JSONL (one JSON object a line) file.

    A UTF-8 byte order mark is dropped; CRLF line ends are read like LF; a .csv whose header is separated
    by ";" (as Excel writes it where "," is the decimal mark) is read with ";". `expect` says in messages what a
    JSONL object must hold (e.g. "a `text` field").
    """
    path = check_data_path(path)
    raw = _read_utf8(path)
    if not raw.strip():
        raise DataError(f"{path} is empty: it holds no examples")
    suffix = path.suffix.lower()
    if suffix in CSV_DELIMITERS:
        records = _csv_records(raw, path, _delimiter(raw, path, CSV_DELIMITERS[suffix]))
    elif suffix in JSONL_SUFFIXES:
        records = _jsonl_records(raw, path, expect)
    else:
        raise DataError(f"{path}: a {suffix} file holds arrays, not rows of text (use .csv, .tsv or .jsonl)")
    if not records.rows:
        raise DataError(f"{path} holds no examples")
    return records


def _read_utf8(path: Path) -> str:
    blob = path.read_bytes()
    try:
        return blob.decode("utf-8-sig")  # Excel's "CSV UTF-8" starts with a byte order mark
    except UnicodeDecodeError as e:
        line = blob[: e.start].count(b"\n") + 1
        raise DataError(f"{path} is not UTF-8 text: line {line}: {e}") from None


@contextlib.contextmanager
def _field_limit(limit: int) -> Iterator[None]:
    """Raise the csv module's per-field limit (131,072 characters by default) while reading one file."""
    previous = csv.field_size_limit()
    csv.field_size_limit(max(previous, limit))
    try:
        yield
    finally:
        csv.field_size_limit(previous)


def _csv_records(raw: str, path: Path, delimiter: str) -> Records:
    # newline="": the csv module sees the line ends itself, so a newline inside a quoted field is kept.
    reader = csv.reader(io.StringIO(raw, newline=""), delimiter=delimiter, strict=True)
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    header: list[str] | None = None
    with _field_limit(MAX_DATA_BYTES):
        while True:
            start = reader.line_num + 1
            try:
                cells = next(reader)
            except StopIteration:
                break
            except csv.Error as e:
                raise DataError(_csv_error(path, e, start, reader.line_num)) from None
            if not any(cell.strip() for cell in cells):
                continue  # a blank line, or a row of empty cells as spreadsheets write them
            if header is None:
                header = [name.strip() for name in cells]
                _check_header(header, path)
                continue
            extra = [cell for cell in cells[len(header) :] if cell.strip()]
            if extra:
                raise DataError(
                    f"{path} line {start} has {len(cells)} cells, the header has {len(header)}: "
                    f"quote a text that holds a {_name(delimiter)} (\"...\")"
                )
            rows.append({name: cell for name, cell in zip(header, cells) if name and cell != ""})
            lines.append(start)
    return Records(path, tuple(header or ()), rows, lines, is_csv=True)


def _delimiter(raw: str, path: Path, delimiter: str) -> str:
    """`;` for a .csv whose header holds `;` and no `,` (Excel where `,` is the decimal mark), else `delimiter`."""
    header = raw.lstrip().split("\n", 1)[0]
    if delimiter == "," and ";" in header and "," not in header:
        logger.info("%s: the header is separated by ';', as Excel writes CSV in many locales: reading it so", path)
        return ";"
    return delimiter


def _name(delimiter: str) -> str:
    return "tab" if delimiter == "\t" else f"{delimiter!r}"


def _csv_error(path: Path, error: csv.Error, start: int, line: int) -> str:
    if "unexpected end of data" in str(error):
        return f"{path} is not valid CSV: the quote (\") opened on line {start} is never closed"
    return f"{path} is not valid CSV: line {line}: {error}"


def _check_header(header: list[str], path: Path) -> None:
    seen = set()
    for name in header:
        if name and name in seen:
            raise DataError(f"{path}: column {name!r} appears twice in the header")
        seen.add(name)


def _jsonl_records(raw: str, path: Path, expect: str) -> Records:
    rows: list[dict[str, Any]] = []
    lines: list[int] = []
    columns: dict[str, None] = {}
    # JSON Lines: records end at "\n" only ("\r\n" too: the "\r" is JSON whitespace). A string may hold
    # other line separators (\u2028, \x85, ...) unescaped, so str.splitlines() would cut records apart.
    for number, line in enumerate(raw.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path} line {number} is not valid JSON: {e.msg} at column {e.colno}") from None
        except RecursionError:
            raise DataError(f"{path} line {number} is nested too deeply to be data") from None
        if not isinstance(record, dict):
            raise DataError(f"{path} line {number} is not an object with {expect}")
        rows.append(record)
        lines.append(number)
        columns.update(dict.fromkeys(record))
    return Records(path, tuple(columns), rows, lines, is_csv=False)


def read_npz(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Read the arrays of a NumPy .npz file (numeric arrays only: no pickled objects are ever loaded)."""
    path = check_data_path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            unpacked = sum(info.file_size for info in archive.infolist())
    except (zipfile.BadZipFile, OSError) as e:
        raise DataError(f"{path} is not a readable .npz file: {e}") from None
    if unpacked > MAX_DATA_BYTES:
        raise DataError(f"{path} unpacks to more than {MAX_DATA_BYTES >> 20} MiB: split it")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {name: archive[name] for name in archive.files}
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise DataError(f"{path} is not a readable .npz file of numeric arrays: {e}") from None
