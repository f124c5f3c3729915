"""A kill at every step of a store save and of a checkpoint save leaves the old version or the new, never neither.

A child process runs the write with `EDGEPEFT_CRASH_AT=N` (see `edgepeft.fileio.crash_point`): the Nth point
between two steps of the write ends the child with `os._exit(17)`, as a kill would. The parent then opens the
store or the state and checks it. N goes up until the child finishes without reaching the Nth point.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from edgepeft.fileio import CRASH_ENV
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.checkpoint import read_state
from edgepeft.runtime.store import AdapterStore

KILLED = 17


def _run_until_done(script: str, args: list[str], before_each, after_each, limit: int = 60) -> list[str]:
    """Run `script` killed at point 1, 2, ... (calling `before_each(n)` and `after_each(n)` around each run)
    until it completes; return the names of the points it was killed at."""
    points = []
    for n in range(1, limit):
        before_each(n)
        env = {**os.environ, CRASH_ENV: str(n)}
        run = subprocess.run([sys.executable, "-c", script, *args], env=env, capture_output=True, text=True,
                             timeout=300)  # fmt: skip
        if run.returncode == 0:
            after_each(n)
            return points
        assert run.returncode == KILLED, run.stderr[-2000:]
        points.append(run.stderr.strip().splitlines()[-1])
        after_each(n)
    raise AssertionError(f"the write did not finish within {limit} crash points")


STORE_WRITER = textwrap.dedent(
    """
    import sys
    import edgepeft.fileio
    from edgepeft.runtime import open_bundle
    from edgepeft.runtime.store import AdapterStore
    bundle, root, mode = sys.argv[1:4]
    if mode == "renames":  # the portable fallback, where the system cannot exchange two directories
        edgepeft.fileio.exchange = lambda a, b: False
    store = AdapterStore(root, open_bundle(bundle, verify=False).manifest)
    new = {k: v + 1 for k, v in store.load("a").items()}
    store.save("a", new, steps=2, score=0.9)  # replaces an adapter
    store.save("b", new, steps=2)  # a new one
    store.delete("c")
    """
)


@pytest.mark.parametrize("mode", ["exchange", "renames"])
def test_a_kill_at_every_step_of_a_store_save_leaves_old_or_new(mlp_bundle, tmp_path, mode):
    session = TrainingSession(mlp_bundle)
    old = session.trainable_values()
    new = {k: v + 1 for k, v in old.items()}
    template = tmp_path / "template"
    store = AdapterStore(template, session.manifest)
    store.save("a", old, steps=1, score=0.5)
    store.save("c", old, steps=1)
    root = tmp_path / "store"

    def fresh(n: int) -> None:
        shutil.rmtree(root, ignore_errors=True)
        shutil.copytree(template, root)

    def check(n: int) -> None:
        store = AdapterStore(root, session.manifest)
        names = [info.name for info in store.list()]
        assert "a" in names and set(names) <= {"a", "b", "c"}, (n, names)
        version = {1: old, 2: new}[store.info("a").steps]  # metadata and weights from the same version
        assert all(np.array_equal(store.load("a")[k], v) for k, v in version.items()), n
        if "b" in names:
            assert all(np.array_equal(store.load("b")[k], v) for k, v in new.items()), n
        if "c" in names:
            assert all(np.array_equal(store.load("c")[k], v) for k, v in old.items()), n
        store.save("d", old, steps=0)  # the next write cleans up what a kill left
        assert sorted(p.name for p in root.iterdir() if p.name.startswith(".")) == [".lock"], n

    points = _run_until_done(STORE_WRITER, [str(mlp_bundle), str(root), mode], fresh, check)
    assert len(points) >= 12, points


STATE_WRITER = textwrap.dedent(
    """
    import sys
    from edgepeft.runtime import TrainingSession
    bundle, state, mode = sys.argv[1:4]
    session = TrainingSession(bundle, state=state) if mode == "same-step" else TrainingSession(bundle)
    session.set_trainable({k: v + 1 for k, v in session.trainable_values().items()})  # e.g. older ones restored
    session.save_state(state)
    """
)


@pytest.mark.parametrize("mode", ["same-step", "new"])
def test_a_kill_at_every_step_of_a_checkpoint_save_leaves_old_or_new(mlp_bundle, tmp_path, mode):
    session = TrainingSession(mlp_bundle)
    old = session.trainable_values()
    new = {k: v + 1 for k, v in old.items()}
    template, state = tmp_path / "template", tmp_path / "state"
    if mode == "same-step":
        session.save_state(template)  # the child saves again at the same step, with other parameters

    def fresh(n: int) -> None:
        shutil.rmtree(state, ignore_errors=True)
        if template.exists():
            shutil.copytree(template, state)

    def check(n: int) -> None:
        if mode == "new" and not (state / "progress.json").exists():
            assert not state.exists() or not any(state.iterdir()), (n, list(state.iterdir()))  # old: no state
        else:
            read_state(state, session.manifest.base_fingerprint)
            values = TrainingSession(mlp_bundle, state=state).trainable_values()
            assert any(all(np.array_equal(values[k], v[k]) for k in v) for v in (old, new)), n
        session.save_state(state)  # the next save works and cleans up
        names = sorted(p.name for p in state.iterdir())
        assert len(names) == 2 and names[0].startswith("checkpoint-0") and names[1] == "progress.json", (n, names)
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == [], n

    points = _run_until_done(STATE_WRITER, [str(mlp_bundle), str(state), mode], fresh, check)
    assert len(points) >= (4 if mode == "same-step" else 7), points


READER = textwrap.dedent(
    """
    import json, os, sys
    from edgepeft.runtime import open_bundle
    from edgepeft.runtime.store import AdapterStore
    bundle, root, stop = sys.argv[1:4]
    store = AdapterStore(root, open_bundle(bundle, verify=False).manifest)
    print("ready", flush=True)
    reads, failures = 0, []
    while not os.path.exists(stop):
        try:
            store.load("a")
            assert [info.name for info in store.list()] == ["a"]
            store.info("a")
        except Exception as e:
            failures.append(f"{type(e).__name__}: {e}")
        reads += 1
    print(json.dumps({"reads": reads, "failures": failures[:3], "failed": len(failures)}))
    """
)


def test_a_reader_never_misses_an_adapter_while_it_is_replaced(mlp_bundle, tmp_path):
    import json

    session = TrainingSession(mlp_bundle)
    store = AdapterStore(tmp_path / "store", session.manifest)
    values = session.trainable_values()
    store.save("a", values, steps=0)
    stop = tmp_path / "stop"
    reader = subprocess.Popen([sys.executable, "-c", READER, str(mlp_bundle), str(tmp_path / "store"), str(stop)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert reader.stdout.readline().strip() == "ready"
        for i in range(100):
            store.save("a", {k: v + i for k, v in values.items()}, steps=i)
    finally:
        Path(stop).touch()
        out, _ = reader.communicate(timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["reads"] > 20 and result["failed"] == 0, result


def _renames_then_syncs(monkeypatch, write) -> list[tuple[str, str]]:
    """Run `write()` recording, in order, every rename/replace/exchange and every directory fsync it makes
    (the real calls still happen), and check that each rename's directory is fsynced before the next rename:
    the order of renames then survives a power loss, not only a kill."""
    from edgepeft import fileio
    from edgepeft.runtime import checkpoint

    events: list[tuple[str, str]] = []

    def recording(kind, function, directory_of):
        def call(*args, **kwargs):
            result = function(*args, **kwargs)
            if kind != "rename" or result is not False:
                events.append((kind, str(directory_of(*args))))
            return result

        return call

    parent = lambda src, dst=None, *rest: Path(dst if dst is not None else src).parent  # noqa: E731
    monkeypatch.setattr(os, "rename", recording("rename", os.rename, parent))
    monkeypatch.setattr(os, "replace", recording("rename", os.replace, parent))
    monkeypatch.setattr(fileio, "exchange", recording("rename", fileio.exchange, lambda a, b: Path(b).parent))
    sync = recording("fsync", fileio.fsync_directory, lambda d: Path(d))
    monkeypatch.setattr(fileio, "fsync_directory", sync)
    monkeypatch.setattr(checkpoint, "fsync_directory", sync)
    write()
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert renames, events
    for i in renames:
        following = events[i + 1 :]
        next_rename = next((j for j, (kind, _) in enumerate(following) if kind == "rename"), len(following))
        assert ("fsync", events[i][1]) in following[:next_rename], (events[i], events)
    return events


def test_every_rename_of_a_checkpoint_and_an_adapter_is_made_durable(mlp_bundle, tmp_path, monkeypatch):
    session = TrainingSession(mlp_bundle)
    session.save_state(tmp_path / "state")
    session.save_adapter(tmp_path / "adapter")
    events = _renames_then_syncs(monkeypatch, lambda: session.save_state(tmp_path / "state"))  # an update
    assert ("fsync", str(tmp_path / "state")) in events  # the checkpoint's name, then progress.json
    _renames_then_syncs(monkeypatch, lambda: session.save_state(tmp_path / "new-state"))
    _renames_then_syncs(monkeypatch, lambda: session.save_adapter(tmp_path / "adapter"))  # a replace
    store = AdapterStore(tmp_path / "store", session.manifest)
    _renames_then_syncs(monkeypatch, lambda: store.save("me", session.trainable_values(), steps=0))
