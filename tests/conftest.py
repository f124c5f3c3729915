"""Shared fixtures: bundles exported once per test session, into pytest's temporary directory."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

AUSTEN_LABELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def export_tiny(name: str, out: Path, quantization: str = "int8", **spec):
    """Export one of tests/tiny_models.py with LoRA on its layers and a trained head."""
    import tiny_models

    from edgepeft.export import ExportOptions, LoraSpec, export

    targets = {"mlp": ("fc1", "fc2"), "convnet": ("conv1", "conv2"), "textnet": ("proj", "embed")}[name]
    model, example = getattr(tiny_models, name)()
    lora = LoraSpec(target_modules=spec.pop("target_modules", targets), modules_to_save=("head",), **spec)
    manifest = export(model, out, example_inputs=example, lora=lora, options=ExportOptions(quantization=quantization))
    return manifest


@pytest.fixture(scope="session")
def mlp_bundle(tmp_path_factory) -> Path:
    """The tiny MLP with LoRA on fc1/fc2, a trained head and an int8 backbone. Tests copy it to change it."""
    out = tmp_path_factory.mktemp("mlp") / "bundle"
    export_tiny("mlp", out)
    return out


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    from edgepeft.demo import minilm_path

    return minilm_path()


@pytest.fixture(scope="session")
def minilm_int8(tmp_path_factory, minilm_dir) -> Path:
    from edgepeft.export import ExportOptions, LoraSpec, export

    out = tmp_path_factory.mktemp("minilm") / "int8"
    export(minilm_dir, out, lora=LoraSpec(), options=ExportOptions(labels=AUSTEN_LABELS))
    return out


@pytest.fixture(scope="session")
def minilm_fp32(tmp_path_factory, minilm_dir) -> Path:
    from edgepeft.export import ExportOptions, LoraSpec, export

    out = tmp_path_factory.mktemp("minilm") / "fp32"
    export(minilm_dir, out, lora=LoraSpec(), options=ExportOptions(labels=AUSTEN_LABELS, quantization="fp32"))
    return out


@pytest.fixture(scope="session")
def austen_split(tmp_path_factory) -> tuple[Path, Path]:
    from edgepeft.demo import split_austen

    train, test, _ = split_austen(tmp_path_factory.mktemp("austen"), seed=0)
    return train, test
