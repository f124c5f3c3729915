"""chart.png: ms per training step at every grid point, and peak RSS, per system (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepeft.errors import EdgePeftError

COLORS = {"edgepeft": "#1b9e77", "ort-fp32": "#7570b3", "pytorch-peft": "#d95f02"}


def write_chart(results: dict[str, Any], path: Path) -> None:
    """Two bar charts side by side: median ms/step per (batch x seq) per system; peak RSS per system."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EdgePeftError("the chart needs matplotlib: pip install 'edgepeft[bench]'") from None

    systems = results["systems"]
    names = list(systems)
    points = [f"{p['batch']}x{p['seq']}" for p in systems[names[0]]["speed"]]
    width = 0.8 / len(names)
    batch, seq = results["headline"]["batch"], results["headline"]["seq"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw={"width_ratios": [2.2, 1]})
    for i, name in enumerate(names):
        xs = [j + (i - (len(names) - 1) / 2) * width for j in range(len(points))]
        values = [p["median_ms"] for p in systems[name]["speed"]]
        bars = left.bar(xs, values, width, label=name, color=COLORS.get(name))
        left.bar_label(bars, labels=[f"{v:.0f}" for v in values], fontsize=7, padding=1)
    left.set_xticks(range(len(points)), points)
    left.set_xlabel("batch x sequence length")
    every = [p["median_ms"] for n in names for p in systems[n]["speed"]]
    log = max(every) / min(every) > 20  # a log axis only when the grid spans more than a decade or so
    left.set_ylabel("median ms per training step" + (" (log scale)" if log else ""))
    if log:
        left.set_yscale("log")
    left.set_title("Training step time (lower is better)")
    left.legend(fontsize=8)

    rss = [systems[n]["peak_rss_mb"] for n in names]
    bars = right.bar(names, rss, color=[COLORS.get(n) for n in names])
    right.bar_label(bars, labels=[f"{v:.0f}" for v in rss], fontsize=8, padding=1)
    right.set_ylabel("MB")
    right.set_title(f"Peak RSS, training at {batch}x{seq}")
    right.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"all-MiniLM-L6-v2 + LoRA r=8, {results['machine']['cpu']}, {results['machine']['date']}",
                 fontsize=9)  # fmt: skip
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
