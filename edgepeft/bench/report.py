"""The harness's results: raw worker figures summarized with FLOPs and ratios, as JSON and a markdown table."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from edgepeft.bench.config import PYTORCH, QUANTIZATION, BenchConfig
from edgepeft.bench.flops import BertDims, StepFlops, train_step_flops
from edgepeft.bench.roofline import roofline_seconds

# Headline figures compared with PyTorch + PEFT as a ratio (system / PyTorch).
RATIO_KEYS = ("step_ms", "peak_rss_mb", "cold_start_train_s", "cold_start_predict_s", "latency_ms", "bundle_mb",
              "adapter_kb")  # fmt: skip


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def step_flops(raw: dict[str, Any], name: str, batch: int, seq: int) -> StepFlops:
    """The matmul FLOPs `name` executes in one step: an ORT bundle's last layer works on the first token only."""
    exported = QUANTIZATION[name] is not None  # compiled by edgepeft's exporter (`export/first_token.py`)
    targets = raw["lora"]["target_modules"]
    return train_step_flops(
        BertDims(**raw["model_dims"]), batch, seq, rank=raw["lora"]["r"], lora_per_layer=raw["lora"]["per_layer"],
        classes=len(raw["labels"]), first_token_last_layer=exported,
        lora_on_keys_values=sum(target in ("key", "value") for target in targets) if exported else 0,
    )  # fmt: skip


def _system_summary(config: BenchConfig, raw: dict[str, Any], name: str) -> dict[str, Any]:
    figures = raw["systems"][name]
    peaks = raw["peaks"]
    int8_frozen = QUANTIZATION[name] == "int8"  # the default bundle multiplies its frozen weights in int8
    speed = []
    for point in figures["speed"]:
        flops = step_flops(raw, name, point["batch"], point["seq"])
        seconds = point["median_ms"] / 1000
        roofline = roofline_seconds(flops, int8_frozen, peaks["fp32_flops_per_s"], peaks["int8_ops_per_s"])
        speed.append({**point, "gflop_per_step": flops.total / 1e9,
                      "int8_gflop_per_step": (flops.frozen if int8_frozen else 0.0) / 1e9,
                      "achieved_gflop_per_s": flops.total / seconds / 1e9, "roofline_ms": roofline * 1000,
                      "roofline_share": roofline / seconds})  # fmt: skip
    headline = next(p for p in speed if (p["batch"], p["seq"]) == config.headline)
    accuracy = figures["accuracy"]
    processes = [*figures["speed"], figures["cold_train"], figures["cold_predict"], figures["latency"],
                 *accuracy.values()]  # fmt: skip
    return {
        "speed": speed,
        "step_ms": headline["median_ms"],
        "step_p90_ms": headline["p90_ms"],
        "samples_per_s": headline["samples_per_s"],
        "tokens_per_s": headline["tokens_per_s"],
        "roofline_share": headline["roofline_share"],
        "peak_rss_mb": headline["peak_rss_mb"],
        "cold_start_train_s": figures["cold_train"]["seconds"],
        "cold_start_predict_s": figures["cold_predict"]["seconds"],
        "latency_ms": figures["latency"]["median_ms"],
        "latency_p90_ms": figures["latency"]["p90_ms"],
        "bundle_mb": raw["bundle_bytes"][name] / 1e6,
        "adapter_kb": _mean([run["adapter_bytes"] for run in accuracy.values()]) / 1e3,
        "accuracy_per_seed": {str(seed): run["accuracy"] for seed, run in accuracy.items()},
        "accuracy_mean": _mean([run["accuracy"] for run in accuracy.values()]),
        "accuracy_steps": _mean([run["steps"] for run in accuracy.values()]),
        "accuracy_train_seconds": _mean([run["train_seconds"] for run in accuracy.values()]),
        "accuracy_peak_rss_mb": max(run["peak_rss_mb"] for run in accuracy.values()),
        "torch_loaded": any(p["torch_loaded"] for p in processes),
    }


def summarize(
    config: BenchConfig, raw: dict[str, Any], machine: dict[str, Any], command: str, seconds: float,
    descriptions: dict[str, str],
) -> dict[str, Any]:  # fmt: skip
    """Per-system headline figures at `config.headline`, the grid with roofline shares, and ratios to PyTorch."""
    systems = {}
    for name in raw["systems"]:
        systems[name] = {"description": descriptions[name], **_system_summary(config, raw, name)}
    ratios: dict[str, dict[str, float]] = {}
    if PYTORCH in systems:
        reference = systems[PYTORCH]
        for name, s in systems.items():
            ratios[name] = {key: s[key] / reference[key] for key in RATIO_KEYS}
            ratios[name]["accuracy_points"] = 100 * (s["accuracy_mean"] - reference["accuracy_mean"])
            for point, ref in zip(s["speed"], reference["speed"]):
                point["x_pytorch"] = point["median_ms"] / ref["median_ms"]
    config_dict = dataclasses.asdict(config)
    return {
        "machine": {**machine, "peaks": raw["peaks"], "threads": config.threads},
        "command": command,
        "seconds": seconds,
        "config": config_dict,
        "headline": {"batch": config.headline[0], "seq": config.headline[1]},
        "workload": {
            "model": "all-MiniLM-L6-v2 (sentence-transformers), BertForSequenceClassification",
            "dims": raw["model_dims"],
            "lora": raw["lora"],
            "adamw": raw["adamw"],
            "labels": raw["labels"],
            "train_examples": raw["train_examples"],
            "test_examples": raw["test_examples"],
        },
        "systems": systems,
        "ratios_to": PYTORCH if ratios else None,
        "ratios": ratios,
    }


def write_json(results: dict[str, Any], path: Path) -> None:
    """results.json, with keys in a stable order."""
    path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def _x(ratios: dict[str, dict[str, float]], system: str, key: str) -> str:
    return f"{ratios[system][key]:.2f}" if system in ratios else "-"


def _rates(rates: dict[str, float]) -> str:
    return ", ".join(f"{name} {rate / 1e9:.0f}" for name, rate in rates.items())


def peak_lines(peaks: dict[str, Any]) -> list[str]:
    """The roofline's two peaks, what each was the best of, and the BLAS kernel numpy ran."""
    platform = ", ".join(f"{k}={v}" for k, v in peaks["unset_for_peaks"].items())
    blas = "; ".join(
        f"{b.get('internal_api')} {b.get('version')}, kernel {b.get('architecture', '?')}, {b.get('num_threads')} "
        f"threads ({b.get('threading_layer', '?')})"
        for b in peaks["blas"]
    )  # fmt: skip
    return [
        (
            f"- matmul peaks ({peaks['size']}x{peaks['size']}, best of 3 rounds, {peaks['threads']} threads, each "
            "library in its own process with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset"
            + (f"; the bench's environment had {platform}" if platform else "")
            + f"): fp32 {peaks['fp32_flops_per_s'] / 1e9:.0f} GFLOP/s (the best of {_rates(peaks['fp32'])}), "
            f"int8 {peaks['int8_ops_per_s'] / 1e9:.0f} GOP/s (ONNX Runtime: {_rates(peaks['int8'])})"
        ),
        f"- numpy's BLAS in the peak process (threadpoolctl): {blas or 'none found'}",
    ]


def markdown(results: dict[str, Any], chart: str | None = None) -> str:
    """The results as markdown: machine, headline table, grid table, accuracy per seed, how it was measured."""
    m, cfg, w = results["machine"], results["config"], results["workload"]
    systems, ratios = results["systems"], results["ratios"]
    batch, seq = results["headline"]["batch"], results["headline"]["seq"]
    code = m["code"]
    versions = ", ".join(f"{k} {v}" for k, v in m["versions"].items() if v)
    seeds = ", ".join(str(s) for s in cfg["seeds"])
    lines = [
        "# edgepeft benchmark",
        "",
        (
            f"- machine: {m['cpu']} ({', '.join(m['cpu_flags']) or 'none of the listed SIMD features'}), "
            f"{m['cores']} cores, {m['memory_gb']} GB, {m['os']}; {m['threads']} threads for ONNX Runtime and torch"
        ),
        f"- software: Python {m['python']}, {versions}",
        f"- date: {m['date']} (start); the whole run took {results['seconds'] / 60:.1f} min",
        f"- command: `{results['command']}`",
        f"- edgepeft code: commit {code['commit'] or 'unknown'}" + (" with local changes" if code["modified"] else ""),
        *peak_lines(m["peaks"]),
        (
            f"- model: {w['model']}, LoRA r={w['lora']['r']} alpha={w['lora']['alpha']:g} "
            f"dropout={w['lora']['dropout']:g} on {', '.join(w['lora']['target_modules'])} + the "
            f"{len(w['labels'])}-way head; AdamW {w['adamw']}"
        ),
        "",
        f"## Headline: batch {batch} x {seq} tokens"
        + (" (ratios: system / PyTorch + PEFT, this run)" if ratios else ""),
        "",
        (
            "| system | ms/step (median) | x PyTorch | p90 ms | samples/s | peak RSS (MB) | x PyTorch "
            "| cold start to 1st step (s) | cold start to 1st prediction (s) | 1-sample latency (ms) | x PyTorch "
            "| % of roofline |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        lines.append(
            f"| {name} | {s['step_ms']:.0f} | {_x(ratios, name, 'step_ms')} | {s['step_p90_ms']:.0f} "
            f"| {s['samples_per_s']:.1f} | {s['peak_rss_mb']:.0f} | {_x(ratios, name, 'peak_rss_mb')} "
            f"| {s['cold_start_train_s']:.2f} | {s['cold_start_predict_s']:.2f} | {s['latency_ms']:.1f} "
            f"| {_x(ratios, name, 'latency_ms')} | {100 * s['roofline_share']:.0f}% |"
        )
    lines += [
        "",
        (
            f"| system | bundle (MB) | adapter (KB) | accuracy, mean of seeds {seeds} | vs PyTorch (points) "
            "| training steps per run | peak RSS of a training run (MB) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for name, s in systems.items():
        points = f"{ratios[name]['accuracy_points']:+.1f}" if name in ratios else "-"
        lines.append(
            f"| {name} | {s['bundle_mb']:.1f} | {s['adapter_kb']:.0f} | {100 * s['accuracy_mean']:.1f}% | {points} "
            f"| {s['accuracy_steps']:.0f} | {s['accuracy_peak_rss_mb']:.0f} |"
        )
    lines += ["", *(f"- {name}: {s['description']}" for name, s in systems.items())]
    if chart:
        lines += ["", f"![ms per training step and peak RSS]({chart})"]
    lines += [
        "",
        "## Training step over the grid (fixed shapes, full attention masks)",
        "",
        (
            "| batch x seq | system | median ms | p90 ms | x PyTorch | samples/s | tokens/s | peak RSS (MB) "
            "| GFLOP/step (int8) | roofline ms | % of roofline |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for i, point in enumerate(next(iter(systems.values()))["speed"]):
        for name, s in systems.items():
            p = s["speed"][i]
            x = f"{p['x_pytorch']:.2f}" if "x_pytorch" in p else "-"
            lines.append(
                f"| {point['batch']} x {point['seq']} | {name} | {p['median_ms']:.1f} | {p['p90_ms']:.1f} | {x} "
                f"| {p['samples_per_s']:.1f} | {p['tokens_per_s']:.0f} | {p['peak_rss_mb']:.0f} "
                f"| {p['gflop_per_step']:.2f} ({p['int8_gflop_per_step']:.2f}) | {p['roofline_ms']:.1f} "
                f"| {100 * p['roofline_share']:.0f}% |"
            )
    lines += [
        "",
        f"## Accuracy on the Austen test split ({w['test_examples']} passages; {w['train_examples']} for training)",
        "",
        f"{cfg['epochs']} epoch(s), batch {cfg['batch_size']}, lr {cfg['learning_rate']:g} (constant), up to "
        f"{cfg['max_length']} tokens, dynamic padding per batch"
        + (f", at most {cfg['max_steps']} steps" if cfg["max_steps"] else "")
        + ".",
        "",
        "| system | " + " | ".join(f"seed {s}" for s in cfg["seeds"]) + " | mean |",
        "|---|" + "---|" * (len(cfg["seeds"]) + 1),
    ]
    for name, s in systems.items():
        cells = " | ".join(f"{100 * s['accuracy_per_seed'][str(seed)]:.1f}%" for seed in cfg["seeds"])
        lines.append(f"| {name} | {cells} | {100 * s['accuracy_mean']:.1f}% |")
    lines += ["", METHOD]
    return "\n".join(lines) + "\n"


METHOD = """## How it is measured

- Every figure comes from its own fresh process (`python -m edgepeft.bench.worker`): one per system,
  grid point and round for speed (the rounds rotate which system goes first; a point's median and p90
  pool the timed steps of all its rounds, and its peak RSS is the largest of them), one each for cold
  start to the first step, cold start to the first prediction, one-sample latency, and one per seed for
  accuracy. The ONNX Runtime processes block torch; PyTorch runs with its own default settings.
- Speed: one fixed batch of random token ids in [1000, 20000) with a full attention mask (seeded, the same
  for every system), so no system can trim padding; warm-up steps are discarded. edgepeft's step is one
  `TrainingSession.train` call on a one-batch dataset; PyTorch's is forward, backward, `AdamW.step`,
  `zero_grad`, with the model in eval() mode (dropout off, as in the exported bundle).
- Peak RSS is the speed process's own VmHWM at the headline point; "peak RSS of a training run" is the
  largest over the accuracy processes (tokenizing, training and evaluating the Austen split).
- Cold starts run from just before the parent spawns the process to the first step (headline shape) or the
  first one-sample prediction (headline sequence length) done: interpreter start, imports, opening the model.
- Bundle: the bundle directory on disk; for PyTorch, the fp32 base model's weight file. Adapter: the
  directory `TrainingSession.save_adapter` or PEFT's `save_pretrained` writes.
- Accuracy: both systems start from the same initial head and LoRA matrices (torch seeded with the
  exporter's seed), see the same batches in the same order (the runtime's seeded shuffle, replayed for
  PyTorch), and use the same tokenizer, hyperparameters and AdamW settings (read from the bundle's
  optimizer model); the seed changes the batch order.
- FLOPs count the matrix multiplies each system executes: the forward (projections, FFN, attention, LoRA,
  pooler, head) plus the backward a LoRA step needs (input gradients at and above the lowest trainable
  layer, LoRA and head weight gradients); the ONNX Runtime bundles compute their last layer for the first
  token only, so they execute ~14% fewer than PyTorch; see `edgepeft/bench/flops.py`. "(int8)" is the part
  the int8 bundle runs in int8: its frozen weights' matmuls, forward and input gradients.
- The roofline: the fp32 peak is the fastest of numpy's, torch's and ONNX Runtime's float32 matmul, the
  int8 peak the fastest of ONNX Runtime's int8 kernels (`MatMulInteger` u8 x s8, `DynamicQuantizeMatMul`),
  each measured on 2048x2048 matrices with the bench's threads, in its own process without
  OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (which pin numpy's OpenBLAS to an older kernel). A step's
  roofline time is its int8 FLOPs at the int8 peak plus its other FLOPs at the fp32 peak (all of them,
  for ort-fp32 and PyTorch); "% of roofline" is that time over the measured median step. It cannot pass
  100% unless a kernel beats the peak of its precision: each peak is the best any of the libraries does.
"""


def write_markdown(results: dict[str, Any], path: Path, chart: str | None = None) -> None:
    """results.md: the markdown tables, linking `chart` if given."""
    path.write_text(markdown(results, chart), encoding="utf-8")
