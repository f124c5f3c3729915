"""Training steps of several systems interleaved step by step, each system in its own long-lived process.

A shared machine has phases: minutes in which everything that runs takes up to twice the CPU time (measured in
session 15 on a 2-core AMD EPYC VM: one process's steps switched between ~850 and ~1,600 ms and stayed in a mode
for many steps). Steps measured in separate processes minutes apart then compare one system's fast phase with
another's slow one. Here each system's worker loads once and then takes one step at a time when told to; the
systems take turns, step by step, in an order that rotates each turn, so every system samples the same phases.

Each worker is `python -m edgepeft.bench.worker JOB` with a serving task (`lm_train`); it answers on stdout with
lines starting with `PREFIX` (anything else a library prints there is ignored), and at the end prints its JSON
figures line (peak RSS, torch loaded) as every worker does; a device worker that loaded torch is refused.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from typing import Any

from edgepeft.bench.run import device_checked, worker_environment
from edgepeft.errors import EdgePeftError

PREFIX = "@edgepeft-step "


def answer(message: dict[str, Any]) -> None:
    """A serving worker's reply to the coordinator (one line on stdout)."""
    print(PREFIX + json.dumps(message), flush=True)


class _Worker:
    """One system's serving process: `step()` runs one step there and returns its ms (timed in the worker)."""

    def __init__(self, name: str, job: dict[str, Any], env: dict[str, str], timeout: float):
        self.name, self.job, self.timeout = name, job, timeout
        self.stderr = tempfile.TemporaryFile(mode="w+")
        self.process = subprocess.Popen([sys.executable, "-m", "edgepeft.bench.worker", json.dumps(job)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                        text=True, env=env)  # fmt: skip
        self._read()  # {"ready": true}: loaded and ready to train

    def _read(self) -> dict[str, Any]:
        for line in self.process.stdout:
            if line.startswith(PREFIX):
                return json.loads(line[len(PREFIX):])
        raise self._failed()

    def _failed(self) -> EdgePeftError:
        self.process.wait(timeout=self.timeout)
        self.stderr.seek(0)
        last = (self.stderr.read().strip().splitlines() or ["no error output"])[-1]
        return EdgePeftError(f"benchmark worker {self.name} failed: {last}")

    def step(self) -> dict[str, float]:
        """One step: its `ms` and the wall-clock time it `started` (time.time())."""
        self.process.stdin.write("step\n")
        self.process.stdin.flush()
        return self._read()

    def finish(self) -> dict[str, Any]:
        """End the worker; its final figures (refused if a device worker loaded torch)."""
        out, _ = self.process.communicate("end\n", timeout=self.timeout)
        if self.process.returncode != 0:
            raise self._failed()
        return device_checked(self.job, json.loads(out.strip().splitlines()[-1]))

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.stderr.close()


def interleaved_steps(jobs: dict[str, dict[str, Any]], warmup: int, steps: int, timeout: float = 3600,
                      pause: float = 0.05) -> dict[str, Any]:  # fmt: skip
    """Start a serving worker per job (one after another, each loaded before the next starts), take `warmup`
    untimed and then `steps` timed steps of each, the systems in turn with the order rotating every turn, and
    end them. Each step waits `pause` seconds after the one before: a thread pool spins for a while after its
    work (measured after a SmolLM2 step: ~20 ms of CPU in ORT's, ~10 ms in PyTorch's), and the next system's
    step should not share the cores with it. Returns each job's final figures with its timed steps' ms
    (`times_ms`, in the order taken) and the wall-clock time each started (`started_s`)."""
    env = worker_environment()
    workers: dict[str, _Worker] = {}
    try:
        for name, job in jobs.items():
            workers[name] = _Worker(name, job, env, timeout)
        names = list(workers)
        timed: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        for turn in range(warmup + steps):
            for name in names[turn % len(names):] + names[: turn % len(names)]:
                time.sleep(pause)
                step = workers[name].step()
                if turn >= warmup:
                    timed[name].append(step)
        return {name: {**workers[name].finish(), "times_ms": [s["ms"] for s in timed[name]],
                       "started_s": [s["started"] for s in timed[name]]} for name in names}  # fmt: skip
    finally:
        for worker in workers.values():
            worker.kill()
