"""Qualitative grid per run: input | ground truth | probability | prediction (| uncertainty)
for the best, median and worst test cases by Dice.

    python analysis/overlays.py runs/mira_u_s0 --out figures [--split test] [--threshold 0.5]

Reads previews/<split>/<case_id>.npz (image, label, prob, optional uncertainty) and ranks the
cases by per_case.csv Dice (by the preview's own Dice when per_case.csv is absent). Writes
FIGDIR/overlays_<run name>.<format>.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/overlays.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

from analysis import figures  # noqa: E402
from analysis.runs import Run, find_runs, run_cli, unique_names, summary  # noqa: E402

TRUTH_COLOR = (0.1, 0.85, 0.2)
PREDICTION_COLOR = (0.95, 0.2, 0.15)


def _preview_dice(preview: dict, threshold: float) -> float:
    truth = preview["label"] > 0
    pred = preview["prob"] >= threshold
    total = truth.sum() + pred.sum()
    return 1.0 if total == 0 else 2.0 * (truth & pred).sum() / total


def pick_cases(run: Run, split: str = "test", threshold: float = 0.5) -> list[tuple[str, str, float]]:
    """[(tag, case_id, dice)] for the best, median and worst cases that have a preview."""
    preview_dir = run.preview_dir(split)
    # Case ids may hold a '/' (folders layout, names repeated across splits): previews/<split>/val/img_000.npz
    available = sorted(path.relative_to(preview_dir).with_suffix("").as_posix() for path in preview_dir.rglob("*.npz"))
    if not available:
        raise FileNotFoundError(f"{preview_dir}: no previews (*.npz) to show")
    if run.per_case is not None:
        scored = run.per_case[run.per_case["case_id"].isin(available)]
        ranked = list(zip(scored["case_id"], scored["dice"].astype(float)))
    else:
        ranked = [(case_id, _preview_dice(run.load_preview(case_id, split), threshold))
                  for case_id in available]
    if not ranked:
        raise ValueError(f"{run.path / 'per_case.csv'}: none of its case ids has a preview in "
                         f"{preview_dir}")
    ranked.sort(key=lambda pair: (-pair[1], pair[0]))  # best first; ties by case id
    picks = [("best", *ranked[0]), ("median", *ranked[len(ranked) // 2]), ("worst", *ranked[-1])]
    seen, unique = set(), []
    for tag, case_id, dice in picks:  # fewer than three cases: show each once
        if case_id not in seen:
            seen.add(case_id)
            unique.append((tag, case_id, dice))
    return unique


def _display_image(image: np.ndarray):
    image = np.clip(np.asarray(image, dtype=float), 0.0, 1.0)
    if image.ndim == 3 and image.shape[-1] == 3:
        return image, None
    if image.ndim == 3:
        image = image[..., 0]  # one channel (or several modalities: show the first)
    return image, "gray"


def _overlay(axis, image, mask, color, alpha=0.35):
    shown, cmap = _display_image(image)
    axis.imshow(shown, cmap=cmap, vmin=0, vmax=1)
    tint = np.zeros(mask.shape + (4,))
    tint[mask] = (*color, alpha)
    axis.imshow(tint)


def overlays_figure(run: Run, split: str = "test", threshold: float = 0.5):
    picks = pick_cases(run, split, threshold)
    previews = [run.load_preview(case_id, split) for _, case_id, _ in picks]
    with_uncertainty = any("uncertainty" in preview for preview in previews)
    titles = ["Input", "Ground truth", "Probability", f"Prediction (p ≥ {threshold:g})"]
    if with_uncertainty:
        titles.append("Uncertainty")
    figure, axes = plt.subplots(len(picks), len(titles), figsize=(2.6 * len(titles), 2.7 * len(picks)),
                                squeeze=False, constrained_layout=True)
    uncertainty_max = max((float(np.max(p["uncertainty"])) for p in previews if "uncertainty" in p),
                          default=1.0) or 1.0
    for row, ((tag, case_id, dice), preview) in enumerate(zip(picks, previews)):
        image, truth, prob = preview["image"], preview["label"] > 0, preview["prob"]
        shown, cmap = _display_image(image)
        axes[row, 0].imshow(shown, cmap=cmap, vmin=0, vmax=1)
        _overlay(axes[row, 1], image, truth, TRUTH_COLOR)
        probability_image = axes[row, 2].imshow(prob, cmap="viridis", vmin=0, vmax=1)
        _overlay(axes[row, 3], image, prob >= threshold, PREDICTION_COLOR)
        # Ground-truth outline on the prediction shows where the two disagree.
        if truth.any() and not truth.all():
            axes[row, 3].contour(truth, levels=[0.5], colors=[TRUTH_COLOR], linewidths=1.0)
        if with_uncertainty:
            if "uncertainty" in preview:
                uncertainty_image = axes[row, 4].imshow(preview["uncertainty"], cmap="magma",
                                                        vmin=0, vmax=uncertainty_max)
                figure.colorbar(uncertainty_image, ax=axes[row, 4], fraction=0.046,
                                label="Uncertainty")
            else:
                axes[row, 4].text(0.5, 0.5, "none", ha="center", va="center")
        figure.colorbar(probability_image, ax=axes[row, 2], fraction=0.046, label="p(foreground)")
        axes[row, 0].set_ylabel(f"{tag}\n{case_id}\nDice {dice:.3f}", fontsize=9)
        for column, axis in enumerate(axes[row]):
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[column], fontsize=10)
    figure.legend(handles=[Patch(color=TRUTH_COLOR, label="ground truth"),
                           Patch(color=PREDICTION_COLOR, label="prediction")],
                  loc="outside lower center", ncol=2, fontsize=8, frameon=False)
    figure.suptitle(f"{run.label} ({split} split)", fontsize=11)
    return figure


def main(argv=None) -> list[Path]:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    figures.add_output_args(parser)
    parser.add_argument("--split", default="test", help="previews/<split>/ to draw (default test)")
    parser.add_argument("--threshold", type=float, default=0.5,
                        help="probability at which the prediction's outline is drawn (default 0.5)")
    args = parser.parse_args(argv)
    paths = []
    runs = find_runs(args.run_dirs)
    for run, name in zip(runs, unique_names(runs)):
        try:
            figure = overlays_figure(run, args.split, args.threshold)
        except FileNotFoundError as err:     # e.g. a run of a sweep that has not finished yet
            print(f"overlays: skipping {run.path}: {err}", file=sys.stderr)
            continue
        paths += figures.write_figure(figure, args.out, f"overlays_{name}", args.formats)
    if not paths:
        raise FileNotFoundError(f"no run under {', '.join(map(str, args.run_dirs))} has previews")
    return paths


if __name__ == "__main__":
    sys.exit(run_cli(main))
