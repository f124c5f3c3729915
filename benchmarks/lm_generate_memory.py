"""Memory of generating with a causal LM bundle: a `GenerationSession` against a `TrainingSession`.

    python benchmarks/lm_generate_memory.py BUNDLE [--adapter DIR] [--new-tokens 32] [--rounds 2]

Each session opens in its own fresh process with torch blocked, loads the adapter if given, and continues one
prompt greedily; the two alternate over `--rounds`. Prints one JSON object: per kind, VmRSS once the session is
open and ready, VmHWM (the process's peak) after generating, tokens/s, and whether both generated the same tokens.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys

PROMPT = "She could not help thinking that"

_CHILD = """
import json, sys
sys.modules["torch"] = None
def status(key):
    with open("/proc/self/status", encoding="ascii") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key + ":"))
kind, bundle, adapter, new = sys.argv[1], sys.argv[2], sys.argv[3] or None, int(sys.argv[4])
from edgepeft.runtime import GenerationSession, TrainingSession
from edgepeft.runtime.memory import peak_rss_mb
if kind == "generation":
    session = GenerationSession(bundle, adapter, threads=2)
else:
    session = TrainingSession(bundle, threads=2)
    if adapter:
        session.load_adapter(adapter)
    session.generate("hello", 1)  # builds the generator, as the first generate of an app does
ready = status("VmRSS")
result = session.generate(sys.argv[5], new)
print(json.dumps({"ready_rss_mb": round(ready, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
                  "tokens_per_s": result.tokens_per_second, "token_ids": result.token_ids}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle")
    parser.add_argument("--adapter", default="")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    runs: dict[str, list[dict]] = {"generation": [], "training": []}
    for _ in range(args.rounds):
        for kind in runs:
            out = subprocess.run([sys.executable, "-c", _CHILD, kind, args.bundle, args.adapter, str(args.new_tokens),
                                  PROMPT], capture_output=True, text=True, check=True)  # fmt: skip
            runs[kind].append(json.loads(out.stdout.splitlines()[-1]))
    summary = {}
    for kind, results in runs.items():
        summary[kind] = {key: max(r[key] for r in results) for key in ("ready_rss_mb", "peak_rss_mb")}
        summary[kind]["tokens_per_s"] = [round(r["tokens_per_s"], 1) for r in results]
    summary["same_tokens"] = all(r["token_ids"] == runs["training"][0]["token_ids"] for rs in runs.values() for r in rs)
    summary["peak_ratio"] = round(summary["generation"]["peak_rss_mb"] / summary["training"]["peak_rss_mb"], 3)
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
