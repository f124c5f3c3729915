"""`AdapterStore`: many named adapters beside one base bundle, with metadata, an active one, and a lock.

Layout under the store's root:
    edgepeft_store.json                                             marks the directory as a store
    <name>/adapter_config.json, <name>/adapter_model.safetensors   a PEFT adapter (see adapter.py)
    <name>/edgepeft_adapter.json                                    base fingerprint, created, steps, score
    active.json                                                     the active adapter's name
    .lock                                                           held while one process writes

An adapter is replaced in one atomic exchange (see `edgepeft.fileio.atomic_directory`): a reader, or a kill
at any moment, finds the old adapter or the new one. Hidden leftovers of killed writes are ignored by
readers and removed by the next writer (readers never take the lock).
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterError
from edgepeft.fileio import (
    TEMPORARY_SUFFIX,
    DirKind,
    claim_directory,
    crash_point,
    fsync_directory,
    read_json_object,
    recover_moved_aside,
    remove_leftovers,
    write_json_atomic,
)
from edgepeft.manifest import Manifest
from edgepeft.runtime.adapter import load_adapter, save_adapter

META = "edgepeft_adapter.json"
ACTIVE = "active.json"
MARKER = "edgepeft_store.json"
LOCK = ".lock"
STORE = DirKind("an adapter store", (MARKER,))
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")

# rescore(values) -> the stored adapter's score on the caller's validation data (higher is better)
Rescore = Callable[[dict[str, np.ndarray]], float]


@dataclass(frozen=True)
class AdapterInfo:
    """What the store knows of one adapter. `score` is a validation score, higher is better."""

    name: str
    base_fingerprint: str
    created: str
    steps: int
    score: float | None


class AdapterStore:
    """Named adapters for one bundle. Writes take an exclusive lock: a second writer gets a clear error.

    `root` must be new, empty, or a store; `protect` paths (the bundle) must not hold it or be held by it.

    Raises:
        OutputError: `root` is a file, a non-empty directory that is not a store, or inside the bundle.
    """

    def __init__(self, root: str | os.PathLike, manifest: Manifest, protect: Iterable[str | os.PathLike] = ()):
        self.root = Path(root)
        self.manifest = manifest
        signature = _signature(manifest)
        if (self.root / LOCK).is_file() and not (self.root / MARKER).exists():
            write_json_atomic(self.root / MARKER, signature)  # a store made before the marker existed
        claim_directory(self.root, STORE, protect)
        record = read_json_object(self.root / MARKER, AdapterError, "adapter store record") if (
            self.root / MARKER).exists() else {}  # fmt: skip
        if "trainable" not in record:  # new, or made before the store recorded its bundle
            write_json_atomic(self.root / MARKER, signature)
        elif record != signature:
            raise AdapterError(f"adapter store {self.root} belongs to another bundle: {_difference(record, signature)}")
        recover_moved_aside(self.root)  # only where a replace without atomic exchange was killed

    def save(
        self,
        name: str,
        values: dict[str, np.ndarray],
        steps: int,
        score: float | None = None,
        only_if_better: bool = False,
        rescore: Rescore | None = None,
    ) -> bool:
        """Store `values` as adapter `name`. With `only_if_better`, keep an existing adapter that scores at least
        as well (a missing score never counts as better): its score is `rescore(its values)` when given (the
        caller's validation data, the same `score` was measured on), else its recorded score. The comparison
        and the write are one locked operation. Returns whether the adapter was written."""
        path = self._path(name)
        with self.lock():
            remove_leftovers(self.root)
            if only_if_better and (path / META).is_file():
                old = rescore(self.load(name)) if rescore is not None else self.info(name).score
                if old is not None and (score is None or score <= old):
                    return False
            info = AdapterInfo(name, self.manifest.base_fingerprint, _now(), int(steps), score)
            save_adapter(self.manifest, values, path, overwrite=True, extra={META: asdict(info)})
        return True

    def load(self, name: str) -> dict[str, np.ndarray]:
        """The adapter's values by ONNX parameter name, checked against the bundle."""
        return load_adapter(self.manifest, self._existing(name))

    def info(self, name: str) -> AdapterInfo:
        data = read_json_object(self._existing(name) / META, AdapterError, "adapter metadata")
        try:
            return AdapterInfo(**data)
        except TypeError as e:
            raise AdapterError(f"adapter metadata of {name!r} is malformed: {e}") from None

    def list(self) -> list[AdapterInfo]:
        """Every adapter, by name (hidden leftovers of interrupted writes are not adapters)."""
        names = [p.name for p in sorted(self.root.iterdir()) if _NAME.fullmatch(p.name) and (p / META).is_file()]
        return [self.info(name) for name in names]

    def activate(self, name: str) -> None:
        with self.lock():
            self._existing(name)
            write_json_atomic(self.root / ACTIVE, {"name": name})

    @property
    def active(self) -> str | None:
        path = self.root / ACTIVE
        if not path.exists():
            return None
        name = read_json_object(path, AdapterError, "active adapter record").get("name")
        return name if isinstance(name, str) and (self.root / name / META).is_file() else None

    def delete(self, name: str) -> None:
        """Remove adapter `name` in one rename (a kill leaves it whole or gone), then delete its files."""
        with self.lock():
            remove_leftovers(self.root)
            path = self._existing(name)
            if self.active == name:
                (self.root / ACTIVE).unlink()
            hidden = tempfile.mkdtemp(prefix=f".{name}.", suffix=TEMPORARY_SUFFIX, dir=self.root)
            os.rename(path, hidden)  # over the empty directory just made
            fsync_directory(self.root)
            crash_point(f"{name}: moved aside to delete")
            shutil.rmtree(hidden)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking: a second process writing into the same store fails at once."""
        with open(self.root / LOCK, "a+") as handle:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AdapterError(f"adapter store {self.root} is in use by another process") from None
            try:
                yield
            finally:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

    def _path(self, name: str) -> Path:
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            raise AdapterError(f"adapter name {name!r} is not allowed (letters, digits, '_', '-', '.'; at most 64)")
        return self.root / name

    def _existing(self, name: str) -> Path:
        path = self._path(name)
        if not (path / META).is_file():
            raise AdapterError(f"adapter store {self.root} has no adapter named {name!r}")
        return path


def _signature(manifest: Manifest) -> dict:
    """What every adapter of a store must fit: the bundle's base model and its trainable tensors' shapes."""
    return {
        "format": 1,
        "base_fingerprint": manifest.base_fingerprint,
        "trainable": {spec.name: list(spec.shape) for spec in manifest.trainable},
    }


def _difference(record: dict, signature: dict) -> str:
    if record.get("base_fingerprint") != signature["base_fingerprint"]:
        return "its adapters were made for another base model (fingerprint differs)"
    theirs, ours = record.get("trainable", {}), signature["trainable"]
    for name in sorted(set(theirs) | set(ours)):
        if theirs.get(name) != ours.get(name):
            return f"{name} has shape {theirs.get(name)} in the store, {ours.get(name)} in this bundle"
    return "its record differs"


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
