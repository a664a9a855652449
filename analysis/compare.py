"""Results table over runs: mean ± std over seeds per (method, labeled fraction), with a paired
Wilcoxon signed-rank test of per-case Dice against the supervised baseline.

    python analysis/compare.py runs/sweep --out tables

Writes FIGDIR/comparison.{md,csv,tex} and FIGDIR/wilcoxon.csv (one test per seed and one over
all seeds per method and fraction), and prints the Markdown table.

Grouping: runs are grouped by method, labeled fraction and every other setting that differs
between them (data set, network, schedule, a method's weight...), shown in the `setting` column:
runs that differ are never merged into one row.

Pairing: a method's run is paired with the supervised run of the same labeled fraction, seed and
shared settings (same data, network and schedule; a method's own section may differ), case by case
on case_id. Over seeds, a case's
Dice is first averaged over the seeds where it was paired, so a test case shared by all seeds
counts once (the test is on cases, not on case-seed repeats).

Multi-class runs (metrics.json lists "classes"): Dice etc. are the means over the foreground
classes, and a `Dice <class>` column per class follows the others.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/compare.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from semiseg.runs import atomic_write  # noqa: E402
from analysis import figures  # noqa: E402
from analysis.runs import Run, find_runs, percent, run_cli, setting_keys, summary, variant  # noqa: E402

BASELINE = "supervised"
TABLE_METRICS = ("dice", "iou", "precision", "recall", "hd95", "asd")
HEADERS = {"dice": "Dice", "iou": "IoU", "precision": "Precision", "recall": "Recall",
           "hd95": "HD95", "asd": "ASD"}
DISTANCES = ("hd95", "asd")


def table_metrics(runs) -> tuple:
    """TABLE_METRICS, plus a `dice_<class>` column for every class a multi-class run's metrics.json
    names (its "classes" list), in the order first seen."""
    names = dict.fromkeys(c for run in runs for c in ((run.metrics or {}).get("classes") or []))
    return TABLE_METRICS + tuple(f"dice_{c}" for c in names)


def header(name: str) -> str:
    return HEADERS.get(name) or (f"Dice {name[len('dice_'):]}" if name.startswith("dice_") else name)


def _group_order(key):
    method, fraction, setting = key
    return (fraction, method != BASELINE, method, setting)


class Grouping:
    """Which row a run belongs to, and which supervised run it is paired with."""

    def __init__(self, runs: list[Run]):
        from semiseg.config import METHODS, UNLABELED_ONLY_KEYS     # tables of names, no TensorFlow
        self.keys = setting_keys(runs)
        # Settings outside every method's own section (and not read by supervised training): a method
        # is paired only with a baseline trained on the same data, network and schedule.
        self.shared = [key for key in self.keys
                       if key.split(".", 1)[0] not in METHODS and key not in UNLABELED_ONLY_KEYS]

    def group(self, run: Run) -> tuple:
        return (run.method, run.labeled_fraction, variant(run, self.keys))

    def pairing(self, run: Run) -> tuple:
        return (run.labeled_fraction, run.seed, variant(run, self.shared))


def evaluated_runs(runs: list[Run]) -> list[Run]:
    kept = [run for run in runs if run.metrics is not None]
    for run in runs:
        if run.metrics is None:
            print(f"compare: skipping {run.path}: no metrics.json (run `main.py evaluate`)",
                  file=sys.stderr)
    if not kept:
        raise ValueError("no run has a metrics.json to compare")
    return kept


def paired_dice(run: Run, baseline: Run) -> pd.DataFrame:
    """case_id, dice (method), dice_baseline for the cases both runs scored."""
    for each in (run, baseline):
        if each.per_case is None:
            raise FileNotFoundError(f"{each.path / 'per_case.csv'}: needed for the Wilcoxon test")
    left = run.per_case[["case_id", "dice"]]
    right = baseline.per_case[["case_id", "dice"]].rename(columns={"dice": "dice_baseline"})
    return left.merge(right, on="case_id", how="inner")


def wilcoxon_p(method_dice, baseline_dice) -> float:
    """Two-sided paired Wilcoxon signed-rank p-value; 1 if all differences are 0, NaN if no pairs."""
    differences = np.asarray(method_dice, float) - np.asarray(baseline_dice, float)
    if differences.size == 0:
        return math.nan
    if np.all(differences == 0):  # scipy cannot rank an all-zero sample; no evidence of a change
        return 1.0
    return float(stats.wilcoxon(method_dice, baseline_dice).pvalue)


def wilcoxon_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (method, fraction, seed) and one per (method, fraction) over all seeds."""
    grouping = Grouping(runs)
    baselines = {grouping.pairing(run): run for run in runs if run.method == BASELINE}
    rows, pooled = [], {}
    for run in runs:
        if run.method == BASELINE:
            continue
        baseline = baselines.get(grouping.pairing(run))
        key = grouping.group(run)
        pooled.setdefault(key, [])
        if baseline is None:
            print(f"compare: no {BASELINE} run with labeled fraction {run.labeled_fraction} and "
                  f"seed {run.seed} to pair {run.path} with", file=sys.stderr)
            continue
        pairs = paired_dice(run, baseline)
        pooled[key].append(pairs)
        rows.append(dict(method=run.method, labeled_fraction=run.labeled_fraction, setting=key[2], seed=run.seed,
                         n_pairs=len(pairs),
                         median_difference=float((pairs["dice"] - pairs["dice_baseline"]).median())
                         if len(pairs) else math.nan,
                         p_value=wilcoxon_p(pairs["dice"], pairs["dice_baseline"])))
    for (method, fraction, setting), frames in pooled.items():
        if frames:
            # One pair per case: average a case's Dice over the seeds that scored it.
            per_case = pd.concat(frames).groupby("case_id")[["dice", "dice_baseline"]].mean()
        else:
            per_case = pd.DataFrame(columns=["dice", "dice_baseline"], dtype=float)
        rows.append(dict(method=method, labeled_fraction=fraction, setting=setting, seed="all",
                         n_pairs=len(per_case),
                         median_difference=float((per_case["dice"] - per_case["dice_baseline"]).median())
                         if len(per_case) else math.nan,
                         p_value=wilcoxon_p(per_case["dice"], per_case["dice_baseline"])))
    return pd.DataFrame(rows, columns=["method", "labeled_fraction", "setting", "seed", "n_pairs",
                                       "median_difference", "p_value"])


def summary_table(runs: list[Run]) -> pd.DataFrame:
    """One row per (method, labeled fraction): seeds, mean and std over seeds, Wilcoxon p."""
    runs = evaluated_runs(runs)
    grouping = Grouping(runs)
    groups = {}
    for run in runs:
        groups.setdefault(grouping.group(run), []).append(run)
    tests = wilcoxon_table(runs)
    over_seeds = tests[tests["seed"] == "all"].set_index(["method", "labeled_fraction", "setting"])
    rows = []
    metrics_shown = table_metrics(runs)
    for key in sorted(groups, key=_group_order):
        method, fraction, setting = key
        members = groups[key]
        row = dict(method=method, labeled_fraction=fraction, setting=setting, n_seeds=len(members),
                   seeds=" ".join(str(run.seed) for run in members))
        for name in metrics_shown:
            values = np.array([np.nan if run.metrics.get(name) is None else run.metrics[name]
                               for run in members], dtype=float)
            values = values[~np.isnan(values)]
            row[f"{name}_mean"] = values.mean() if values.size else math.nan
            row[f"{name}_std"] = values.std(ddof=1) if values.size > 1 else math.nan
        row["n_distance_undefined"] = sum(int(run.metrics.get("n_distance_undefined") or 0)
                                          for run in members)
        row["n_pairs"] = over_seeds.loc[key, "n_pairs"] if key in over_seeds.index else math.nan
        row["p_wilcoxon"] = over_seeds.loc[key, "p_value"] if key in over_seeds.index else math.nan
        rows.append(row)
    table = pd.DataFrame(rows)
    table.attrs["metrics"] = metrics_shown
    units = {run.distance_unit() for run in runs}
    table.attrs["distance_unit"] = units.pop() if len(units) == 1 else "mixed units"
    return table


def _mean_std(mean, std, digits):
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _p_text(p):
    if p is None or (isinstance(p, float) and math.isnan(p)):
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}"


def display_rows(table: pd.DataFrame) -> tuple[list[str], list[list[str]]]:
    unit = table.attrs.get("distance_unit", "px")
    with_setting = bool(table["setting"].astype(bool).any()) if len(table) else False
    shown = table.attrs.get("metrics", TABLE_METRICS)
    head = ["Method"] + (["Setting"] if with_setting else []) + ["Labeled", "Seeds"] + [
        f"{header(name)} ({unit})" if name in DISTANCES else header(name) for name in shown
    ] + ["p (Dice vs supervised)"]
    body = []
    for _, row in table.iterrows():
        cells = [row["method"]] + ([row["setting"] or "–"] if with_setting else []) + [
            percent(row["labeled_fraction"]), str(row["n_seeds"])]
        for name in shown:
            cells.append(_mean_std(row[f"{name}_mean"], row[f"{name}_std"], 2 if name in DISTANCES else 3))
        cells.append(_p_text(row["p_wilcoxon"]))
        body.append(cells)
    return head, body


def to_markdown(table: pd.DataFrame) -> str:
    header, body = display_rows(table)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(["---"] * len(header)) + "|"]
    lines += ["| " + " | ".join(cells) + " |" for cells in body]
    return "\n".join(lines) + "\n"


def to_latex(table: pd.DataFrame) -> str:
    """A booktabs tabular (needs \\usepackage{booktabs} in the paper)."""
    header, body = display_rows(table)

    def escape(text):
        for char, replacement in (("\\", r"\textbackslash{}"), ("_", r"\_"), ("%", r"\%"),
                                  ("&", r"\&"), ("#", r"\#")):
            text = text.replace(char, replacement)
        return text.replace("±", r"$\pm$").replace("<", r"$<$").replace("–", "--")
    lines = [r"\begin{tabular}{ll" + "r" * (len(header) - 2) + "}", r"\toprule",
             " & ".join(escape(cell) for cell in header) + r" \\", r"\midrule"]
    lines += [" & ".join(escape(cell) for cell in cells) + r" \\" for cells in body]
    lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def write_tables(runs: list[Run], out_dir) -> dict:
    """Write comparison.{md,csv,tex} and wilcoxon.csv; returns {name: path}."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    runs = evaluated_runs(runs)
    table = summary_table(runs)
    paths = {"md": out_dir / "comparison.md", "csv": out_dir / "comparison.csv",
             "tex": out_dir / "comparison.tex", "wilcoxon": out_dir / "wilcoxon.csv"}
    atomic_write.write_text(paths["md"], to_markdown(table))
    atomic_write.write_text(paths["csv"], table.to_csv(index=False))
    atomic_write.write_text(paths["tex"], to_latex(table))
    atomic_write.write_text(paths["wilcoxon"], wilcoxon_table(runs).to_csv(index=False))
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    figures.add_output_args(parser, formats=False)
    args = parser.parse_args(argv)
    paths = write_tables(find_runs(args.run_dirs), args.out)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    sys.exit(run_cli(main))
