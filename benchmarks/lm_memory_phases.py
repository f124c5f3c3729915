"""Where a device training process's memory goes, phase by phase: ORT loaded, checkpoint, training module,
optimizer, training steps. Torch blocked, as on a device.

    python benchmarks/lm_memory_phases.py BUNDLE [--steps 2]

Prints one JSON object: VmRSS (MB) after each phase and VmHWM (the peak) at the end. The phases are ORT's
training API calls the runtime makes (`runtime/session.py`, with its `training_session_options`); the data is one
random block of the bundle's max_length (a causal LM bundle: the figures do not depend on the text).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.modules["torch"] = None  # a device has no torch
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lm_train_memory import _status  # noqa: E402  (this directory: the same /proc/self/status reader)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    import numpy as np

    from edgepeft import manifest as mf
    from edgepeft.runtime.bundle import open_bundle
    from edgepeft.runtime.ort import training_api, training_session_options

    bundle = Path(args.bundle)
    api = training_api()
    phases: dict[str, float] = {"ort_loaded": _status("VmRSS")}
    state = api.CheckpointState.load_checkpoint(str(bundle / mf.CHECKPOINT))
    phases["checkpoint"] = _status("VmRSS")
    options = training_session_options(threads=2)
    module = api.Module(str(bundle / mf.TRAINING_MODEL), state, None, session_options=options)
    phases["training_module"] = _status("VmRSS")
    optimizer = api.Optimizer(str(bundle / mf.OPTIMIZER_MODEL), module)
    phases["optimizer"] = _status("VmRSS")

    manifest = open_bundle(bundle).manifest
    length = manifest.task.max_length
    ids = np.random.default_rng(0).integers(0, 10_000, (1, length)).astype(np.int64)
    features = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(length)[None]}
    module.train()
    for _ in range(args.steps):  # one optimizer step as the runtime takes it (`runtime/session.py`)
        module(*[features[s.name] for s in manifest.inputs], ids)
        optimizer.step()
        module.lazy_reset_grad()
    phases["after_steps"] = _status("VmRSS")
    rss = {phase: round(mb, 1) for phase, mb in phases.items()}
    print(json.dumps({"bundle": str(bundle), "rss_mb": rss, "peak_mb": round(_status("VmHWM"), 1)}))


if __name__ == "__main__":
    main()
