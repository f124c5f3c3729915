"""This machine's sustained matmul rates, one library per process: numpy's and torch's fp32, ORT's fp32 and int8.

Each function runs inside a benchmark worker (`edgepeft.bench.worker`, task `peak`), which the harness starts
with OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE removed from its environment (`edgepeft.bench.roofline`). Every
rate is the best of `rounds` rounds of `size` x `size` products over `seconds` in all, on `threads` threads.
"""

from __future__ import annotations

import os
import time
import types
from collections.abc import Callable
from typing import Any

from edgepeft.bench.roofline import OPENBLAS_VARIABLES


def best_rate(product: Callable[[], object], flops: float, seconds: float, rounds: int = 3) -> float:
    """Best of `rounds` rounds of `product()` repeated for `seconds / rounds` each: FLOPs per second."""
    product()  # warm-up: threads started, pages touched, kernels chosen
    best = 0.0
    for _ in range(rounds):
        count, start = 0, time.perf_counter()
        while (elapsed := time.perf_counter() - start) < seconds / rounds or count == 0:
            product()
            count += 1
        best = max(best, flops * count / elapsed)
    return best


def _threadpoolctl() -> types.ModuleType:
    try:
        import threadpoolctl
    except ImportError:
        from edgepeft.errors import EdgePeftError

        raise EdgePeftError("the numpy matmul peak needs threadpoolctl: pip install -e '.[bench]'") from None
    return threadpoolctl


def blas_info() -> list[dict[str, Any]]:
    """The BLAS libraries this process loaded, as threadpoolctl sees them (kernel in `architecture`)."""
    return [info for info in _threadpoolctl().threadpool_info() if info.get("user_api") == "blas"]


def numpy_fp32(size: int, seconds: float, threads: int) -> dict[str, Any]:
    """numpy float32 matmul (its OpenBLAS), limited to `threads` BLAS threads; with the kernel it ran."""
    import numpy as np

    threadpoolctl = _threadpoolctl()
    rng = np.random.default_rng(0)
    a, b = (rng.standard_normal((size, size), dtype=np.float32) for _ in range(2))
    out = np.empty_like(a)
    with threadpoolctl.threadpool_limits(limits=threads, user_api="blas"):
        rate = best_rate(lambda: np.matmul(a, b, out=out), 2.0 * size**3, seconds)
        blas = blas_info()
    environment = {name: os.environ.get(name) for name in OPENBLAS_VARIABLES}
    return {"fp32": {"numpy": rate}, "blas": blas, "environment": environment}


def torch_fp32(size: int, seconds: float, threads: int) -> dict[str, Any]:
    """torch float32 matmul (its own MKL / oneDNN) on `threads` threads."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    rate = best_rate(lambda: torch.matmul(a, b, out=out), 2.0 * size**3, seconds)
    return {"fp32": {"torch": rate}, "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def _session(ort, node, inputs: list, initializers: list, threads: int):
    from onnx import TensorProto, helper

    output_type = TensorProto.INT32 if node.op_type == "MatMulInteger" else TensorProto.FLOAT
    graph = helper.make_graph([node], "peak", inputs, [helper.make_tensor_value_info("y", output_type, None)],
                              initializers)  # fmt: skip
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)]
    model = helper.make_model(graph, opset_imports=opsets)
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def onnxruntime_rates(size: int, seconds: float, threads: int) -> dict[str, Any]:
    """ORT's fp32 `MatMul`, and its int8 kernels: `MatMulInteger` (u8 x s8) and `DynamicQuantizeMatMul`.

    The weights are int8 initializers, as in an int8 bundle; `DynamicQuantizeMatMul` (what the bundle's
    frozen matmuls run) also quantizes its fp32 input on every call.
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    from edgepeft.runtime.ort import onnxruntime_module

    ort = onnxruntime_module()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((size, size), dtype=np.float32)
    weight = numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32), "w")
    weight_int8 = numpy_helper.from_array(rng.integers(-127, 128, (size, size), dtype=np.int8), "w")
    flops = 2.0 * size**3

    def rate(node, input_type: int, value: np.ndarray, initializers: list) -> float:
        inputs = [helper.make_tensor_value_info("x", input_type, [size, size])]
        session = _session(ort, node, inputs, initializers, threads)
        return best_rate(lambda: session.run(None, {"x": value}), flops, seconds)

    fp32 = rate(helper.make_node("MatMul", ["x", "w"], ["y"]), TensorProto.FLOAT, x, [weight])
    quantized = rng.integers(0, 256, (size, size), dtype=np.uint8)  # u8 x s8: MLAS's fast int8 kernel (s8 x s8 is not)
    node = helper.make_node("MatMulInteger", ["x", "w"], ["y"])
    int8 = {"MatMulInteger": rate(node, TensorProto.UINT8, quantized, [weight_int8])}
    scale = numpy_helper.from_array(np.array(0.01, dtype=np.float32), "scale")
    node = helper.make_node("DynamicQuantizeMatMul", ["x", "w", "scale"], ["y"], domain="com.microsoft")
    int8["DynamicQuantizeMatMul"] = rate(node, TensorProto.FLOAT, x, [weight_int8, scale])
    return {"fp32": {"onnxruntime": fp32}, "int8": int8}


LIBRARIES = {"numpy": numpy_fp32, "torch": torch_fp32, "onnxruntime": onnxruntime_rates}
