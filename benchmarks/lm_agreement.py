"""A causal LM trained on the device: held-out perplexity against PyTorch + PEFT, and host/device agreement.

    python benchmarks/lm_agreement.py --bundle DIR --model DIR [--text emma.txt] [--steps 30]

Three fresh processes on the same blocks (the bundle's tokenizer, batch 1 x the bundle's max_length):
1. the device (torch blocked) measures held-out perplexity, trains `--steps` steps (AdamW, lr 1e-3), measures
   it again and saves the adapter;
2. the host loads that adapter into the fp32 base with `peft.PeftModel.from_pretrained` and measures perplexity
   on the same held-out blocks (acceptance: within 2% of the device's);
3. PyTorch eager + PEFT trains the same steps on the same blocks from the same LoRA spec (its own init) and
   measures held-out perplexity (the quality bar: the device's should be close).
Training blocks are the text's first `--steps` blocks; held-out blocks are `--held-out` blocks from its last
tenth. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _blocks(bundle: str, text: str, steps: int, held_out: int) -> tuple[list[list[int]], list[list[int]]]:
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.tasks.causal_lm import CausalLMData

    data = CausalLMData(open_bundle(bundle))
    length = data.task.max_length
    body = Path(text).read_text(encoding="utf-8")
    chars = 8 * length * (max(steps, held_out) + 2)

    def cut(part: str, count: int) -> list[list[int]]:
        ids = data.encode_text(part)
        return [ids[i : i + length] for i in range(0, len(ids) - length + 1, length)][:count]

    return cut(body[:chars], steps), cut(body[len(body) * 9 // 10 :][:chars], held_out)


def _features(blocks: list[list[int]]):
    import numpy as np

    ids = np.array(blocks, dtype=np.int64)
    positions = np.tile(np.arange(ids.shape[1], dtype=np.int64), (len(ids), 1))
    return {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": positions}, ids


def run_device(args: argparse.Namespace) -> dict:
    sys.modules["torch"] = None  # type: ignore[assignment]  # a device has no torch
    from edgepeft.runtime import TrainConfig, TrainingSession

    train, held = _blocks(args.bundle, args.text, args.steps, args.held_out)
    session = TrainingSession(args.bundle)
    held_data = session.dataset(*_features(held))
    before = session.evaluate(held_data, batch_size=1).perplexity
    config = TrainConfig(batch_size=1, learning_rate=args.lr, shuffle=False, max_steps=args.steps)
    report = session.train(session.dataset(*_features(train)), config)
    after = session.evaluate(held_data, batch_size=1).perplexity
    session.save_adapter(args.adapter)
    return {"device_perplexity_before": before, "device_perplexity_after": after, "steps": report.steps}


def _host_perplexity(model, held: list[list[int]]) -> float:
    import torch

    total, tokens = 0.0, 0
    with torch.no_grad():
        for block in held:
            ids = torch.tensor([block])
            loss = float(model(input_ids=ids, labels=ids).loss)
            total, tokens = total + loss * (len(block) - 1), tokens + len(block) - 1
    return math.exp(total / tokens)


def run_host(args: argparse.Namespace) -> dict:
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    train, held = _blocks(args.bundle, args.text, args.steps, args.held_out)
    base = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    host = _host_perplexity(peft.PeftModel.from_pretrained(base, args.adapter).eval(), held)
    config = json.loads((Path(args.bundle) / "adapter_config.json").read_text(encoding="utf-8"))
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    torch.manual_seed(0)
    spec = peft.LoraConfig(r=config["r"], lora_alpha=config["lora_alpha"], lora_dropout=0.0,
                           target_modules=config["target_modules"], task_type="CAUSAL_LM")  # fmt: skip
    model = peft.get_peft_model(model, spec)
    before = _host_perplexity(model.eval(), held)
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.01)
    for block in train:
        ids = torch.tensor([block])
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return {"host_perplexity_of_device_adapter": host, "torch_perplexity_before": before,
            "torch_perplexity_after": _host_perplexity(model.eval(), held)}  # fmt: skip


def _child(args: argparse.Namespace, side: str) -> dict:
    command = [sys.executable, __file__, "--side", side, "--adapter", args.adapter, "--bundle", args.bundle,
               "--model", args.model, "--text", args.text, "--steps", str(args.steps),
               "--held-out", str(args.held_out), "--lr", str(args.lr)]  # fmt: skip
    run = subprocess.run(command, capture_output=True, text=True, check=False, cwd=ROOT)
    if run.returncode != 0:
        raise SystemExit(f"{side} failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", required=True)
    parser.add_argument("--model", required=True,  # `edgepeft demo lm` unpacks one: OUT/smollm2-135m-instruct
                        help="SmolLM2 as a transformers directory")
    parser.add_argument("--text", default=str(ROOT.parent / "shared/data/austen-novels/emma.txt"))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--held-out", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--side", choices=("device", "host"), help=argparse.SUPPRESS)
    parser.add_argument("--adapter", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.side:
        print(json.dumps(run_device(args) if args.side == "device" else run_host(args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        args.adapter = str(Path(tmp) / "adapter")
        result = {**_child(args, "device"), **_child(args, "host")}
    result["host_device_relative_difference"] = round(
        abs(result["host_perplexity_of_device_adapter"] / result["device_perplexity_after"] - 1), 4)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
