"""Greedy generation with a LoRA adapter: edgepeft's device generator against transformers' `generate` + PEFT.

    python benchmarks/lm_generate.py --model DIR [--bundle DIR] [--prompts 4] [--new-tokens 64] [--rounds 2]

`--model` is a transformers causal LM directory (SmolLM2-135M-Instruct saved as fp32); without `--bundle` the host
exports one first. One adapter (seeded random LoRA A and B, large enough to change the greedy tokens) is saved
in PEFT format and used by every system. Each system runs in its own resident process; the two timed ones take
the prompts in turn (device, peft; then peft, device; ...), so load from elsewhere slows both alike:

- `device`: `edgepeft.runtime.generation.Generator` with torch blocked (frozen weights dequantized once at load);
- `device_int8_resident`: the same with `dequantize_once=False` (int8 weights resident, dequantized per run),
  timed over one pass of the prompts after the others;
- `peft`: `PeftModel.from_pretrained(AutoModelForCausalLM)` fp32, `generate(do_sample=False, use_cache=True)`;
- `peft_int8_weights`: the same with each frozen weight replaced by its int8-dequantized value, the bundle's
  exact frozen weights: greedy agreement with the device against it is the int8-free comparison.

Tokens/s counts new tokens over the whole `generate` call (prompt included); peak RSS is each process's VmHWM
(its load included).
No stop id ends a generation (every system makes `--new-tokens` tokens). Prints one JSON object.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
AGREE = 20  # greedy agreement is counted over the first AGREE new tokens

# Each system is a resident worker: it loads once, then answers one request a line on stdin (a prompt index,
# a token count, whether to drop the adapter) with one JSON line; "quit" answers with its peak RSS. The parent
# alternates the timed systems prompt by prompt, so a noisy neighbour slows both alike.
COMMON = r"""
import json, sys, time
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
args = json.loads(sys.argv[1])
prompts = args["prompts"]
def serve(load, generate):
    print(json.dumps({"load_seconds": load}), flush=True)
    for line in sys.stdin:
        if line.strip() == "quit":
            break
        request = json.loads(line)
        started = time.perf_counter()
        tokens, decode = generate(prompts[request["prompt"]], request["count"], request.get("no_adapter", False))
        print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - started, "decode_seconds": decode}),
              flush=True)
    print(json.dumps({"peak_rss_mb": peak_mb()}), flush=True)
"""

DEVICE = COMMON + r"""
sys.modules["torch"] = None  # a device has no torch
from edgepeft.runtime.adapter import load_adapter
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.generation import Generator
from edgepeft.runtime.tasks import task_data

bundle = open_bundle(args["bundle"])
values = load_adapter(bundle.manifest, args["adapter"])
zero = {k: v * 0 for k, v in values.items()}
started = time.perf_counter()
generator = Generator(bundle, task_data(bundle), threads=args["threads"], dequantize_once=args["dequantize_once"])
load = time.perf_counter() - started
def generate(prompt, count, no_adapter):
    out = generator.generate(prompt, zero if no_adapter else values, count, stop_ids=())
    return out.token_ids, out.decode_seconds
generate(prompts[0], 4, False)  # warm-up
serve(load, generate)
"""

HOST = COMMON + r"""
import torch
from transformers import AutoModelForCausalLM
import peft
from edgepeft.export.quantize import quantize_per_channel

if args["threads"]:
    torch.set_num_threads(args["threads"])
started = time.perf_counter()
model = AutoModelForCausalLM.from_pretrained(args["model"], dtype=torch.float32)
if args["int8_weights"]:  # the bundle's frozen weights: each Linear/Embedding weight int8 per output channel
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
                q, scale = quantize_per_channel(module.weight.numpy())
                module.weight.copy_(torch.from_numpy(q.astype("float32") * scale[:, None]))
model = peft.PeftModel.from_pretrained(model, args["adapter"]).eval()
load = time.perf_counter() - started
def generate(prompt, count, no_adapter):
    ids = torch.tensor([args["ids"][prompt]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=count,
                             min_new_tokens=count, do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist(), None
generate(prompts[0], 4, False)  # warm-up
serve(load, generate)
"""

ADAPTER = r"""
import json, sys
sys.modules["torch"] = None
import numpy as np
from edgepeft.runtime.adapter import save_adapter
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.tasks import task_data

bundle_dir, out, scale, prompts = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
bundle = open_bundle(bundle_dir)
rng = np.random.default_rng(0)
values = {spec.name: (rng.standard_normal(spec.shape) * scale / np.sqrt(spec.shape[-1])).astype(np.float32)
          for spec in bundle.manifest.trainable}
save_adapter(bundle.manifest, values, out)
tokenizer = task_data(bundle).tokenizer  # the device's prompt ids, so every system starts from the same ids
print(json.dumps({p: tokenizer.encode(p).ids for p in prompts}))
"""


class _Worker:
    """One system's resident process."""

    def __init__(self, script: str, args: dict):
        command = [sys.executable, "-c", script, json.dumps(args)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=_env())
        self.load_seconds = self._answer()["load_seconds"]

    def ask(self, prompt: int, count: int, no_adapter: bool = False) -> dict:
        self.process.stdin.write(json.dumps({"prompt": prompt, "count": count, "no_adapter": no_adapter}) + "\n")
        self.process.stdin.flush()
        return self._answer()

    def close(self) -> float:
        """Stop the worker; returns its peak RSS (MB)."""
        self.process.stdin.write("quit\n")
        self.process.stdin.flush()
        peak = self._answer()["peak_rss_mb"]
        self.process.wait(timeout=60)
        return peak

    def _answer(self) -> dict:
        line = self.process.stdout.readline()
        if not line:
            self.process.wait(timeout=60)
            raise SystemExit(f"a benchmark worker failed (exit {self.process.returncode}); its stderr is above")
        return json.loads(line)


def _env() -> dict:
    """This checkout first on the path, offline."""
    path = [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"}


def _prompts(count: int, words: int) -> list[str]:
    """The openings (`words` words) of the first `count` passages of the shipped Austen data."""
    with open(ROOT / "edgepeft" / "data" / "austen.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return [" ".join(rows[i * 97 % len(rows)]["text"].split()[:words]) for i in range(count)]


def _agreement(ours: list[list[int]], theirs: list[list[int]], first: int) -> dict:
    """Per prompt, how many leading greedy tokens agree (of the first `first`)."""
    prefix = []
    for a, b in zip(ours, theirs):
        n = 0
        while n < min(first, len(a), len(b)) and a[n] == b[n]:
            n += 1
        prefix.append(n)
    return {"agreeing_prefix": prefix, f"prompts_with_first_{first}_equal": sum(p == first for p in prefix)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="transformers causal LM directory (fp32 safetensors)")
    parser.add_argument("--bundle", help="an edgepeft bundle of --model (default: export one)")
    parser.add_argument("--prompts", type=int, default=4)
    parser.add_argument("--prompt-words", type=int, default=80)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--adapter-scale", type=float, default=0.5, help="LoRA A and B ~ N(0, scale^2 / fan_in)")
    parser.add_argument("--threads", type=int, default=0, help="intra-op threads of both (0: each one's default)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        bundle = args.bundle
        if bundle is None:
            bundle = str(Path(tmp) / "bundle")
            code = ("import sys; from edgepeft.export import export, ExportOptions; "
                    "export(sys.argv[1], sys.argv[2], options=ExportOptions(max_length=512))")  # fmt: skip
            subprocess.run([sys.executable, "-c", code, args.model, bundle], check=True, env=_env())
        prompts = _prompts(args.prompts, args.prompt_words)
        adapter = str(Path(tmp) / "adapter")
        command = [sys.executable, "-c", ADAPTER, bundle, adapter, str(args.adapter_scale), json.dumps(prompts)]
        made = subprocess.run(command, capture_output=True, text=True, check=True, env=_env())
        ids = json.loads(made.stdout.strip().splitlines()[-1])
        shared = {"prompts": prompts, "new_tokens": args.new_tokens, "adapter": adapter, "ids": ids,
                  "threads": args.threads, "agree": AGREE}
        systems = {
            "device": (DEVICE, {"bundle": bundle, "dequantize_once": True}),
            "peft": (HOST, {"model": args.model, "int8_weights": False}),
            "device_int8_resident": (DEVICE, {"bundle": bundle, "dequantize_once": False}),
            # the reference tokens: the first AGREE are compared
            "peft_int8_weights": (HOST, {"model": args.model, "int8_weights": True,
                                         "count": min(AGREE, args.new_tokens)}),
        }
        workers = {name: _Worker(script, {**shared, **extra}) for name, (script, extra) in systems.items()}
        try:
            timed: dict[str, list[dict]] = {"device": [], "peft": []}
            for round_ in range(args.rounds):
                for i in range(len(prompts)):
                    order = ("device", "peft") if (round_ + i) % 2 == 0 else ("peft", "device")
                    for name in order:
                        timed[name].append(workers[name].ask(i, args.new_tokens))
                print(f"round {round_ + 1}: device {sum(r['seconds'] for r in timed['device']):.1f} s, "
                      f"peft {sum(r['seconds'] for r in timed['peft']):.1f} s so far", file=sys.stderr)
            resident = [workers["device_int8_resident"].ask(i, args.new_tokens) for i in range(len(prompts))]
            reference = [workers["peft_int8_weights"].ask(i, min(AGREE, args.new_tokens))["tokens"]
                         for i in range(len(prompts))]  # fmt: skip
            plain = [workers["device"].ask(i, AGREE, no_adapter=True)["tokens"] for i in range(len(prompts))]
        finally:
            peaks = {}
            for name, worker in workers.items():
                try:
                    peaks[name] = worker.close()
                except Exception:  # a failed worker: stop it
                    worker.process.kill()
    made = len(prompts) * args.new_tokens * args.rounds
    report = {"threads": args.threads or "default", "prompts": args.prompts, "rounds": args.rounds,
              "prompt_tokens": [len(ids[p]) for p in prompts], "new_tokens": args.new_tokens}
    speed = {name: made / sum(r["seconds"] for r in timed[name]) for name in timed}
    speed["device_int8_resident"] = len(prompts) * args.new_tokens / sum(r["seconds"] for r in resident)
    for name in systems:
        report[name] = {"peak_rss_mb": round(peaks[name]), "load_seconds": round(workers[name].load_seconds, 1)}
        if name in speed:
            report[name]["tokens_per_second"] = round(speed[name], 2)
    decode = sum(r["decode_seconds"] for r in timed["device"])
    report["device"]["decode_tokens_per_second"] = round(len(timed["device"]) * (args.new_tokens - 1) / decode, 2)
    per_prompt = [[timed[n][k]["seconds"] for k in range(len(timed[n]))] for n in ("peft", "device")]
    report["speedup_device_over_peft"] = round(speed["device"] / speed["peft"], 2)
    report["speedup_per_request"] = [round(p / d, 2) for p, d in zip(*per_prompt)]
    report["rss_device_over_peft"] = round(peaks["device"] / peaks["peft"], 2)
    device = [r["tokens"] for r in timed["device"][: len(prompts)]]
    report["greedy_vs_peft_int8_weights"] = _agreement(device, reference, AGREE)
    report["greedy_vs_peft_fp32"] = _agreement(device, [r["tokens"] for r in timed["peft"][: len(prompts)]], AGREE)
    report["greedy_int8_resident_vs_device"] = _agreement([r["tokens"] for r in resident], device, args.new_tokens)
    report["prompts_the_adapter_changes"] = sum(a[:AGREE] != b for a, b in zip(device, plain))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
