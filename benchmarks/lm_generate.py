"""Greedy generation with a LoRA adapter: edgepeft's device generator against transformers' `generate` + PEFT.

    python benchmarks/lm_generate.py --model DIR [--bundle DIR] [--prompts 4] [--new-tokens 64] [--rounds 2]

`--model` is a transformers causal LM directory (SmolLM2-135M-Instruct saved as fp32); without `--bundle` the host
exports one first. One adapter (seeded random LoRA A and B, large enough to change the greedy tokens) is saved
in PEFT format and used by every system. Each system runs in its own process, the rounds interleaved:

- `device`: `edgepeft.runtime.generation.Generator` with torch blocked (frozen weights dequantized once at load);
- `device_int8_resident`: the same with `dequantize_once=False` (int8 weights resident, dequantized per run);
- `peft`: `PeftModel.from_pretrained(AutoModelForCausalLM)` fp32, `generate(do_sample=False, use_cache=True)`;
- `peft_int8_weights`: the same with each frozen weight replaced by its int8-dequantized value, the bundle's
  exact frozen weights: greedy agreement with the device against it is the int8-free comparison.

Tokens/s counts new tokens over the whole `generate` call (prompt included); peak RSS is the process's VmHWM.
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

COMMON = r"""
import json, sys, time
def peak_mb():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
args = json.loads(sys.argv[1])
prompts = args["prompts"]
"""

DEVICE = COMMON + r"""
sys.modules["torch"] = None  # a device has no torch
from edgepeft.runtime.adapter import load_adapter
from edgepeft.runtime.bundle import open_bundle
from edgepeft.runtime.generation import Generator
from edgepeft.runtime.tasks import task_data

bundle = open_bundle(args["bundle"])
values = load_adapter(bundle.manifest, args["adapter"])
started = time.perf_counter()
generator = Generator(bundle, task_data(bundle), threads=args["threads"], dequantize_once=args["dequantize_once"])
load = time.perf_counter() - started
generator.generate(prompts[0], values, 4, stop_ids=())  # warm-up
tokens, seconds, decode, steps = [], 0.0, 0.0, 0
for prompt in prompts:
    t = time.perf_counter()
    out = generator.generate(prompt, values, args["new_tokens"], stop_ids=())
    seconds += time.perf_counter() - t
    decode += out.decode_seconds
    steps += len(out.token_ids) - 1
    tokens.append(out.token_ids)
base = [generator.generate(p, {k: v * 0 for k, v in values.items()}, args["agree"], stop_ids=()).token_ids
        for p in prompts]
print(json.dumps({"tokens": tokens, "seconds": seconds, "decode_tokens_per_second": steps / decode,
                  "load_seconds": load, "peak_rss_mb": peak_mb(), "no_adapter_tokens": base}))
"""

HOST = COMMON + r"""
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
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
tokenizer = AutoTokenizer.from_pretrained(args["model"])
def generate(prompt, n):
    ids = torch.tensor([args["ids"][prompt]])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n,
                             min_new_tokens=n, do_sample=False, use_cache=True, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()
generate(prompts[0], 4)  # warm-up
tokens, seconds = [], 0.0
for prompt in prompts:
    t = time.perf_counter()
    tokens.append(generate(prompt, args.get("count", args["new_tokens"])))
    seconds += time.perf_counter() - t
print(json.dumps({"tokens": tokens, "seconds": seconds, "load_seconds": load, "peak_rss_mb": peak_mb(),
                  "torch_threads": torch.get_num_threads()}))
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


def _made(result: dict) -> int:
    return sum(len(tokens) for tokens in result["tokens"])


def _run(script: str, args: dict, timeout: int) -> dict:
    command = [sys.executable, "-c", script, json.dumps(args)]
    run = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=_env())
    if run.returncode != 0:
        raise SystemExit(f"a benchmark process failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


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
    parser.add_argument("--timeout", type=int, default=1200)
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
        runs: dict[str, list[dict]] = {name: [] for name in systems}
        for round_ in range(args.rounds):
            for name, (script, extra) in systems.items():
                if round_ and name in ("device_int8_resident", "peft_int8_weights"):
                    continue  # one run each: the int8-resident speed and the reference tokens
                runs[name].append(_run(script, {**shared, **extra}, args.timeout))
                print(f"round {round_ + 1} {name}: {runs[name][-1]['seconds']:.1f} s", file=sys.stderr)
    report = {"threads": args.threads or "default", "prompts": args.prompts,
              "prompt_tokens": [len(ids[p]) for p in prompts], "new_tokens": args.new_tokens}
    for name, results in runs.items():
        report[name] = {
            "tokens_per_second": [round(_made(r) / r["seconds"], 2) for r in results],
            "peak_rss_mb": [round(r["peak_rss_mb"]) for r in results],
            "load_seconds": [round(r["load_seconds"], 1) for r in results],
        }
        if "decode_tokens_per_second" in results[0]:
            report[name]["decode_tokens_per_second"] = [round(r["decode_tokens_per_second"], 2) for r in results]
    median = {name: statistics.median(_made(r) / r["seconds"] for r in results) for name, results in runs.items()}
    report["speedup_device_over_peft"] = round(median["device"] / median["peft"], 2)
    rss = {name: statistics.median(r["peak_rss_mb"] for r in results) for name, results in runs.items()}
    report["rss_device_over_peft"] = round(rss["device"] / rss["peft"], 2)
    device = runs["device"][0]["tokens"]
    report["greedy_vs_peft_int8_weights"] = _agreement(device, runs["peft_int8_weights"][0]["tokens"], AGREE)
    report["greedy_vs_peft_fp32"] = _agreement(device, runs["peft"][0]["tokens"], AGREE)
    resident = runs["device_int8_resident"][0]["tokens"]
    report["greedy_int8_resident_vs_device"] = _agreement(resident, device, args.new_tokens)
    plain = runs["device"][0]["no_adapter_tokens"]
    report["prompts_the_adapter_changes"] = sum(a[:AGREE] != b for a, b in zip(device, plain))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
