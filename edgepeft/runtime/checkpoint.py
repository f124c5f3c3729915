"""Crash-safe training state on disk: an ORT checkpoint plus a small JSON record of where training stands.

Layout of a state directory:
    checkpoint-<step>[-<n>]   ORT CheckpointState with optimizer state (written, flushed, fsynced, then named)
    progress.json             step, position in the run, run settings, and the checkpoint's name and sha256

A new checkpoint always gets a name no file has (`checkpoint-<step>-<n>` when saved again at the same step),
so the checkpoint `progress.json` points at is never overwritten. `progress.json` is replaced atomically
(temporary file, fsync, rename, fsync of the directory) only after the checkpoint it names is on disk and its
rename is synced, so a kill or a power loss at any moment leaves either the previous complete state or the new
one. A state is first created whole beside its directory and moved in, so a directory with no `progress.json`
never holds a half-written state.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepeft.errors import BundleError
from edgepeft.fileio import (
    DirKind,
    atomic_directory,
    check_output_directory,
    crash_point,
    fsync_directory,
    fsync_file,
    read_json_object,
    sha256_file,
    write_json_atomic,
)

logger = logging.getLogger(__name__)

PROGRESS = "progress.json"
PREFIX = "checkpoint-"
STATE = DirKind("a training state", (PROGRESS,))


@dataclass
class Progress:
    """Where a run stands: global step, the next (epoch, batch) to train, and whether the run is done."""

    step: int = 0
    epoch: int = 0
    batch: int = 0
    complete: bool = False
    run: dict[str, Any] = field(default_factory=dict)  # settings that must match on resume
    run_start: int = 0  # global step at which the run began (part of the shuffling seed)


def write_state(
    directory: str | os.PathLike,
    save_checkpoint,
    progress: Progress,
    base_fingerprint: str,
    protect: Iterable[str | os.PathLike] = (),
) -> Path:
    """Write a new checkpoint with `save_checkpoint(path)`, then point `progress.json` at it atomically.

    `directory` must be new, empty, or a training state, and not inside or holding a `protect` path.

    Raises:
        OutputError: `directory` holds something else, or lies inside a protected bundle.
    """
    directory, protect = Path(directory), tuple(protect)
    check_output_directory(directory, STATE, overwrite=True, protect=protect)
    if not STATE.holds(directory):
        with atomic_directory(directory, STATE, protect=protect) as tmp:
            _write_into(tmp, save_checkpoint, progress, base_fingerprint)
    else:
        _write_into(directory, save_checkpoint, progress, base_fingerprint)
    return directory


def _write_into(directory: Path, save_checkpoint, progress: Progress, base_fingerprint: str) -> None:
    name = f"{PREFIX}{progress.step}"
    for n in range(1, 1000):  # never a name in use: above all not the checkpoint progress.json points at
        if not (directory / name).exists():
            break
        name = f"{PREFIX}{progress.step}-{n}"
    partial = directory / f".{name}.partial"
    save_checkpoint(partial)
    fsync_file(partial)
    crash_point(f"{name} written")
    os.replace(partial, directory / name)
    fsync_directory(directory)  # the checkpoint's name is on disk before progress.json can point at it
    crash_point(f"{name} named")
    record = {**asdict(progress), "checkpoint": name, "sha256": sha256_file(directory / name),
              "base_fingerprint": base_fingerprint}  # fmt: skip
    write_json_atomic(directory / PROGRESS, record)
    for old in directory.iterdir():  # older checkpoints, and leftovers of writes that were killed
        if old.name != name and (old.name.startswith((PREFIX, f".{PREFIX}", f".{PROGRESS}."))) and old.is_file():
            old.unlink(missing_ok=True)


def read_state(directory: str | os.PathLike, base_fingerprint: str) -> tuple[Path, Progress]:
    """Verify a state directory (fingerprint, checksum) and return its checkpoint path and progress."""
    directory = Path(directory)
    if not (directory / PROGRESS).is_file():
        raise BundleError(f"{directory} is not a saved training state ({PROGRESS} missing)")
    record = read_json_object(directory / PROGRESS, BundleError, "training state")
    try:
        progress = Progress(
            step=int(record["step"]), epoch=int(record["epoch"]), batch=int(record["batch"]),
            complete=bool(record["complete"]), run=dict(record["run"]), run_start=int(record["run_start"]),
        )  # fmt: skip
        name, digest, fingerprint = str(record["checkpoint"]), str(record["sha256"]), record["base_fingerprint"]
    except (KeyError, TypeError, ValueError) as e:
        raise BundleError(f"training state {directory / PROGRESS} is malformed: {type(e).__name__}: {e}") from None
    if fingerprint != base_fingerprint:
        raise BundleError(f"training state {directory} belongs to a different bundle (base fingerprint differs)")
    checkpoint = directory / name
    if Path(name).name != name or not name.startswith(PREFIX) or not checkpoint.is_file():
        raise BundleError(f"training state {directory}: checkpoint {name!r} is missing")
    if sha256_file(checkpoint) != digest:
        raise BundleError(f"training state {directory}: checkpoint {name} is corrupted (sha256 differs)")
    return checkpoint, progress
