"""Causal LM training on the device against PyTorch eager + PEFT: peak memory and tokens/s, side by side.

    python benchmarks/lm_train_memory.py --bundle DIR --model DIR [--text emma.txt]
        [--steps 8] [--rounds 1] [--export]

Each side runs in its own fresh process, alternating (device, torch, device, torch, ...), on the same blocks
of `--text` (tokenized by the bundle's tokenizer, batch 1 x the bundle's max_length), the same LoRA spec (the
bundle's adapter_config.json), AdamW at the same learning rate. The device process has torch blocked
(`sys.modules["torch"] = None`) and trains through `TrainingSession.train`, as an app would. Peak memory is the
process's own VmHWM (Linux), read after the last step; "load" is VmRSS once the model is ready to train.
tokens/s is block length / median step time, the first step left out. `--export` first writes the bundle from
`--model` (SmolLM2: LoRA r=8 on all seven projections, max_length 256). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def _status(key: str) -> float:
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))


def _blocks(bundle: str, text: str, steps: int) -> tuple[list[list[int]], int]:
    """The first `steps` full blocks of `text`, as the device cuts them (torch-free code)."""
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.tasks.causal_lm import CausalLMData

    data = CausalLMData(open_bundle(bundle))
    length = data.task.max_length
    ids = data.encode_text(Path(text).read_text(encoding="utf-8")[: 8 * length * (steps + 2)])
    blocks = [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:steps]
    if len(blocks) < steps:
        raise SystemExit(f"{text} holds only {len(blocks)} blocks of {length} tokens")
    return blocks, length


def run_device(bundle: str, text: str, steps: int, lr: float) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # a device has no torch
    import numpy as np

    from edgepeft.runtime import TrainConfig, TrainingSession

    blocks, length = _blocks(bundle, text, steps)
    session = TrainingSession(bundle)
    loaded = _status("VmRSS")
    ids = np.array(blocks, dtype=np.int64)
    data = session.dataset({"input_ids": ids, "attention_mask": np.ones_like(ids),
                            "position_ids": np.tile(np.arange(length, dtype=np.int64), (len(ids), 1))},
                           ids)  # fmt: skip
    report = session.train(data, TrainConfig(batch_size=1, learning_rate=lr, shuffle=False, max_steps=steps))
    return _result("edgepeft device", loaded, report.step_ms, length, report.epoch_losses)


def run_torch(bundle: str, model_dir: str, text: str, steps: int, lr: float) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    config = json.loads((Path(bundle) / "adapter_config.json").read_text(encoding="utf-8"))
    blocks, length = _blocks(bundle, text, steps)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    spec = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                           target_modules=config["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, spec)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.01)
    loaded = _status("VmRSS")
    step_ms, losses = [], []
    for block in blocks:
        t0 = time.perf_counter()
        ids = torch.tensor([block])
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step_ms.append((time.perf_counter() - t0) * 1000)
        losses.append(float(loss))
    return _result("pytorch eager + peft", loaded, step_ms, length, [statistics.mean(losses)])


def _result(system: str, loaded: float, step_ms: list[float], length: int, losses: list[float]) -> dict:
    median = statistics.median(step_ms[1:] if len(step_ms) > 1 else step_ms)
    return {
        "system": system,
        "load_rss_mb": round(loaded, 1),
        "peak_rss_mb": round(_status("VmHWM"), 1),
        "median_step_ms": round(median, 1),
        "tokens_per_s": round(length / median * 1000, 1),
        "mean_loss": round(losses[-1], 4) if losses else None,
    }


def _child(args: argparse.Namespace, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--bundle", args.bundle, "--model", args.model,
               "--text", args.text, "--steps", str(args.steps), "--lr", str(args.lr)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{side} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def export_bundle(model_dir: str, bundle: str) -> None:
    from edgepeft.export import ExportOptions, LoraSpec, export

    export(model_dir, bundle, lora=LoraSpec(r=8, alpha=16, target_modules=TARGETS),
           options=ExportOptions(loss="next_token", max_length=256), overwrite=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--model", required=True,  # `edgepeft demo lm` unpacks one: OUT/smollm2-135m-instruct
                        help="SmolLM2 as a transformers directory")
    parser.add_argument("--text", default=str(ROOT.parent / "shared/data/austen-novels/emma.txt"))
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--export", action="store_true")
    parser.add_argument("--side", choices=("device", "torch"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side == "device":
        print(json.dumps(run_device(args.bundle, args.text, args.steps, args.lr)))
        return
    if args.side == "torch":
        print(json.dumps(run_torch(args.bundle, args.model, args.text, args.steps, args.lr)))
        return
    if args.export:
        export_bundle(args.model, args.bundle)
    runs: dict[str, list[dict]] = {"device": [], "torch": []}
    for _ in range(args.rounds):
        for side in ("device", "torch"):
            runs[side].append(_child(args, side))
    device = min(runs["device"], key=lambda r: r["median_step_ms"])
    torch_ = min(runs["torch"], key=lambda r: r["median_step_ms"])
    print(json.dumps({
        "runs": runs,
        "tokens_per_s_ratio": round(device["tokens_per_s"] / torch_["tokens_per_s"], 3),
        "peak_rss_ratio": round(device["peak_rss_mb"] / torch_["peak_rss_mb"], 3),
        "device_peak_below_540_mb": device["peak_rss_mb"] < 540,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
