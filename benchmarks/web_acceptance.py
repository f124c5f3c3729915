"""Issue 13's acceptance run: the demo MiniLM int8 bundle trained in headless Chromium from the Austen CSV.

Trains the same number of steps (same batch size and learning rate) in the page and in the Python runtime, then
reports both test accuracies, how often PEFT on the host (the downloaded adapter in `PeftModel.from_pretrained`)
agrees with the browser's predictions, whether the page's request log holds anything outside its origin, and the
browser's cold start and ms per step. Needs `npm ci` in edgepeft/web and /usr/bin/chromium.

    PYTHONPATH=. .venv/bin/python benchmarks/web_acceptance.py --out /tmp/web-acceptance [--steps 120] [--bundle DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
WEB = ROOT / "edgepeft" / "web"
LABELS = ("emma", "mansfieldpark", "northangerabbey", "persuasion", "prideprejudice", "sensesensibility")


def demo_bundle(out: Path) -> Path:
    """The demo's int8 bundle (edgepeft demo's export settings)."""
    from edgepeft.demo import minilm_path
    from edgepeft.export import ExportOptions, LoraSpec, export

    bundle = out / "bundle-int8"
    if not (bundle / "manifest.json").is_file():
        options = ExportOptions(labels=LABELS, quantization="int8", base_name="sentence-transformers/all-MiniLM-L6-v2")
        export(minilm_path(), bundle, lora=LoraSpec(r=8, alpha=16, target_modules=("query", "value")), options=options)
    return bundle


def browser_run(bundle: Path, train_csv: Path, test_csv: Path, out: Path, steps: int, lr: float, batch: int) -> dict:
    from edgepeft.webserve import WebApp, serve_in_thread

    app = WebApp(bundle)
    server, url = serve_in_thread(app)
    try:
        command = ["node", str(WEB / "test" / "browser_train.mjs"), "--url", url, "--data", str(train_csv),
                   "--eval-data", str(test_csv), "--out", str(out / "browser-adapter"), "--max-steps", str(steps),
                   "--lr", str(lr), "--batch-size", str(batch), "--timeout", "1800"]  # fmt: skip
        done = subprocess.run(command, capture_output=True, text=True, timeout=2400)
        if done.returncode != 0:
            raise SystemExit(f"browser run failed:\n{done.stderr[-3000:]}")
        report = json.loads(done.stdout)
    finally:
        server.shutdown()
        server.server_close()
    report["server_log"] = app.requests
    report["server_host"] = server.server_address[0]
    return report


def python_run(bundle: Path, train_csv: Path, test_csv: Path, steps: int, lr: float, batch: int) -> dict:
    from edgepeft.runtime import TrainConfig, TrainingSession

    session = TrainingSession(bundle)
    train, test = session.load_data(train_csv), session.load_data(test_csv)
    before = session.evaluate(test)
    report = session.train(train, TrainConfig(batch_size=batch, learning_rate=lr, max_steps=steps, epochs=99))
    after = session.evaluate(test)
    return {"accuracy_before": before.accuracy, "accuracy_after": after.accuracy, "steps": report.steps,
            "median_step_ms": report.median_step_ms}  # fmt: skip


def host_predictions(adapter: Path, test_csv: Path) -> np.ndarray:
    import csv

    import peft
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from edgepeft.demo import minilm_path

    texts = [row["text"] for row in csv.DictReader(open(test_csv, encoding="utf-8"))]
    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=len(LABELS))
    model = peft.PeftModel.from_pretrained(base, adapter).eval()
    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    out = []
    with torch.no_grad():
        for start in range(0, len(texts), 64):
            batch = tokenizer(texts[start : start + 64], truncation=True, max_length=128, padding=True,
                              return_tensors="pt")  # fmt: skip
            out.append(model(**batch).logits.argmax(-1).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--bundle", type=Path)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    args = parser.parse_args()
    from edgepeft.demo import split_austen

    args.out.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv, _ = split_austen(args.out, seed=0)
    bundle = args.bundle or demo_bundle(args.out)
    t0 = time.time()
    browser = browser_run(bundle, train_csv, test_csv, args.out, args.steps, args.lr, args.batch_size)
    browser_seconds = time.time() - t0
    python = python_run(bundle, train_csv, test_csv, args.steps, args.lr, args.batch_size)
    host = host_predictions(args.out / "browser-adapter", test_csv)
    page = np.array(browser["result"]["heldOutPredictions"])
    result = browser["result"]
    figures = {
        "steps": result["steps"],
        "browser_accuracy_before": result["before"]["accuracy"],
        "browser_accuracy_after": result["after"]["accuracy"],
        "python_accuracy_before": python["accuracy_before"],
        "python_accuracy_after": python["accuracy_after"],
        "accuracy_gap_points": round(100 * abs(result["after"]["accuracy"] - python["accuracy_after"]), 2),
        "peft_agrees_with_browser": float((host == page).mean()),
        "browser_first_loss": result["losses"][0],
        "browser_last10_mean_loss": float(np.mean(result["losses"][-10:])),
        "browser_median_step_ms": float(np.median(result["stepMs"])),
        "python_median_step_ms": python["median_step_ms"],
        "browser_cold_start_ms": result["openMs"] + result["firstStepMs"],  # page load to ready + train to step 1
        "browser_open_ms": result["openMs"],
        "cross_origin_isolated": browser["crossOriginIsolated"],
        "requests": len(browser["requests"]),
        "foreign_requests": browser["foreign"],
        "server_host": browser["server_host"],
        "browser_wall_seconds": round(browser_seconds, 1),
    }
    (args.out / "acceptance.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    sys.exit(0)


if __name__ == "__main__":
    main()
