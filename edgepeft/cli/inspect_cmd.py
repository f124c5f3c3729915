"""`edgepeft inspect`: what a bundle or an adapter directory holds, and which of its files are damaged."""

from __future__ import annotations

import math
from pathlib import Path

import click

from edgepeft.cli.app import Command
from edgepeft.cli.common import human_size
from edgepeft.errors import EdgePeftError


@click.command(cls=Command)
@click.argument("path", type=click.Path(exists=True, file_okay=False))
def inspect(path: str) -> None:
    """Show what a bundle or an adapter directory holds; a damaged file is named, not a reason to refuse."""
    from edgepeft.manifest import MANIFEST_FILE

    if (Path(path) / MANIFEST_FILE).exists():
        _inspect_bundle(Path(path))
    else:
        _inspect_adapter(Path(path))


def _inspect_bundle(path: Path) -> None:
    from edgepeft.manifest import Manifest
    from edgepeft.runtime.bundle import CORRUPTED, MISSING, OUTSIDE, file_problem

    m = Manifest.load(path)
    click.echo(f"bundle {path}")
    click.echo(f"  inputs:     {', '.join(f'{s.name} {s.dtype}{list(s.shape)}' for s in m.inputs)}")
    click.echo(f"  outputs:    {', '.join(f'{s.name} {s.dtype}{list(s.shape)}' for s in m.outputs)}")
    click.echo(f"  labels:     {', '.join(m.labels) or '-'}")
    task = m.task
    if task is not None:  # a causal language model
        context = f"{task.max_positions} positions" if task.max_positions else "not recorded"
        click.echo(f"  task:       {task.kind}: blocks of {task.max_length} tokens, context {context}, "
                   f"chat template: {'yes' if task.chat_template else 'no'}")  # fmt: skip
    click.echo(f"  loss:       {m.loss}   optimizer: {m.optimizer}   backbone: {m.quantization}")
    click.echo(f"  trainable:  {len(m.trainable)} tensors, {m.stats.get('trainable_parameters', 0):,} parameters")
    click.echo(f"  base:       sha256 {m.base_fingerprint[:16]}...")
    damaged = []
    shown = {MISSING: "MISSING", OUTSIDE: "LINKS OUTSIDE THE BUNDLE",
             CORRUPTED: "CORRUPTED: its sha256 differs from the manifest"}  # fmt: skip
    for name, digest in sorted(m.files.items()):
        problem = file_problem(path, name, digest)
        if problem:
            damaged.append(name)
        file = path / name
        size = human_size(file.stat().st_size) if file.is_file() else "-"
        click.echo(f"  file:       {name} ({size}{', ' + shown[problem] if problem else ''})")
    if damaged:
        raise EdgePeftError(f"bundle {path} is damaged: {', '.join(damaged)} (export it again)")


def _inspect_adapter(path: Path) -> None:
    from safetensors import safe_open

    from edgepeft.errors import AdapterError
    from edgepeft.fileio import read_json_object
    from edgepeft.manifest import MANIFEST_FILE
    from edgepeft.runtime.adapter import FINGERPRINT_KEY, WEIGHTS

    weights = path / WEIGHTS
    if not weights.is_file():
        raise EdgePeftError(f"{path} is neither a bundle ({MANIFEST_FILE}) nor an adapter ({WEIGHTS})")
    config = read_json_object(path / "adapter_config.json", AdapterError, "adapter config")
    try:
        with safe_open(str(weights), framework="numpy") as f:
            meta = f.metadata() or {}
            shapes = {k: f.get_slice(k).get_shape() for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise AdapterError(f"adapter weights {weights} are unreadable: {e}") from None
    click.echo(f"adapter {path}: {config.get('peft_type')} r={config.get('r')} targets={config.get('target_modules')}")
    click.echo(f"  base:    sha256 {meta.get(FINGERPRINT_KEY, 'not recorded')[:16]}")
    click.echo(f"  tensors: {len(shapes)}, {sum(math.prod(s) for s in shapes.values()):,} values")
