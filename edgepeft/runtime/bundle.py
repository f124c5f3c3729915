"""Open a bundle directory: read its manifest and check that every file is there and intact."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

from edgepeft import manifest as mf
from edgepeft.errors import BundleError
from edgepeft.fileio import sha256_file

logger = logging.getLogger(__name__)

REQUIRED = (mf.TRAINING_MODEL, mf.EVAL_MODEL, mf.OPTIMIZER_MODEL, mf.CHECKPOINT, mf.ADAPTER_CONFIG)


@dataclass(frozen=True)
class Bundle:
    """A verified bundle on disk."""

    path: Path
    manifest: mf.Manifest

    def file(self, name: str) -> Path:
        return self.path / name

    @property
    def has_tokenizer(self) -> bool:
        return mf.TOKENIZER in self.manifest.files


def open_bundle(path: str | os.PathLike, verify: bool = True) -> Bundle:
    """Read `manifest.json` and check each listed file's sha256 (skip the hashing with verify=False).

    Raises:
        BundleError: the directory is not a bundle, a file is missing, or a file's checksum differs.
    """
    path = Path(path)
    if not path.is_dir():
        raise BundleError(f"bundle directory {path} does not exist")
    manifest = mf.Manifest.load(path)
    for name in REQUIRED:
        if name not in manifest.files:
            raise BundleError(f"bundle manifest does not list {name}")
    messages = {
        MISSING: f"is missing from {path}",
        OUTSIDE: "links outside the bundle",
        CORRUPTED: "is corrupted: its sha256 differs from the manifest",
    }
    for name, digest in manifest.files.items():
        problem = file_problem(path, name, digest, verify)
        if problem is not None:
            raise BundleError(f"bundle file {name} {messages[problem]}")
    return Bundle(path, manifest)


MISSING, OUTSIDE, CORRUPTED = "missing", "outside", "corrupted"


def file_problem(path: Path, name: str, digest: str, verify: bool = True) -> str | None:
    """What is wrong with one file the manifest lists: MISSING, OUTSIDE (a link out of the bundle), CORRUPTED
    (its sha256 differs; checked only with `verify`), or None."""
    file = path / name
    if not file.is_file():
        return MISSING
    if not file.resolve().is_relative_to(path.resolve()):
        return OUTSIDE
    if verify and sha256_file(file) != digest:
        return CORRUPTED
    return None
