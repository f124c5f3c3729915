"""The same `edgepeft train` run twice, side by side: torch blocked (as the demo's device process runs it) and
plainly in a venv where torch is installed. Prints each run's peak RSS, whether torch was loaded, and the ratio.

    python benchmarks/torch_free_cli.py --out /tmp/torch-free [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BLOCKED = "import sys; sys.modules['torch'] = None; from edgepeft.cli import main; main()"
PLAIN = "from edgepeft.cli import main; main()"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    from edgepeft.demo import minilm_path, split_austen
    from edgepeft.export import ExportOptions, LoraSpec, export

    args.out.mkdir(parents=True, exist_ok=True)
    train, test, labels = split_austen(args.out, seed=0)
    bundle = args.out / "bundle"
    export(minilm_path(), bundle, lora=LoraSpec(target_modules=("query", "value")),
           options=ExportOptions(labels=labels, profile_memory=True), overwrite=True)  # fmt: skip
    figures = {}
    for name, code in (("torch blocked", BLOCKED), ("torch installed", PLAIN)):
        report = args.out / f"{name.replace(' ', '-')}.json"
        command = [sys.executable, "-c", code, "train", str(bundle), "--data", str(train), "--eval-data", str(test),
                   "--epochs", str(args.epochs), "--report", str(report)]  # fmt: skip
        subprocess.run(command, check=True, stderr=subprocess.DEVNULL)
        figures[name] = json.loads(report.read_text())
        f = figures[name]
        print(f"{name}: peak RSS {f['peak_rss_mb']:.1f} MB, torch_loaded {f['torch_loaded']}, "
              f"accuracy {f['accuracy_after']:.1%}, median step {f['median_step_ms']:.0f} ms")
    ratio = figures["torch installed"]["peak_rss_mb"] / figures["torch blocked"]["peak_rss_mb"]
    print(f"peak RSS, torch installed / torch blocked: {ratio:.3f}")


if __name__ == "__main__":
    main()
