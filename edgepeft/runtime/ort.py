"""Load ONNX Runtime's on-device training API without importing torch.

`import onnxruntime.training` imports torch (its `__init__` pulls in `optim` and ORTModule), and even a
plain `import onnxruntime` probes ORTModule, which loads torch when it is installed. The training API
itself (`onnxruntime/training/api/`) needs only `onnxruntime.capi`. Registering a bare package object
for `onnxruntime.training` before the first import, and hiding ORTModule during it, loads the API in
about 0.3 s with no torch at all, which is what a device has.
"""

from __future__ import annotations

import importlib.util
import os
import sys
import types

_PACKAGE = "onnxruntime.training"
_ORTMODULE = "onnxruntime.training.ortmodule"


def onnxruntime_module() -> types.ModuleType:
    """Return `onnxruntime` itself, imported without its ORTModule probe (which loads torch)."""
    training_api()
    import onnxruntime

    return onnxruntime


def training_api() -> types.ModuleType:
    """Return `onnxruntime.training.api` (CheckpointState, Module, Optimizer), torch-free."""
    if _PACKAGE not in sys.modules:
        spec = importlib.util.find_spec("onnxruntime")
        if spec is None or not spec.submodule_search_locations:
            raise ImportError("onnxruntime is not installed: pip install onnxruntime-training-cpu==1.19.2")
        package = types.ModuleType(_PACKAGE)
        package.__path__ = [os.path.join(spec.submodule_search_locations[0], "training")]
        sys.modules[_PACKAGE] = package
    hide_ortmodule = _ORTMODULE not in sys.modules
    if hide_ortmodule:
        sys.modules[_ORTMODULE] = None  # type: ignore[assignment]  # makes the probe an ImportError
    try:
        from onnxruntime.training import api
    finally:
        if hide_ortmodule and sys.modules.get(_ORTMODULE, 0) is None:
            del sys.modules[_ORTMODULE]
    return api


def session_options(threads: int = 0):
    """The `SessionOptions` every ORT session of the runtime starts from: `threads` intra-op threads (0: ORT's
    choice), errors-only logging (ORT warns about initializers an eval graph drops), denormal floats taken as 0.

    Denormals (`session.set_denormal_as_zero`): a causal mask sends a softmax's masked scores to exp(-huge); MLAS's
    exp returns denormals there, not 0, and x86 computes on denormals at a small fraction of its speed. Measured on
    SmolLM2-135M's training step at 1 x 256 (profiled, 2 threads): the 60 softmaxes a step took 78 ms with
    denormals kept, 12 ms flushed. The results did not move: `edgepeft bench lm`'s held-out perplexity (70.839)
    and teacher-forced agreement with PyTorch (749 of 768 tokens) are the figures of the run before it. ORT sets
    the flags on its own threads and, for a process's first session, on the calling thread.
    """
    options = onnxruntime_module().SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = threads
    options.add_session_config_entry("session.set_denormal_as_zero", "1")
    return options


def training_session_options(threads: int = 0):
    """The `SessionOptions` of every training module the runtime builds: `session_options(threads)` with ORT's
    memory pattern and buffer reuse off.

    ORT's memory pattern keeps a second planned block next to the first step's allocations, and with its planner's
    buffer reuse on, ~14 MB a layer stays held through the forward pass beyond what the backward reads (measured,
    the exact chain not traced). With both off, the peak of a MiniLM int8 step at 8 x 128 drops from ~500 MB to
    ~410 MB (pattern) and on to ~250 MB (reuse), same speed.
    """
    options = session_options(threads)
    options.enable_mem_pattern = False
    options.enable_mem_reuse = False
    return options
