"""Training curves from history.csv: loss terms, validation Dice, learning rate, ramp-up weight.

One panel per logged quantity, several runs overlaid (one colour per run):

    python analysis/curves.py runs/mt_s0 runs/sup_s0 --out figures [--formats png,pdf,svg]

Writes FIGDIR/curves.<format>.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/curves.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from analysis import figures  # noqa: E402
from analysis.runs import Run, find_runs, run_cli, summary  # noqa: E402

# Panel title and y-axis label of the columns the trainers write (docs/evaluation.md lists which
# method writes which); other numeric columns get a panel titled by their name. `val_dice` is the
# network that selects the best epoch: Mean Teacher's teacher, MIRA-U's EMA student, else the student.
KNOWN_COLUMNS = {
    "loss": ("Total loss", "Loss"),
    "loss_sup": ("Supervised loss", "Loss"),
    "loss_dice": ("Supervised Dice loss", "Loss"),
    "loss_bce": ("Supervised BCE loss", "Loss"),
    "loss_sup_ce": ("Supervised CE loss (multi-class)", "Loss"),
    "loss_unsup": ("Unlabelled loss (unweighted)", "Loss"),
    "loss_unsup_ce": ("Pseudo-label CE loss (MIRA-U)", "Loss"),
    "loss_unsup_cons": ("Consistency loss (MIRA-U)", "Loss"),
    "loss_ent": ("Entropy loss", "Loss"),
    "loss_head": ("Teacher head loss", "Loss"),
    "val_dice": ("Validation Dice (exported network)", "Dice"),
    "val_dice_teacher": ("Validation Dice (teacher)", "Dice"),
    "val_dice_student": ("Validation Dice (student)", "Dice"),
    "val_dice_ema": ("Validation Dice (EMA network)", "Dice"),
    "pseudo_dice": ("Pseudo-target Dice vs hidden truth", "Dice"),
    "kept_fraction": ("Pixels kept by the confidence filter", "Fraction"),
    "mean_confidence": ("Mean pseudo-label confidence", "Weight"),
    "lr": ("Learning rate", "Learning rate"),
    "rampup": ("Ramp-up factor", "Weight"),
    "unsup_weight": ("Weight of the unlabelled loss", "Weight"),
}
# Multi-class runs add a column per class: pseudo_dice_<class> (docs/outputs.md).
PER_CLASS_COLUMNS = {"pseudo_dice_": ("Pseudo-target Dice vs hidden truth: {}", "Dice")}
NOT_PLOTTED = {"epoch", "step", "time_s", "images_per_s", "step_ms", "gpu_mem_peak_mb"}   # timings


def panel_names(column: str) -> tuple[str, str]:
    """(panel title, y-axis label) of a history column; an unknown column is titled by its name."""
    if column in KNOWN_COLUMNS:
        return KNOWN_COLUMNS[column]
    for prefix, (title, y_label) in PER_CLASS_COLUMNS.items():
        if column.startswith(prefix):
            return title.format(column[len(prefix):]), y_label
    return column, column


def plotted_columns(runs: list[Run]) -> list[str]:
    """Columns worth a panel, in a reading order: losses, Dice, schedule, then the rest."""
    present = {}
    for run in runs:
        for column in run.history.columns:
            if column not in NOT_PLOTTED and np.issubdtype(run.history[column].dtype, np.number):
                present.setdefault(column, None)

    def order(column):
        known = list(KNOWN_COLUMNS)
        if column in KNOWN_COLUMNS:
            return (known.index(column), column)
        prefix = next((p for p in PER_CLASS_COLUMNS if column.startswith(p)), None)
        if prefix:          # next to its mean (pseudo_dice_RV after pseudo_dice)
            return (known.index(prefix[:-1]) + 0.1, column)
        # An unknown loss term sits after the known losses, anything else at the end.
        last_loss = max(i for i, k in enumerate(known) if k.startswith("loss"))
        return (last_loss + 0.5 if column.startswith("loss") else len(known), column)
    return sorted(present, key=order)


def line_styles(runs: list[Run]) -> list[dict]:
    """Colour by method and dash by seed when that tells the runs apart (a sweep at one labeled
    fraction), else one colour per run."""
    keys = [(run.method, run.seed) for run in runs]
    if len(set(keys)) == len(keys):
        colors = figures.method_colors(run.method for run in runs)
        seeds = sorted({run.seed for run in runs}, key=str)
        dashes = ["-", "--", ":", "-."]
        return [dict(color=colors[run.method], linestyle=dashes[seeds.index(run.seed) % len(dashes)])
                for run in runs]
    palette = plt.get_cmap("tab10" if len(runs) <= 10 else "tab20").colors
    return [dict(color=palette[index % len(palette)]) for index in range(len(runs))]


def curves_figure(runs: list[Run], title: str | None = None):
    runs = [run for run in runs if run.history is not None and len(run.history)]
    if not runs:
        raise ValueError("no run has a non-empty history.csv to plot")
    columns = plotted_columns(runs)
    n_cols = min(3, len(columns))
    n_rows = math.ceil(len(columns) / n_cols)
    figure, axes = plt.subplots(n_rows, n_cols, figsize=(4.2 * n_cols, 3.0 * n_rows),
                                squeeze=False, constrained_layout=True)
    styles = line_styles(runs)
    for panel, column in zip(axes.flat, columns):
        panel_title, y_label = panel_names(column)
        for run, style in zip(runs, styles):
            if column in run.history.columns:
                panel.plot(run.history["epoch"], run.history[column], label=run.label,
                           linewidth=1.4, marker="o" if len(run.history) < 15 else None,
                           markersize=3, **style)
        panel.set_title(panel_title, fontsize=10)
        panel.set_xlabel("Epoch")
        panel.set_ylabel(y_label)
        panel.grid(alpha=0.3)
        values = np.concatenate([run.history[column].dropna().to_numpy() for run in runs
                                 if column in run.history.columns])
        if column == "lr" and values.size and values.min() > 0 and values.max() / values.min() > 20:
            panel.set_yscale("log")
        if y_label == "Dice":
            panel.set_ylim(-0.02, 1.02)
    for panel in list(axes.flat)[len(columns):]:
        panel.set_visible(False)
    by_label = {}  # runs may miss a column, so gather legend entries from every panel
    for panel in axes.flat:
        for handle, label in zip(*panel.get_legend_handles_labels()):
            by_label.setdefault(label, handle)
    figure.legend(list(by_label.values()), list(by_label), loc="outside lower center", ncol=min(3, len(runs)), fontsize=8,
                  frameon=False)
    if title:
        figure.suptitle(title)
    return figure


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    figures.add_output_args(parser)
    args = parser.parse_args(argv)
    runs = find_runs(args.run_dirs)
    for run in runs:
        if run.history is None:
            print(f"curves: skipping {run.path}: no history.csv", file=sys.stderr)
    figure = curves_figure(runs)
    return figures.write_figure(figure, args.out, "curves", args.formats)


if __name__ == "__main__":
    sys.exit(run_cli(main))
