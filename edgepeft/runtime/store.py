"""`AdapterStore`: many named adapters beside one base bundle, with metadata, an active one, and a lock.

Layout under the store's root:
    <name>/adapter_config.json, <name>/adapter_model.safetensors   a PEFT adapter (see adapter.py)
    <name>/edgepeft_adapter.json                                    base fingerprint, created, steps, score
    active.json                                                     the active adapter's name
    .lock                                                           held while one process writes
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from edgepeft.errors import AdapterError
from edgepeft.fileio import read_json_object, write_json_atomic
from edgepeft.manifest import Manifest
from edgepeft.runtime.adapter import load_adapter, save_adapter

META = "edgepeft_adapter.json"
ACTIVE = "active.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class AdapterInfo:
    """What the store knows of one adapter. `score` is a validation score, higher is better."""

    name: str
    base_fingerprint: str
    created: str
    steps: int
    score: float | None


class AdapterStore:
    """Named adapters for one bundle. Writes take an exclusive lock: a second writer gets a clear error."""

    def __init__(self, root: str | os.PathLike, manifest: Manifest):
        self.root = Path(root)
        self.manifest = manifest
        self.root.mkdir(parents=True, exist_ok=True)

    def save(
        self,
        name: str,
        values: dict[str, np.ndarray],
        steps: int,
        score: float | None = None,
        only_if_better: bool = False,
    ) -> bool:
        """Store `values` as adapter `name`. With `only_if_better`, keep an existing adapter that scores at least
        as well (a missing score never counts as better). Returns whether the adapter was written."""
        path = self._path(name)
        with self.lock():
            if only_if_better and path.exists():
                old = self.info(name).score
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
        return [self.info(p.name) for p in sorted(self.root.iterdir()) if p.is_dir() and (p / META).is_file()]

    def activate(self, name: str) -> None:
        self._existing(name)
        with self.lock():
            write_json_atomic(self.root / ACTIVE, {"name": name})

    @property
    def active(self) -> str | None:
        path = self.root / ACTIVE
        if not path.exists():
            return None
        name = read_json_object(path, AdapterError, "active adapter record").get("name")
        return name if isinstance(name, str) and (self.root / name / META).is_file() else None

    def delete(self, name: str) -> None:
        path = self._existing(name)
        with self.lock():
            if self.active == name:
                (self.root / ACTIVE).unlink()
            shutil.rmtree(path)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Exclusive, non-blocking: a second process writing into the same store fails at once."""
        with open(self.root / ".lock", "a+") as handle:
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


def _now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
