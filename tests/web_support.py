"""Helpers of the web runtime's tests: npm packages, node scripts, tiny text bundles and data."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import subprocess
from pathlib import Path

import pytest

WEB = Path(__file__).resolve().parents[1] / "edgepeft" / "web"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")


def need_node_modules() -> None:
    """Skip outside CI when `npm ci` has not been run in edgepeft/web; fail in CI (it must have been)."""
    ready = shutil.which("node") and (WEB / "node_modules" / "onnxruntime-web").is_dir()
    if not ready:
        if os.environ.get("CI"):
            pytest.fail("edgepeft/web/node_modules is missing: .ci/run must run `npm ci` in edgepeft/web")
        pytest.skip("run `npm ci` in edgepeft/web for the web runtime's tests")


def need_chromium() -> None:
    need_node_modules()
    if not Path(CHROMIUM).is_file():
        if os.environ.get("CI"):
            pytest.fail(f"{CHROMIUM} is missing: .ci/run must `apt-get install -y chromium`")
        pytest.skip("apt-get install -y chromium for the browser tests")


def node(script: str, *args: str, timeout: float = 600) -> str:
    """Run a node script of edgepeft/web; its stdout (a failure shows its stderr)."""
    done = subprocess.run(["node", str(WEB / script), *map(str, args)], capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stdout


def node_json(script: str, *args: str, timeout: float = 600) -> dict:
    return json.loads(node(script, *args, timeout=timeout))


def learnable_csv(path: Path, rows: int = 48, seed: int = 0) -> Path:
    """Texts of the tiny BERT's words; label `a` for words of its first half, `b` for its second."""
    from tiny_bert import WORDS

    rng = random.Random(seed)
    half = len(WORDS) // 2
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["text", "label"])
        for i in range(rows):
            words = WORDS[:half] if i % 2 == 0 else WORDS[half:]
            text = " ".join(rng.choice(words) for _ in range(rng.randint(3, 9))).capitalize() + "."
            writer.writerow([text, "ab"[i % 2]])
    return path
