"""Label efficiency: test Dice (or another metric) vs labeled fraction, one line per method.

The line joins the means over seeds; the band spans the seeds (min to max, or mean ± std);
each seed is a faint dot:

    python analysis/label_efficiency.py runs/sweep --out figures [--band minmax|std] [--metric dice]

Writes FIGDIR/label_efficiency.<format> (or label_efficiency_<metric>.<format> for another metric).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/label_efficiency.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from analysis import figures  # noqa: E402
from analysis.runs import Run, find_runs, run_cli, summary  # noqa: E402

AXIS_LABELS = {"dice": "Test Dice", "iou": "Test IoU", "precision": "Test precision",
               "recall": "Test recall", "specificity": "Test specificity",
               "accuracy": "Test accuracy", "hd95": "Test HD95", "asd": "Test ASD"}


def points(runs: list[Run], metric: str) -> pd.DataFrame:
    """One row per evaluated run: method, percent labeled, seed, value."""
    rows = []
    for run in runs:
        if run.metrics is None:
            print(f"label_efficiency: skipping {run.path}: no metrics.json", file=sys.stderr)
            continue
        value = run.metrics.get(metric)
        rows.append(dict(method=run.method, percent=100 * run.labeled_fraction, seed=run.seed,
                         value=np.nan if value is None else float(value)))
    if not rows:
        raise ValueError("no run has a metrics.json to plot")
    return pd.DataFrame(rows)


def label_efficiency_figure(runs: list[Run], metric: str = "dice", band: str = "minmax"):
    if band not in ("minmax", "std"):
        raise ValueError(f"band must be 'minmax' or 'std', got {band!r}")
    table = points(runs, metric)
    colors = figures.method_colors(table["method"])
    figure, axis = plt.subplots(figsize=(5.5, 4.0), constrained_layout=True)
    for method, color in colors.items():
        rows = table[table["method"] == method]
        summary = rows.groupby("percent")["value"].agg(["mean", "min", "max", "std", "count"])
        x = summary.index.to_numpy()
        if band == "minmax":
            low, high = summary["min"], summary["max"]
        else:
            spread = summary["std"].fillna(0.0)
            low, high = summary["mean"] - spread, summary["mean"] + spread
        n_seeds = int(summary["count"].max())
        axis.plot(x, summary["mean"], color=color, marker="o", linewidth=1.8,
                  label=f"{method} (n={n_seeds} seeds)")
        axis.fill_between(x, low, high, color=color, alpha=0.18, linewidth=0)
        axis.scatter(rows["percent"], rows["value"], color=color, s=10, alpha=0.45, zorder=3)
    unit = {run.distance_unit() for run in runs if run.metrics is not None}
    y_label = AXIS_LABELS.get(metric, metric)
    if metric in ("hd95", "asd"):
        y_label += f" ({unit.pop() if len(unit) == 1 else 'mixed units'})"
    axis.set_xlabel("Labeled training cases (%)")
    axis.set_ylabel(y_label)
    fractions = sorted(table["percent"].unique())
    axis.set_xticks(fractions)
    axis.set_xticklabels([f"{value:g}" for value in fractions])
    axis.grid(alpha=0.3)
    band_text = "min–max over seeds" if band == "minmax" else "mean ± std over seeds"
    axis.set_title(f"Label efficiency (band: {band_text})", fontsize=10)
    axis.legend(fontsize=8)
    return figure


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    figures.add_output_args(parser)
    parser.add_argument("--metric", default="dice", choices=sorted(AXIS_LABELS),
                        help="metrics.json key on the y axis (default dice)")
    parser.add_argument("--band", default="minmax", choices=("minmax", "std"),
                        help="shaded band over seeds: min to max, or mean ± one standard deviation")
    args = parser.parse_args(argv)
    figure = label_efficiency_figure(find_runs(args.run_dirs), args.metric, args.band)
    stem = "label_efficiency" if args.metric == "dice" else f"label_efficiency_{args.metric}"
    return figures.write_figure(figure, args.out, stem, args.formats)


if __name__ == "__main__":
    sys.exit(run_cli(main))
