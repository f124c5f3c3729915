"""The benchmark harness: edgepeft's runtime against ORT with an fp32 backbone and PyTorch eager + PEFT.

`edgepeft bench` (or `python benchmarks/harness.py`) runs it; `run.run_bench` is the entry point. Every
measurement runs in its own fresh process (`python -m edgepeft.bench.worker JOB`), so nothing here
imports torch, onnxruntime or matplotlib at package import time.
"""
