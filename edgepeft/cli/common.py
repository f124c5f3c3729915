"""Small pieces the commands share: reports, sizes, comma lists, the progress display, opening a session."""

from __future__ import annotations

import json
import math
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click

from edgepeft.errors import InputError

# The key every report written by `write_report` carries: only a file holding it is replaced by a new report.
REPORT_MARK = "edgepeft_report"


def check_report(path: str | None, flag: str = "--report") -> None:
    """Refuse, before any work, a report path that holds a directory or a file other than an earlier edgepeft
    report (a bundle's manifest, an adapter's config or a data file may be JSON too)."""
    if not path:
        return
    target = Path(path)
    if target.is_dir():
        raise InputError(f"{flag} {target} is a directory: give a file name such as {target / 'report.json'}")
    if target.exists():
        try:
            earlier = json.loads(target.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, ValueError):
            earlier = None
        if not isinstance(earlier, dict) or REPORT_MARK not in earlier:
            raise InputError(f"{flag} {target} exists and is not an edgepeft report: not replacing it")


def write_report(path: str | None, report: dict[str, Any], flag: str = "--report") -> None:
    """Write figures as JSON, replacing only an earlier edgepeft report (never a directory or another file)."""
    if not path:
        return
    check_report(path, flag)
    target = Path(path)
    tmp = target.with_name(f".{target.name}.partial")
    tmp.write_text(json.dumps({REPORT_MARK: 1, **report}, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(target)


def count(n: int, noun: str) -> str:
    """`1 token`, `2 tokens`."""
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def comma_list(value: str | None) -> tuple[str, ...]:
    """`a, b,c` -> ("a", "b", "c"); None or "" -> ()."""
    return tuple(v.strip() for v in value.split(",") if v.strip()) if value else ()


def comma_ints(flag: str, value: str | None) -> tuple[int, ...] | None:
    """`1,8,16` -> (1, 8, 16), with an error naming the flag."""
    if value is None:
        return None
    try:
        return tuple(int(v) for v in comma_list(value))
    except ValueError:
        raise InputError(f"{flag} must be comma-separated integers, got {value!r}") from None


def human_size(size: int) -> str:
    """Bytes in the unit that reads best: 812 bytes, 14.2 KB, 48.3 MB."""
    if size < 1000:
        return f"{size} bytes"
    exponent = min(int(math.log(size, 1000)), 3)
    return f"{size / 1000**exponent:.1f} {['bytes', 'KB', 'MB', 'GB'][exponent]}"


def open_session(bundle: str, adapter: str | None = None, state: str | None = None):
    """A device TrainingSession on BUNDLE, with an adapter or a saved state loaded."""
    from edgepeft.runtime import TrainingSession

    session = TrainingSession(bundle, state=state)
    if adapter:
        session.load_adapter(adapter)
    return session


class Progress:
    """Training progress on stderr: a bar on a terminal, a line every tenth of the run elsewhere (logs, CI)."""

    def __init__(self, label: str, interactive: bool | None = None):
        self.label = label
        self.interactive = sys.stderr.isatty() if interactive is None else interactive
        self.loss: float | None = None
        self._bar: Any = None
        self._next_line = 0

    def update(self, step: int, total: int, loss: float) -> None:
        """The runtime's on_step callback: step of total in this run, and the step's loss."""
        if self.loss is None and step > 1:
            click.echo(f"resuming from step {step - 1} of {total}", err=True)
        self.loss = loss
        if self.interactive:
            if self._bar is None:
                self._bar = click.progressbar(
                    length=total, label=self.label, file=sys.stderr, show_pos=True,
                    item_show_func=lambda _: "" if self.loss is None else f"loss {self.loss:.3f}",
                )  # fmt: skip
                self._bar.__enter__()
                self._bar.update(step - 1)
            self._bar.update(1)
        elif step >= self._next_line or step == total:
            click.echo(f"{self.label}: step {step}/{total}, loss {loss:.4f}", err=True)
            self._next_line = step + max(1, total // 10)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


StepCallback = Callable[[int, int, float], None]
