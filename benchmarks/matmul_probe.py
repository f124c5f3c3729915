"""One matmul of an LM training step on this CPU: ORT int8 (`MatMulIntegerToFloat`) against ORT fp32 and torch fp32.

    python benchmarks/matmul_probe.py [--m 256 --k 576 --n 1536] [--runs 200] [--threads 2]

The device step's frozen products are int8 and PyTorch + PEFT's are fp32, so the training ratio of
`edgepeft bench lm` follows what this CPU does with each (VNNI or not, its BLAS's fp32 GEMM). The three run
interleaved in one process, ORT's idle threads not spinning (they would take the cores from torch's); prints each
median (the first tenth of the runs left out) and the ratios.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
from onnx import TensorProto, helper


def _session(node, inputs, m: int, n: int, threads: int):
    from edgepeft.runtime.ort import onnxruntime_module

    ort = onnxruntime_module()
    graph = helper.make_graph([node], "probe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, [m, n])])
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # idle ORT threads would slow torch's
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--m", type=int, default=256, help="rows: the tokens of a batch (1 x 256)")
    parser.add_argument("--k", type=int, default=576, help="SmolLM2-135M's hidden size")
    parser.add_argument("--n", type=int, default=1536, help="SmolLM2-135M's MLP width")
    parser.add_argument("--runs", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    m, k, n = args.m, args.k, args.n
    f32, u8, s8 = TensorProto.FLOAT, TensorProto.UINT8, TensorProto.INT8
    fp32 = _session(helper.make_node("MatMul", ["a", "b"], ["y"]),
                    [helper.make_tensor_value_info("a", f32, [m, k]), helper.make_tensor_value_info("b", f32, [k, n])],
                    m, n, args.threads)  # fmt: skip
    int8 = _session(helper.make_node("MatMulIntegerToFloat", ["a", "b", "sa", "sb"], ["y"], domain="com.microsoft"),
                    [helper.make_tensor_value_info("a", u8, [m, k]), helper.make_tensor_value_info("b", s8, [k, n]),
                     helper.make_tensor_value_info("sa", f32, [1]), helper.make_tensor_value_info("sb", f32, [n])],
                    m, n, args.threads)  # fmt: skip
    rng = np.random.default_rng(0)
    a, b = rng.random((m, k), np.float32), rng.random((k, n), np.float32)
    int8_feeds = {"a": (a * 127).astype(np.uint8), "b": (b * 127).astype(np.int8),
                  "sa": np.ones(1, np.float32), "sb": np.ones(n, np.float32)}  # fmt: skip
    ta, tb = torch.from_numpy(a), torch.from_numpy(b)
    runs = {"ORT int8": lambda: int8.run(None, int8_feeds), "ORT fp32": lambda: fp32.run(None, {"a": a, "b": b}),
            "torch fp32": lambda: ta @ tb}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(args.runs):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - start) * 1e3)
    medians = {name: statistics.median(t[args.runs // 10:]) for name, t in times.items()}
    print(f"{m} x {k} x {n}, {args.threads} threads, medians of {args.runs - args.runs // 10} interleaved runs:")
    for name, ms in medians.items():
        print(f"  {name:10s} {ms:7.3f} ms  ({medians['torch fp32'] / ms:.2f}x torch fp32)")


if __name__ == "__main__":
    main()
