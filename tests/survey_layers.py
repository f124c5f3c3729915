"""Survey (a script, not a test): which building blocks of tests/layer_zoo.py the exporter compiles today.

For each zoo entry and for int8 and fp32: export with `edgepeft.export.export`, compare ORT's eval outputs
(`TrainingSession.predict` and the bundle's inference.onnx) with torch's, train 20 steps on the device and
check the loss falls. Writes a markdown table.

    PYTHONPATH=$PWD HF_HUB_OFFLINE=1 python tests/survey_layers.py [--out survey-layers.md] [names...]
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).parent))

import layer_zoo  # noqa: E402

from edgepeft.errors import EdgePeftError  # noqa: E402

FP32_ATOL = 1e-4  # as tests/test_export.py
INT8_REL = 2e-2  # int8 weights: max error within 2% of the largest output magnitude
STEPS = 20


@dataclass
class Result:
    name: str
    quantization: str
    stage: str  # the first stage that failed, or "ok"
    error: str = ""
    predict_err: float | None = None
    inference_err: float | None = None
    loss_before: float | None = None
    loss_after: float | None = None
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return self.stage == "ok"


# The informative tail of ORT's C++ messages (they start with a long function signature).
_ORT_MARKERS = ("The gradient builder has not been registered", "Duplicate definition of name",
                "Could not find an implementation for", "Argument mismatch when removing edge")  # fmt: skip


def describe(e: BaseException) -> str:
    """Exception type and first line (ORT's own part of it); flags an exception that is not one of edgepeft's."""
    text = str(e).strip().splitlines()
    first = text[0] if text else ""
    for marker in _ORT_MARKERS:
        if marker in first:
            prefix = first.split("/onnxruntime_src")[0]
            first = f"{prefix}[ORT] {first[first.index(marker):]}"
            break
    own = "" if isinstance(e, EdgePeftError) else " (not an edgepeft error)"
    return f"{type(e).__name__}{own}: {first[:220]}"


def _max_err(got: np.ndarray, expected: np.ndarray, quantization: str) -> float:
    """fp32: max absolute error; int8: max absolute error over the largest |expected|."""
    err = float(np.abs(got - expected).max())
    return err if quantization == "fp32" else err / float(np.abs(expected).max())


def _inference_outputs(bundle: Path, features: dict[str, np.ndarray]) -> np.ndarray:
    from edgepeft.runtime.ort import onnxruntime_module

    ort = onnxruntime_module()
    session = ort.InferenceSession(str(bundle / "inference.onnx"), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    return session.run(None, {n: features[n] for n in names})[0]


def check_bundle(
    result: Result, bundle: Path, features: dict[str, np.ndarray], expected: np.ndarray, classes: int, progress=None
) -> Result:
    """Compare ORT eval outputs with `expected`, then train STEPS steps on fixed labels; fills `result`.

    `progress`, a pipe, receives each stage's name as it starts (so a crash is pinned to its stage).
    """

    def at(stage: str) -> None:
        result.stage = stage
        if progress is not None:
            progress.send(stage)

    from edgepeft.runtime import TrainConfig, TrainingSession

    tolerance = FP32_ATOL if result.quantization == "fp32" else INT8_REL
    at("predict")
    session = TrainingSession(bundle)
    result.predict_err = _max_err(session.predict(features).outputs, expected, result.quantization)
    at("inference.onnx")
    result.inference_err = _max_err(_inference_outputs(bundle, features), expected, result.quantization)
    at("eval output")
    if not (result.predict_err <= tolerance and result.inference_err <= tolerance):
        result.error = f"eval output off: predict {result.predict_err:.2e}, inference {result.inference_err:.2e}"
        return result
    at("train")
    rows = len(next(iter(features.values())))
    labels = np.random.default_rng(0).integers(0, classes, rows).astype(np.int64)
    data = session.dataset(features, labels)
    result.loss_before = session.evaluate(data).loss
    report = session.train(data, TrainConfig(epochs=STEPS, batch_size=rows, learning_rate=1e-2, shuffle=False))
    result.loss_after = session.evaluate(data).loss
    if report.steps != STEPS or not result.loss_after < result.loss_before:
        losses = f"loss {result.loss_before:.4f} -> {result.loss_after:.4f}"
        result.error = f"{report.steps} steps ({report.stopped}), {losses}"
        return result
    at("ok")
    return result


def _run_in_child(result: Result, export_and_reference: Callable, pipe) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        bundle = Path(tmp) / "bundle"
        try:
            features, expected, classes = export_and_reference(bundle)
            check_bundle(result, bundle, features, expected, classes, progress=pipe)
        except Exception as e:  # noqa: BLE001 - a survey records every failure
            result.error = describe(e)
            logging.getLogger("survey").debug("%s %s\n%s", result.name, result.quantization, traceback.format_exc())
    pipe.send(result)
    pipe.close()


def run_case(
    name: str, quantization: str, export_and_reference: Callable[[Path], tuple[dict[str, np.ndarray], np.ndarray, int]]
) -> Result:
    """`export_and_reference(bundle_dir)` exports and returns (features, torch eval output, classes).

    Runs in a forked child: a native crash (ORT segfaults on some graphs) becomes a row, not the end of the survey.
    """
    result = Result(name, quantization, "export")
    started = time.perf_counter()
    receive, send = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=_run_in_child, args=(result, export_and_reference, send))
    child.start()
    send.close()
    try:
        while True:  # stage names while the child works, then the final Result
            message = receive.recv()
            if isinstance(message, Result):
                result = message
                break
            result.stage = message
    except EOFError:
        pass
    child.join()
    if child.exitcode:
        how = f"killed by signal {-child.exitcode}" if child.exitcode < 0 else f"exit code {child.exitcode}"
        result.error = f"process crashed ({how}) during {result.stage}"
    result.seconds = time.perf_counter() - started
    print(f"{name:32s} {quantization:5s} {result.stage:14s} {result.error[:150]}", flush=True)
    return result


def _zoo_case(name: str, quantization: str) -> Callable[[Path], tuple[dict[str, np.ndarray], np.ndarray, int]]:
    from edgepeft.export import ExportOptions, LoraSpec, export

    entry = layer_zoo.ZOO[name]

    def go(bundle: Path) -> tuple[dict[str, np.ndarray], np.ndarray, int]:
        reference, example = entry()
        with torch.no_grad():
            expected = reference.eval()(*example.values()).numpy()
        model, example = entry()
        lora = LoraSpec(target_modules=entry.targets, modules_to_save=entry.head)
        export(model, bundle, example_inputs=example, lora=lora, options=ExportOptions(quantization=quantization))
        return {k: v.numpy() for k, v in example.items()}, expected, expected.shape[-1]

    return go


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.1e}"


def table(results: list[Result], title: str, key_header: str = "entry") -> str:
    """Markdown: one row per case, status, errors, losses."""
    lines = [
        f"# {title}",
        "",
        f"fp32: eval outputs within {FP32_ATOL} absolute of torch's; int8: within {INT8_REL:.0%} of the largest "
        f"|output| (errors shown are absolute for fp32, relative for int8). Train: {STEPS} steps, lr 1e-2, on the "
        "example batch with fixed random labels; the loss must fall. `stage` is the first stage that failed.",
        "",
        f"| {key_header} | quant | result | stage | error | predict err | inference.onnx err | loss before -> after |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        loss = f"{r.loss_before:.3f} -> {r.loss_after:.3f}" if r.loss_after is not None else ""
        error = r.error.replace("|", "\\|")
        lines.append(
            f"| {r.name} | {r.quantization} | {'PASS' if r.passed else 'FAIL'} | {'' if r.passed else r.stage} "
            f"| {error} | {_fmt(r.predict_err)} | {_fmt(r.inference_err)} | {loss} |"
        )
    passed = sum(r.passed for r in results)
    lines += ["", f"{passed} of {len(results)} cases pass.", ""]
    return "\n".join(lines)


def quiet() -> None:
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.ERROR)
    for noisy in ("edgepeft", "transformers", "peft", "optimum"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="zoo entries (default: all)")
    parser.add_argument("--out", default="survey-layers.md")
    parser.add_argument("--quantization", nargs="+", default=["int8", "fp32"])
    args = parser.parse_args()
    quiet()
    names = args.names or list(layer_zoo.ZOO)
    results = [run_case(n, q, _zoo_case(n, q)) for n in names for q in args.quantization]
    Path(args.out).write_text(table(results, "Survey: torch building blocks through `edgepeft.export.export`"))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
