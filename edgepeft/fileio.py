"""Small file helpers shared by host and device: hashing, and output directories that are written all at once
and never replace what is not theirs.

Every writer of a directory names its `DirKind` (the marker files only it writes). `check_output_directory`
refuses a target that is a file, a non-empty directory of another kind, or inside (or holding) a protected
path such as the bundle being trained. `atomic_directory` builds the new version in a hidden temporary directory
beside the target and swaps it in with one atomic exchange (Linux `renameat2(RENAME_EXCHANGE)`, macOS
`renamex_np(RENAME_SWAP)`), so a reader or a kill at any moment finds the old version or the new one. Where the
exchange is unsupported, two renames are used and the next write recovers the old version if a kill came
between them.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import functools
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from edgepeft.errors import OutputError

logger = logging.getLogger(__name__)

CRASH_ENV = "EDGEPEFT_CRASH_AT"
_crash_points_passed = 0


def crash_point(name: str) -> None:
    """Test hook: with `EDGEPEFT_CRASH_AT=N` set, the Nth point reached ends the process at once (exit code 17),
    as a kill would. Multi-step writers call it between their steps; unset, it does nothing."""
    global _crash_points_passed
    at = os.environ.get(CRASH_ENV)
    if not at:
        return
    _crash_points_passed += 1
    if _crash_points_passed == int(at):
        sys.stderr.write(f"edgepeft: crash point {_crash_points_passed}: {name}\n")
        sys.stderr.flush()
        os._exit(17)


def disk_bytes(path: str | os.PathLike) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def sha256_file(path: str | os.PathLike) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fsync_file(path: Path) -> None:
    """Flush a file's bytes to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_directory(directory: Path) -> None:
    """Flush a directory's entries (a rename inside it) to the disk."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def read_json_object(path: Path, error: type[Exception], what: str) -> dict:
    """Parse a JSON file that must hold an object; any problem raises `error` naming `what` and the path."""
    if not path.is_file():
        raise error(f"{what} {path} is missing")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise error(f"{what} {path} is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise error(f"{what} {path} does not hold a JSON object")
    if CHECKSUM_FIELD in data:
        claimed = data.pop(CHECKSUM_FIELD)
        if claimed != json_checksum(data):
            raise error(f"{what} {path} is corrupted (checksum differs)")
    return data


CHECKSUM_FIELD = "_sha256"


def json_checksum(data: dict) -> str:
    """sha256 of an object's canonical JSON (sorted keys, no whitespace)."""
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def current_umask() -> int:
    """The process's umask (reading it means setting it: it is put back at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, data: dict) -> None:
    """Write JSON with its own checksum to a temporary file beside `path`, fsync it, rename it over `path`,
    and fsync the directory so the rename survives a power loss.

    `read_json_object` verifies the checksum.
    """
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~current_umask())  # mkstemp makes 0600: give it what a plain open() would
        with os.fdopen(fd, "w") as f:
            json.dump({**data, CHECKSUM_FIELD: json_checksum(data)}, f, indent=2, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        crash_point(f"{path.name} written beside")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_directory(path.parent)
    crash_point(f"{path.name} replaced")


@dataclass(frozen=True)
class DirKind:
    """What one writer puts in its output directories. `name` (with its article) is for messages; `markers` are
    files only that writer writes: a directory holds the kind when all are there (any one, with `any_marker`)."""

    name: str
    markers: tuple[str, ...]
    any_marker: bool = False

    def holds(self, directory: Path) -> bool:
        present = [(directory / marker).is_file() for marker in self.markers]
        return any(present) if self.any_marker else all(present)


def _inside(path: Path, other: Path) -> bool:
    return path == other or path.is_relative_to(other)


def check_output_directory(
    target: str | os.PathLike, kind: DirKind, overwrite: bool = True, protect: Iterable[str | os.PathLike] = ()
) -> Path:
    """Refuse a `target` that a writer of `kind` must not write: a file or a link, a non-empty directory that
    does not hold `kind` (or does, without `overwrite`), or a path equal to, inside, or holding a `protect` path.

    Raises:
        OutputError: naming the path and what to do instead.
    """
    target = Path(target)
    _refuse_protected(target, kind.name, protect, holding=True)
    if target.is_symlink():
        raise OutputError(f"refusing to write {kind.name} to {target}: it is a symbolic link; give a real path")
    if not target.exists():
        return target
    if not target.is_dir():
        raise OutputError(f"refusing to write {kind.name} to {target}: it is a file, not a directory")
    if not any(target.iterdir()):
        return target
    if not kind.holds(target):
        listed = (" or " if kind.any_marker else " and ").join(kind.markers)
        raise OutputError(f"refusing to replace {target}: it is not empty and is not {kind.name} (no {listed}); "
                          "choose a new or empty directory")  # fmt: skip
    if not overwrite:
        raise OutputError(f"{target} already holds {kind.name}: pass overwrite=True to replace it")
    return target


def _refuse_protected(target: Path, what: str, protect: Iterable[str | os.PathLike], holding: bool) -> None:
    """Refuse a `target` equal to or inside a `protect` path (the bundle), or, with `holding`, one holding it."""
    resolved = target.resolve()
    for protected in protect:
        protected = Path(protected).resolve()
        if _inside(resolved, protected):
            raise OutputError(f"refusing to write {what} to {target}: it is inside the bundle {protected}; "
                              "choose a path outside it")  # fmt: skip
        if holding and _inside(protected, resolved):
            raise OutputError(f"refusing to write {what} to {target}: it holds the bundle {protected}, "
                              "which would be deleted; choose another path")  # fmt: skip


def is_onnx_model(path: Path) -> bool:
    """Whether a file looks like a serialized ONNX ModelProto: empty, or opening with field 1 (`ir_version`)."""
    with open(path, "rb") as f:
        head = f.read(1)
    return head in (b"", b"\x08")


def check_output_file(
    target: str | os.PathLike, what: str, replaceable: Callable[[Path], bool], protect: Iterable[str | os.PathLike] = ()
) -> Path:
    """Refuse a file `target` that is a directory, is inside or holds a `protect` path, or already exists
    without being `replaceable` (a file of what this writer writes).

    Raises:
        OutputError: naming the path and what to do instead.
    """
    target = Path(target)
    _refuse_protected(target, what, protect, holding=False)
    if target.is_dir():
        raise OutputError(f"refusing to write {what} to {target}: it is a directory; give a file path")
    if target.exists() and not replaceable(target):
        raise OutputError(f"refusing to replace {target}: it is not {what}; choose a new file name")
    return target


def claim_directory(target: str | os.PathLike, kind: DirKind, protect: Iterable[str | os.PathLike] = ()) -> Path:
    """Check `target` as `check_output_directory` does and create it: for writers that add files one by one
    into a directory of their own (a store, benchmark results, the demo's working directory)."""
    target = check_output_directory(target, kind, overwrite=True, protect=protect)
    target.mkdir(parents=True, exist_ok=True)
    return target


TEMPORARY_SUFFIX, OLD_SUFFIX = ".edgepeft-tmp", ".edgepeft-old"  # hidden siblings: .NAME.XXXXXXXX.edgepeft-tmp
_TEMPORARY = re.compile(r"\.(?P<name>.+)\.[a-z0-9_]{8}" + re.escape(TEMPORARY_SUFFIX))
_OLD = re.compile(r"\.(?P<name>.+)" + re.escape(OLD_SUFFIX))


def recover_moved_aside(parent: str | os.PathLike, name: str | None = None) -> None:
    """Put back an old version that a fallback replace (two renames) moved aside before it was killed, where
    nothing took its place. Safe without a lock: a rename that loses a race with a writer changes nothing."""
    parent = Path(parent)
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        match = _OLD.fullmatch(path.name)
        if match is None or (name is not None and match["name"] != name) or (parent / match["name"]).exists():
            continue
        with contextlib.suppress(OSError):
            os.rename(path, parent / match["name"])
            fsync_directory(parent)
            logger.warning("recovered %s from an interrupted replace", parent / match["name"])


def remove_leftovers(parent: str | os.PathLike, name: str | None = None) -> None:
    """Clean up after writes into `parent` (of `name`, or of any name) that were killed: put back an old
    version moved aside, then remove temporary directories no live writer holds and old versions replaced."""
    parent = Path(parent)
    recover_moved_aside(parent, name)
    if not parent.is_dir():
        return
    for path in parent.iterdir():
        temporary, old = _TEMPORARY.fullmatch(path.name), _OLD.fullmatch(path.name)
        match = temporary or old
        if match is None or (name is not None and match["name"] != name) or not path.is_dir() or path.is_symlink():
            continue
        if temporary is not None and not _unheld(path):
            continue  # a live writer's
        logger.info("removing %s, left by an interrupted write", path)
        shutil.rmtree(path, ignore_errors=True)


def _unheld(path: Path) -> bool:
    """Whether no process holds the lock a writer takes on its temporary directory."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without flock: keep it, a leftover is harmless
        return False
    finally:
        os.close(fd)


def _hold(path: Path) -> int:
    """Lock a temporary directory for as long as its writer lives (released by the kernel on a kill)."""
    fd = os.open(path, os.O_RDONLY)
    with contextlib.suppress(OSError):
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return fd


_AT_FDCWD = -100
_RENAME_EXCHANGE = 2  # linux/fs.h
_RENAME_SWAP = 2  # macOS stdio.h


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step; False where the system or filesystem cannot."""
    libc = _libc()
    if sys.platform.startswith("linux") and hasattr(libc, "renameat2"):
        libc.renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
        rc = libc.renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE)
    elif sys.platform == "darwin" and hasattr(libc, "renamex_np"):
        libc.renamex_np.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_uint]
        rc = libc.renamex_np(os.fsencode(a), os.fsencode(b), _RENAME_SWAP)
    else:
        return False
    if rc == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _fsync_tree(root: Path) -> None:
    for path in root.rglob("*"):
        if path.is_file():
            fsync_file(path)
        elif path.is_dir():
            fsync_directory(path)
    fsync_directory(root)


@contextlib.contextmanager
def atomic_directory(
    target: str | os.PathLike, kind: DirKind, overwrite: bool = False, protect: Iterable[str | os.PathLike] = ()
) -> Iterator[Path]:
    """Yield a temporary directory beside `target`; on success it replaces `target` in one atomic step.

    `target` must be new, empty, or (with `overwrite`) hold `kind` already; see `check_output_directory`.
    On any exception the temporary directory is removed and `target` is left as it was.

    Raises:
        OutputError: `target` must not be written (it names the path and why).
    """
    target, protect = Path(target), tuple(protect)
    remove_leftovers(target.parent, target.name)  # first: it may put back the old version of `target`
    check_output_directory(target, kind, overwrite, protect)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=TEMPORARY_SUFFIX, dir=target.parent))
    held = _hold(tmp)
    try:
        tmp.chmod(0o777 & ~current_umask())  # mkdtemp makes 0700: give it what a plain mkdir() would
        crash_point(f"{target.name}: temporary directory created")
        yield tmp
        crash_point(f"{target.name}: temporary directory written")
        _fsync_tree(tmp)
        crash_point(f"{target.name}: temporary directory synced")
        check_output_directory(target, kind, overwrite, protect)  # again: the target may have changed meanwhile
        if not target.exists() or not any(target.iterdir()):
            os.rename(tmp, target)  # replaces an empty directory too
            fsync_directory(target.parent)
        else:
            _replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        os.close(held)
    crash_point(f"{target.name}: in place")


def _replace(new: Path, target: Path) -> None:
    """Put the complete directory `new` in place of `target`, then delete the old version."""
    if exchange(new, target):
        fsync_directory(target.parent)
        crash_point(f"{target.name}: exchanged")
        shutil.rmtree(new, ignore_errors=True)  # the old version now
        return
    old = target.with_name(f".{target.name}{OLD_SUFFIX}")
    shutil.rmtree(old, ignore_errors=True)
    os.rename(target, old)
    crash_point(f"{target.name}: old version moved aside")
    try:
        os.rename(new, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_directory(target.parent)
    crash_point(f"{target.name}: new version renamed")
    shutil.rmtree(old, ignore_errors=True)
