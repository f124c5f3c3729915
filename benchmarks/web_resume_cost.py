"""What web's lost AdamW moments cost: one run of N steps against the same run resumed from its trainable values
halfway with fresh moments (what a web page resuming from saved values does), in the Python runtime, on the
Austen split. Prints both test accuracies and losses.

    PYTHONPATH=. .venv/bin/python benchmarks/web_resume_cost.py --bundle BUNDLE --out DIR [--steps 120] [--every 30]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from edgepeft.demo import split_austen
from edgepeft.runtime import TrainConfig, TrainingSession


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bundle", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--every", type=int, default=60, help="resume (fresh moments) every this many steps")
    parser.add_argument("--lr", type=float, default=2e-3)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    train_csv, test_csv, _ = split_austen(args.out, seed=0)
    figures = {}
    for name, chunk in (("continuous", args.steps), ("resumed_fresh_moments", args.every)):
        session = TrainingSession(args.bundle)
        train, test = session.load_data(train_csv), session.load_data(test_csv)
        for k in range(args.steps // chunk):
            if k:
                session.set_trainable(session.trainable_values())  # the values kept, the AdamW moments dropped
            # each chunk a new run: seed k, so it does not repeat the first chunk's examples
            session.train(train, TrainConfig(batch_size=8, learning_rate=args.lr, max_steps=chunk, epochs=99, seed=k))
        done = args.steps // chunk * chunk
        report = session.evaluate(test)
        figures[name] = {"test_accuracy": report.accuracy, "test_loss": report.loss, "steps": done}
    print(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
