"""Turn a torch.onnx or ONNX Runtime failure into one ExportError naming the module (qualified name, class) and op."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
from collections.abc import Callable, Iterator

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from edgepeft.errors import ExportError

logger = logging.getLogger(__name__)

_TRY = (
    "rewrite that part of the model with standard torch ops (see docs/supported.md for the layers that compile), "
    "or keep it out of the exported model"
)

# The informative part of ORT's C++ messages (they start with a source path and a long function signature).
_ORT_MARKERS = (
    "The gradient builder has not been registered",
    "Duplicate definition of name",
    "Could not find an implementation for",
    "Argument mismatch when removing edge",
    "Type Error",
    "Node (",
)


def ort_message(error: BaseException) -> str:
    """ORT's own words from an exception: its first line, from the first known marker on, without C++ paths."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    for marker in _ORT_MARKERS:
        if marker in text:
            return text[text.index(marker) :].splitlines()[0][:400]
    return re.sub(r"/onnxruntime_src/\S+ ", "", first)[:400]


def module_at(module: nn.Module | None, node_name: str) -> str | None:
    """The module an ONNX node was traced from, as `qualified.name (Class)`: torch names nodes `/a/a.b/Op_3`."""
    if module is None:  # an ONNX file: no torch source to name
        return None
    parts = [p for p in node_name.split("/") if p]
    for part in reversed(parts[:-1]):
        try:
            sub = module.get_submodule(part)
        except AttributeError:
            continue
        return f"{part} ({type(sub).__name__})"
    return None


def node_of(message: str) -> str | None:
    """The node an ORT message is about: `for node /block/HardSwish` or `node with name '/block/...'`."""
    match = re.search(r"for node (\S+)", message) or re.search(r"node with name '([^']+)'", message)
    return match.group(1).rstrip(".,'") if match else None


def training_graph_error(module: nn.Module | None, error: BaseException, what: str) -> ExportError:
    """ORT could not build (`what`="build") or load (`what`="load") the training graph."""
    message = ort_message(error)
    node = node_of(message)
    where = module_at(module, node) if node else None
    op = _op_in(message)
    subject = f"{where}: its op {op}" if where and op else (where or (f"the op {op}" if op else "the model"))
    verb = "cannot train" if what == "build" else "has no ONNX Runtime CPU kernel for training"
    return ExportError(f"{subject} {verb} on the device (ONNX Runtime {what}: {message}); {_TRY}")


def _op_in(message: str) -> str | None:
    match = (
        re.search(r"has not been registered: (\w+)", message)
        or re.search(r"implementation for (\w+)\(", message)
        or re.search(r"node /(?:[^/ ]+/)*([A-Za-z]+)", message)
    )
    return match.group(1) if match else None


@contextlib.contextmanager
def native_stderr_silenced() -> Iterator[None]:
    """Discard what native code (ORT's C++ logging, torch.onnx's IR dump) writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "w") as devnull:
        os.dup2(devnull.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


@contextlib.contextmanager
def onnx_log_silenced() -> Iterator[None]:
    """torch.onnx prints its whole IR graph on a failure (always: its logging switch is always on): discard it."""
    sys.stdout.flush()
    torch._C._jit_set_onnx_log_output_stream("stderr")
    try:
        with native_stderr_silenced():
            yield
    finally:
        torch._C._jit_set_onnx_log_output_stream("stdout")


class _FunctionRecorder(TorchFunctionMode):
    """Records, for each torch function (torch.fft.rfft is `fft_rfft`), the innermost module that first called it."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.first: dict[str, str] = {}

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if self.stack and name:
            self.first.setdefault(name, self.stack[-1])
        return func(*args, **(kwargs or {}))


class _OpRecorder(TorchDispatchMode):
    """Records, for each aten op, the innermost module running when it first ran."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.first: dict[str, str] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func._schema.name  # e.g. "aten::rms_norm"
        if self.stack:
            self.first.setdefault(name, self.stack[-1])
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _module_stack(module: nn.Module) -> Iterator[list[str]]:
    stack: list[str] = []
    handles = []

    def leave(*_) -> None:  # a forward hook's return value would replace the module's output
        if stack:
            stack.pop()

    for name, sub in module.named_modules():
        label = f"{name or '<root>'} ({type(sub).__name__})"
        handles.append(sub.register_forward_pre_hook(lambda *_, label=label: stack.append(label) and None))
        handles.append(sub.register_forward_hook(leave))
    try:
        yield stack
    finally:
        for handle in handles:
            handle.remove()


@contextlib.contextmanager
def _functions_recorded(stack: list[str], calls: dict[str, str]) -> Iterator[None]:
    """Record which module calls each custom torch.autograd.Function (traced as prim::PythonOp)."""
    original = torch.autograd.Function.apply.__func__

    def apply(cls, *args, **kwargs):
        if stack:
            calls.setdefault(cls.__name__, stack[-1])
        return original(cls, *args, **kwargs)

    torch.autograd.Function.apply = classmethod(apply)
    try:
        yield
    finally:
        torch.autograd.Function.apply = classmethod(original)


@contextlib.contextmanager
def custom_functions_refused(module: nn.Module, rerun: Callable[[], object] | None) -> Iterator[None]:
    """Refuse a custom torch.autograd.Function: torch.onnx traces its forward, and the device would differentiate
    those ops, never its own backward (a straight-through estimator would silently train differently)."""
    calls: dict[str, str] = {}
    with _functions_recorded([""], calls):
        yield
    if not calls:
        return
    name = next(iter(calls))
    where = None
    if rerun is not None:
        located: dict[str, str] = {}
        with _module_stack(module) as stack, _functions_recorded(stack, located), torch.no_grad():
            rerun()
        where = located.get(name)
    subject = f"{where} calls" if where else "the model calls"
    raise ExportError(
        f"{subject} the custom torch.autograd.Function {name}: the device would differentiate the ops of its "
        f"forward, never its own backward; {_TRY}"
    )


def trace_error(module: nn.Module, error: BaseException, rerun: Callable[[], object] | None) -> ExportError:
    """torch.onnx.export failed: find the op in its message and, by running the model once more, the module."""
    text = str(error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    aten = re.search(r"operator '([\w:.]+)'", text)
    python_op = re.search(r"Python operator (\w+)", text) or re.search(r"autograd\.Function (\w+)", text)
    op = aten.group(1) if aten else (python_op.group(1) if python_op else None)
    where = None
    if rerun is not None and op is not None:
        try:
            where = _find_module(module, op, rerun)
        except Exception:  # noqa: BLE001 - the diagnosis must not hide the original error
            logger.debug("could not locate %s", op, exc_info=True)
    cause = f"({type(error).__name__}: {first[:300]})"
    if where:
        return ExportError(f"{where} uses {op}, which torch cannot export to ONNX {cause}; {_TRY}")
    return ExportError(f"torch cannot export {op or 'the model'} to ONNX {cause}; {_TRY}")

def _find_module(module: nn.Module, op: str, rerun: Callable[[], object]) -> str | None:
    calls: dict[str, str] = {}
    with _module_stack(module) as stack, _functions_recorded(stack, calls), torch.no_grad():
        functions, ops = _FunctionRecorder(stack), _OpRecorder(stack)
        with functions, ops:
            rerun()
    if op in calls:
        return calls[op]
    bare = op.split("::")[-1]
    wanted = op if "::" in op else f"aten::{op}"
    return functions.first.get(bare) or next((w for n, w in ops.first.items() if n.split(".")[0] == wanted), None)
