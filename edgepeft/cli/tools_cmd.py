"""`edgepeft demo` and `edgepeft bench`: the embedded demo, and the benchmark against PyTorch + PEFT."""

from __future__ import annotations

import dataclasses
import json
import shlex
import sys
from pathlib import Path

import click

from edgepeft.cli.app import Command
from edgepeft.cli.common import check_report, comma_ints, comma_list, write_report


DEMO_DEFAULTS = {"classify": ("edgepeft-demo", 2, 2e-3), "lm": ("edgepeft-demo-lm", 1, 1e-3)}


@click.command(cls=Command)
@click.argument("task", type=click.Choice(sorted(DEMO_DEFAULTS)), default="classify")
@click.option("--out", type=click.Path(file_okay=False),
              help="Working directory for the bundle, data and adapter [default: edgepeft-demo, edgepeft-demo-lm].")
@click.option("--epochs", type=click.IntRange(min=1), help="Training epochs [default: 2; lm: 1].")
@click.option("--lr", "learning_rate", type=click.FloatRange(min=0, min_open=True),
              help="Learning rate [default: 2e-3; lm: 1e-3].")
@click.option("--max-steps", type=click.IntRange(min=1), help="Stop training after this many steps (lm).")
@click.option("--seed", default=0, show_default=True)
@click.option("--report", type=click.Path(), help="Write the figures as JSON here.")
def demo(task: str, out: str | None, epochs: int | None, learning_rate: float | None, max_steps: int | None,
         seed: int, report: str | None) -> None:  # fmt: skip
    """Fine-tune on Jane Austen on this device and print the figures.

    TASK `classify` (the default): all-MiniLM-L6-v2 learns which novel a passage is from. TASK `lm`:
    SmolLM2-135M-Instruct learns the style of Emma; perplexity on the six novels and continuations before/after.
    """
    default_out, default_epochs, default_lr = DEMO_DEFAULTS[task]
    out_dir, epochs, learning_rate = Path(out or default_out), epochs or default_epochs, learning_rate or default_lr
    check_report(report)
    if task == "lm":
        from edgepeft.demo_lm import run_lm_demo

        figures = run_lm_demo(out_dir, epochs=epochs, learning_rate=learning_rate, seed=seed, max_steps=max_steps)
    else:
        from edgepeft.demo import run_demo

        if max_steps is not None:
            raise click.UsageError("--max-steps applies to the lm demo")
        figures = run_demo(out_dir, epochs=epochs, learning_rate=learning_rate, seed=seed)
    write_report(report, figures)
    click.echo(json.dumps(figures, indent=2, sort_keys=True))


def _command_line() -> str:
    program = sys.argv[0]
    head = ["python", program] if program.endswith(".py") else [Path(program).name]
    return shlex.join([*head, *sys.argv[1:]])


@click.command(cls=Command)
@click.argument("workload", type=click.Choice(["classify", "lm"]), default="classify")
@click.option("--out", type=click.Path(file_okay=False),
              help="Directory for results.json, results.md (and chart.png) [default: edgepeft-bench, edgepeft-bench-lm].")
@click.option("--systems", help="Comma-separated, from edgepeft, ort-fp32, pytorch-peft [default: all three].")
@click.option("--batches", help="Batch sizes of the speed grid, comma-separated [default: 1,8,16].")
@click.option("--seqs", help="Sequence lengths of the speed grid, comma-separated [default: 64,128].")
@click.option("--steps", type=int, help="Timed training steps per grid point and round [default: 20; lm: 8].")
@click.option("--rounds", type=int, help="Rounds of the speed grid, in a rotated system order [default: 3; lm: 2].")
@click.option("--seeds", help="Seeds of the accuracy runs, comma-separated [default: 0,1,2].")
@click.option("--epochs", type=int, help="Epochs of each accuracy run [default: 2, as the demo].")
@click.option("--threads", type=int, help="Threads for ONNX Runtime and torch [default: all cores].")
@click.option("--smoke", is_flag=True,
              help="A tiny run for CI (batch 2 x 16, 2 rounds of 3 steps, 1 seed, a small subset).")  # fmt: skip
def bench(
    workload: str,
    out: str | None,
    systems: str | None,
    batches: str | None,
    seqs: str | None,
    steps: int | None,
    rounds: int | None,
    seeds: str | None,
    epochs: int | None,
    threads: int | None,
    smoke: bool,
) -> None:
    """Benchmark edgepeft against ORT with an fp32 backbone and PyTorch + PEFT, each measurement in its own process.

    WORKLOAD `classify` (the default, MiniLM): ms per training step over a grid of batch sizes and sequence
    lengths, peak RSS, cold starts, one-sample latency, bundle and adapter sizes, accuracy on the Austen task
    over seeds, and each step's share of this machine's matmul FLOP/s. WORKLOAD `lm` (SmolLM2-135M, takes
    --steps, --rounds, --threads, --smoke): training tokens/s and peak RSS at 1 x 256 against PyTorch + PEFT
    (each system in its own process, their steps interleaved one by one, in --rounds sets of processes),
    generation tokens/s against transformers' generate with the PEFT model, greedy agreement, host and device
    perplexity of one adapter, bundle sizes. Ratios are taken within the run.
    """
    if workload == "lm":
        given = [flag for flag, value in (("--systems", systems), ("--batches", batches), ("--seqs", seqs),
                                          ("--seeds", seeds), ("--epochs", epochs)) if value is not None]  # fmt: skip
        if given:
            raise click.UsageError(f"{given[0]} applies to the classify workload, not lm")
        from edgepeft.bench.lm import LMBenchConfig, run_lm_bench

        base = LMBenchConfig.smoke() if smoke else LMBenchConfig()
        fields = {k: v for k, v in (("steps", steps), ("rounds", rounds), ("threads", threads)) if v is not None}
        config = dataclasses.replace(base, **fields)
        out = out or "edgepeft-bench-lm"
        run_lm_bench(config, out, command=_command_line(), progress=lambda line: click.echo(line, err=True))
        click.echo((Path(out) / "results.md").read_text(encoding="utf-8"))
        return
    out = out or "edgepeft-bench"
    from edgepeft.bench.config import BenchConfig
    from edgepeft.bench.run import run_bench

    config = (BenchConfig.smoke() if smoke else BenchConfig()).with_overrides(
        systems=comma_list(systems) or None, batches=comma_ints("--batches", batches), seqs=comma_ints("--seqs", seqs),
        steps=steps, rounds=rounds, seeds=comma_ints("--seeds", seeds), epochs=epochs, threads=threads,
    )  # fmt: skip
    run_bench(config, out, command=_command_line(), progress=lambda line: click.echo(line, err=True))
    click.echo((Path(out) / "results.md").read_text(encoding="utf-8"))
