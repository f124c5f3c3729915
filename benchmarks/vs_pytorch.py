"""One training step of edgepeft's runtime against PyTorch eager + Hugging Face PEFT, same LoRA, same batch.

    python benchmarks/vs_pytorch.py [--steps 20] [--batch 8] [--seq 128] [--out results.json]

Each system runs in its own fresh process (peak memory is that process's own VmHWM): PyTorch 2.13
eager + peft with LoRA r=8 on query/value and a trained head, AdamW; edgepeft's int8 bundle and an fp32
bundle on ONNX Runtime training, torch blocked. Ratios from one run are the figures to compare.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

# Both scripts define `start`, `steps` and `step()`; this tail times them the same way.
TIMED_STEPS = r"""
step(); first = time.perf_counter() - start
times = []
for _ in range(2 + steps):
    t = time.perf_counter(); step(); times.append((time.perf_counter() - t) * 1000)
print(json.dumps({"median_step_ms": float(np.median(times[2:])), "cold_start_to_first_step_s": first,
                  "peak_rss_mb": peak_rss_mb()}))
"""

TORCH = r"""
import json, os, sys, time
os.environ["HF_HUB_OFFLINE"] = "1"
start = time.perf_counter()
import numpy as np, peft, torch
from transformers import AutoModelForSequenceClassification
from edgepeft.runtime.memory import peak_rss_mb
model_dir, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
torch.manual_seed(0)
base = AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=6)
model = peft.get_peft_model(base, peft.LoraConfig(r=8, lora_alpha=16, target_modules=["query", "value"],
                                                  task_type="SEQ_CLS"))
model.eval()  # the same dropout-free forward the bundle trains
optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-3)
inputs = {"input_ids": torch.randint(1000, 20000, (batch, seq)), "attention_mask": torch.ones(batch, seq, dtype=torch.long),
          "token_type_ids": torch.zeros(batch, seq, dtype=torch.long)}
labels = torch.arange(batch) % 6
def step():
    loss = model(**inputs, labels=labels).loss
    loss.backward(); optimizer.step(); optimizer.zero_grad()
"""

ORT = r"""
import json, sys, time
start = time.perf_counter()
sys.modules["torch"] = None
import numpy as np
from edgepeft.runtime import TrainingSession
from edgepeft.runtime.memory import peak_rss_mb
bundle, steps, batch, seq = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
session = TrainingSession(bundle)
rng = np.random.default_rng(0)
features = {"input_ids": rng.integers(1000, 20000, (batch, seq)), "attention_mask": np.ones((batch, seq), np.int64),
            "token_type_ids": np.zeros((batch, seq), np.int64)}
feeds = [features[s.name] for s in session.manifest.inputs] + [np.arange(batch, dtype=np.int64) % 6]
module, optimizer = session._module, session._optimizer
optimizer.set_learning_rate(2e-3)
def step():
    module(*feeds); optimizer.step(); module.lazy_reset_grad()
"""


def _run(script: str, *args: object) -> dict:
    run = subprocess.run(
        [sys.executable, "-c", script + TIMED_STEPS, *map(str, args)], capture_output=True, text=True, check=True
    )
    return json.loads(run.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    from edgepeft.demo import austen_rows, minilm_path
    from edgepeft.export import ExportOptions, LoraSpec, export

    labels = tuple(sorted({row["label"] for row in austen_rows()}))
    sizes = (args.steps, args.batch, args.seq)
    results = {"pytorch+peft (fp32)": _run(TORCH, minilm_path(), *sizes)}
    with tempfile.TemporaryDirectory() as tmp:
        for quantization in ("int8", "fp32"):
            bundle = Path(tmp) / quantization
            export(
                minilm_path(), bundle, lora=LoraSpec(), options=ExportOptions(labels=labels, quantization=quantization)
            )
            results[f"edgepeft ORT ({quantization})"] = _run(ORT, bundle, *sizes)
    reference = results["pytorch+peft (fp32)"]
    print(
        f"all-MiniLM-L6-v2, LoRA r=8 query/value + head, AdamW, batch {args.batch}, seq {args.seq}, {args.steps} steps"
    )
    print("| system | median ms/step | x PyTorch | peak RSS (MB) | x PyTorch | cold start to 1st step (s) |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['median_step_ms']:.0f} | {r['median_step_ms'] / reference['median_step_ms']:.2f} "
              f"| {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] / reference['peak_rss_mb']:.2f} "
              f"| {r['cold_start_to_first_step_s']:.2f} |")  # fmt: skip
    if args.out:
        args.out.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
