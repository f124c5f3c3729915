"""Memory budgets: the exporter's measured profile, the estimate, refusing or lowering the batch size."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tiny_models

from edgepeft import manifest as mf
from edgepeft.errors import InputError
from edgepeft.export import ExportOptions, LoraSpec, export
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.memory import PROFILE_KEY, estimate_peak_mb, fit_profile, largest_batch_within


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    model, example = tiny_models.mlp()
    out = tmp_path_factory.mktemp("mlp") / "bundle"
    export(model, out, example_inputs=example, lora=LoraSpec(target_modules=("fc1", "fc2"), modules_to_save=("head",)),
           options=ExportOptions(profile_memory=True))  # fmt: skip
    return out


def _data(session, rows=64):
    x = np.random.default_rng(0).normal(size=(rows, 16)).astype(np.float32)
    return session.dataset({"x": x}, x[:, :4].argmax(axis=1))


MEASURE = """
import sys
sys.modules["torch"] = None
import numpy as np
from edgepeft.runtime import TrainConfig, TrainingSession
from edgepeft.runtime.memory import peak_rss_mb
session = TrainingSession(sys.argv[1])
x = np.random.default_rng(0).normal(size=(256, 16)).astype(np.float32)
session.train(session.dataset({"x": x}, x[:, :4].argmax(axis=1)), TrainConfig(batch_size=32))
print(peak_rss_mb())
"""


def test_the_profile_is_measured_and_the_estimate_covers_a_real_run(profiled):
    session = TrainingSession(profiled)
    profile = session.manifest.stats[PROFILE_KEY]
    assert len(profile["points"]) == 3 and all(40 < mb < 2000 for _, _, mb in profile["points"])
    run = subprocess.run([sys.executable, "-c", MEASURE, str(profiled)], capture_output=True, text=True, check=True)
    measured = float(run.stdout.strip().splitlines()[-1])
    estimate = estimate_peak_mb(session.manifest, 32, 1)
    assert 0.9 * measured <= estimate <= 2 * measured, (estimate, measured)


def test_fit_profile_is_a_line_through_the_points():
    profile = fit_profile([(1, 16, 103.2), (4, 64, 151.2), (8, 128, 304.8)])  # 100 MB + 0.2 MB a token
    assert profile["base_mb"] == pytest.approx(100, abs=1) and profile["per_token_mb"] == pytest.approx(0.2, abs=0.01)


def _with_profile(bundle, tmp_path, base_mb: float, per_token_mb: float):
    copy = shutil.copytree(bundle, tmp_path / "b")
    data = json.loads((copy / mf.MANIFEST_FILE).read_text())
    data["stats"][PROFILE_KEY] = {"base_mb": base_mb, "per_token_mb": per_token_mb}
    (copy / mf.MANIFEST_FILE).write_text(json.dumps(data))
    return copy


def test_a_batch_over_budget_is_refused_or_lowered(profiled, tmp_path):
    bundle = _with_profile(profiled, tmp_path, base_mb=100, per_token_mb=10)  # batch b needs 1.15 * (100 + 10 b)
    session = TrainingSession(bundle)
    data = _data(session)
    assert largest_batch_within(session.manifest, 200, 16, 1) == 7
    with pytest.raises(
        InputError,
        match=r"estimated peak memory 299 MB for batch 16 x 1 tokens exceeds the 200 MB budget \(batch 7 fits\)",
    ):
        session.train(data, TrainConfig(batch_size=16, memory_budget_mb=200))
    assert session.step == 0
    report = session.train(data, TrainConfig(batch_size=16, memory_budget_mb=200, lower_batch_to_fit=True))
    assert report.steps == 10  # 64 examples in batches of 7
    with pytest.raises(InputError, match="no batch size fits"):
        session.train(data, TrainConfig(batch_size=16, memory_budget_mb=50, lower_batch_to_fit=True))


def test_a_bundle_without_profile_says_so(tmp_path):
    model, example = tiny_models.mlp()
    export(model, tmp_path / "b", example_inputs=example, lora=LoraSpec(target_modules=("fc1",)))
    session = TrainingSession(tmp_path / "b")
    with pytest.raises(InputError, match="no memory profile"):
        session.train(_data(session), TrainConfig(memory_budget_mb=500))
