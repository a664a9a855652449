"""Where each method gains on the embedded data set: paired test Dice against supervised by
appearance family, and by how many labelled training images share a test case's rarest trait.

    python analysis/families.py bench/results/label_efficiency/runs --fraction 0.1 --out figs

The embedded 2D set draws every case from appearance families (a shape, a pattern, a skin, an
exposure and independent artefacts; docs/data.md), which its families.json records. For every
test case this script lists its traits and counts, per trait, the run's labelled images that
share it; the smallest count is the case's coverage. A method's run is paired, case by case, with
the supervised run of the same labelled fraction, seed and shared settings (as
analysis/compare.py pairs them). Writes FIGDIR/families.csv (one row per pair and case),
families.md (Dice difference per trait and per coverage band; with supervised runs on all labels
present, also their Dice on the same cases) and prints the Markdown. Runs on other data are an error.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/families.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from semiseg.runs import atomic_write  # noqa: E402
from analysis import figures  # noqa: E402
from analysis.compare import BASELINE, Grouping, evaluated_runs, paired_dice  # noqa: E402
from analysis.runs import Run, find_runs, percent, run_cli, summary  # noqa: E402
from semiseg.data import synthetic  # noqa: E402  (NumPy/SciPy only)

FACTORS = tuple(synthetic.FAMILY_SHARES)     # one value per case (shape, pattern...); artefacts are a list
# Coverage bands: labelled images sharing the case's rarest trait. With ~28 labelled images and
# shares of 10-27%, a trait has 0-1 examples in a poor subset and 5 or more in a generous one.
BANDS = ((0, 1, "0-1"), (2, 2, "2"), (3, 4, "3-4"), (5, None, "5+"))


def case_traits(families: dict) -> list[str]:
    """'shape=oval', ..., 'artefact=hair' for one case's entry of families.json."""
    return [f"{factor}={families[factor]}" for factor in FACTORS] + \
        [f"artefact={name}" for name in families.get("artefacts", [])]


def families_of(run: Run, cache: dict) -> dict:
    """case_id -> traits of the embedded set the run trained on (generated if the cache lacks it)."""
    from semiseg import config
    cfg = config.from_dict(run.config)
    if cfg.data.format != "synthetic" or cfg.data.synthetic_kind != "2d":
        raise ValueError(f"{run.path / 'config.yaml'}: data.format={cfg.data.format} "
                         f"(synthetic_kind={cfg.data.synthetic_kind}); appearance families exist only "
                         f"for the embedded 2D set (data.format=synthetic, synthetic_kind=2d)")
    root = synthetic.synthetic_root(cfg.data)
    if root not in cache:
        path = root / "families.json"
        cases = json.loads(path.read_text()).get("cases")
        if not isinstance(cases, dict):
            raise ValueError(f"{path}: no 'cases' mapping (written by a generator before v2?)")
        cache[root] = {case_id: case_traits(entry) for case_id, entry in cases.items()}
    return cache[root]


def labelled_ids(run: Run) -> list[str]:
    path = run.path / "splits.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: not found; the labelled subset is needed to count coverage")
    labelled = json.loads(path.read_text()).get("labeled")
    if not isinstance(labelled, list):
        raise ValueError(f"{path}: 'labeled' is not a list of case ids")
    return [str(case) for case in labelled]


def coverage(traits: list[str], counts: dict) -> int:
    """Labelled images sharing the case's rarest trait."""
    return min(counts.get(trait, 0) for trait in traits)


def band(count: int) -> str:
    for low, high, name in BANDS:
        if count >= low and (high is None or count <= high):
            return name
    raise ValueError(f"negative count {count}")


def pair_table(runs: list[Run], fraction: float) -> pd.DataFrame:
    """One row per (method run, test case) paired with its supervised run: method, setting, seed,
    case_id, dice, dice_baseline, coverage, traits ('|'-joined). Supervised runs appear as their own
    pairs (dice == dice_baseline), so the supervised Dice by trait comes from the same table."""
    grouping = Grouping(runs)
    baselines = {grouping.pairing(run): run for run in runs if run.method == BASELINE}
    cache, rows = {}, []
    for run in runs:
        if not np.isclose(run.labeled_fraction, fraction):
            continue
        base = baselines.get(grouping.pairing(run))
        if base is None:
            continue
        traits = families_of(run, cache)
        counts: dict = {}
        for case in labelled_ids(run):
            for trait in traits.get(case, []):
                counts[trait] = counts.get(trait, 0) + 1
        setting = grouping.group(run)[2]
        for pair in paired_dice(run, base).itertuples(index=False):
            if pair.case_id not in traits:
                raise ValueError(f"{run.path / 'per_case.csv'}: case {pair.case_id!r} is not in the "
                                 f"embedded set's families.json")
            rows.append({"method": run.method, "setting": setting, "seed": run.seed, "case_id": pair.case_id,
                         "dice": pair.dice, "dice_baseline": pair.dice_baseline,
                         "coverage": coverage(traits[pair.case_id], counts),
                         "traits": "|".join(traits[pair.case_id])})
    if not rows:
        found = ", ".join(sorted({percent(run.labeled_fraction) for run in runs}, key=lambda t: float(t[:-1])))
        raise ValueError(f"no run at {percent(fraction)} labels has a supervised run to pair with "
                         f"(labelled fractions found: {found}; choose one with --fraction)")
    return pd.DataFrame(rows)


def all_label_dice(runs: list[Run], pairs: pd.DataFrame) -> pd.Series:
    """Per test case, the mean Dice of the supervised runs on all labels that share the paired
    runs' settings (data, network, schedule); empty if there are none."""
    grouping = Grouping(runs)
    wanted = {grouping.pairing(run)[2] for run in runs
              if run.method == BASELINE and run.seed in set(pairs["seed"])}
    full = [run.per_case[["case_id", "dice"]] for run in runs
            if run.method == BASELINE and np.isclose(run.labeled_fraction, 1.0)
            and grouping.pairing(run)[2] in wanted and run.per_case is not None]
    return pd.concat(full).groupby("case_id")["dice"].mean() if full else pd.Series(dtype=float)


def column_labels(keys: list[tuple]) -> dict:
    """(method, setting) -> a short column name: the method, numbered where it has several settings
    (the legend under the tables names each one's settings)."""
    labels = {}
    for method in dict.fromkeys(method for method, _ in keys):
        settings = [setting for each, setting in keys if each == method]
        for number, setting in enumerate(settings, 1):
            labels[(method, setting)] = method if len(settings) == 1 else f"{method} [{number}]"
    return labels


def kept_groups(pairs: pd.DataFrame, min_seeds: int) -> list[tuple]:
    """(method, setting) of the method groups paired on at least `min_seeds` seeds, supervised aside."""
    seeds = pairs[pairs["method"] != BASELINE].groupby(["method", "setting"])["seed"].nunique()
    return [key for key, count in seeds.items() if count >= min_seeds]


def summaries(pairs: pd.DataFrame, full: pd.Series, keep: list[tuple],
              labels: dict) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(by trait, by coverage band): per row the test-case pairs, supervised's mean Dice (and the
    all-labels runs' where present) and the mean difference in Dice points of every method group in
    `keep` (kept_groups), in the column `labels` names."""
    base = pairs[pairs["method"] == BASELINE]
    if base["setting"].nunique() > 1:
        # One supervised column: runs of two networks or data sets would be averaged into it.
        raise ValueError("the supervised runs differ in " + " / ".join(sorted(setting or "(no such key)" for setting
                                                                                in set(base["setting"])))
                         + "; give the runs of one comparison (one data set, network and schedule)")
    base = base.drop_duplicates(["seed", "case_id"])
    long = pairs.assign(trait=pairs["traits"].str.split("|")).explode("trait")
    long_base = base.assign(trait=base["traits"].str.split("|")).explode("trait")

    def table(frame, frame_base, key, order):
        out = pd.DataFrame(index=pd.Index(order, name=key))
        out["pairs"] = frame_base.groupby(key).size()
        out["supervised"] = frame_base.groupby(key)["dice_baseline"].mean()
        if not full.empty:
            out["all labels"] = frame_base.assign(full=frame_base["case_id"].map(full)).groupby(key)["full"].mean()
        for method, setting in keep:
            member = frame[(frame["method"] == method) & (frame["setting"] == setting)]
            gain = 100 * (member["dice"] - member["dice_baseline"])
            out[labels[(method, setting)]] = gain.groupby(member[key]).mean()
        return out.dropna(subset=["pairs"])

    traits = sorted(set(long_base["trait"]), key=lambda t: (t.split("=")[0] not in FACTORS, t))
    by_trait = table(long, long_base, "trait", traits)
    bands = [name for _, _, name in BANDS]
    by_band = table(pairs.assign(band=pairs["coverage"].map(band)), base.assign(band=base["coverage"].map(band)),
                    "band", bands)
    return by_trait, by_band


def to_markdown(frame: pd.DataFrame, fraction: float, what: str) -> str:
    columns = list(frame.columns)
    lines = [f"Test Dice of supervised at {percent(fraction)} labels and each method's mean difference to it "
             f"(points, over the seeds it was paired on), {what}:", "",
             "| " + " | ".join([frame.index.name, *columns]) + " |",
             "|" + "---|" * (len(columns) + 1)]
    for name, row in frame.iterrows():
        cells = [str(name)]
        for column in columns:
            value = row[column]
            cells.append("–" if pd.isna(value) else f"{int(value)}" if column == "pairs"
                         else f"{value:.3f}" if column in ("supervised", "all labels") else f"{value:+.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(runs: list[Run], out_dir, fraction: float, min_seeds: int) -> dict:
    runs = evaluated_runs(runs)
    pairs = pair_table(runs, fraction)
    keep = kept_groups(pairs, min_seeds)
    labels = column_labels(keep)
    by_trait, by_band = summaries(pairs, all_label_dice(runs, pairs), keep, labels)
    spearman = {}
    for method, setting in keep:
        member = pairs[(pairs["method"] == method) & (pairs["setting"] == setting)]
        spearman[labels[(method, setting)]] = member["coverage"].corr(member["dice"] - member["dice_baseline"],
                                                                      method="spearman")
    text = (to_markdown(by_trait, fraction, "per trait (a case counts under each of its traits; pairs = "
                        "test cases x seeds)") + "\n" +
            to_markdown(by_band, fraction, "per coverage band (labelled images sharing the case's rarest trait)"))
    if spearman:
        text += "\nSpearman correlation of coverage with the difference: " + ", ".join(
            f"{name} {value:+.2f}" for name, value in spearman.items()) + "\n"
    legend = [f"- {labels[key]}: {key[1]}" for key in keep if labels[key] != key[0] or key[1]]
    if legend:
        text += "\nSettings of each column:\n\n" + "\n".join(legend) + "\n"
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"csv": out_dir / "families.csv", "md": out_dir / "families.md"}
    atomic_write.write_text(paths["csv"], pairs.to_csv(index=False))
    atomic_write.write_text(paths["md"], text)
    return paths


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    figures.add_output_args(parser, formats=False)
    parser.add_argument("--fraction", type=float, default=0.1, help="labelled fraction to analyse (default 0.1)")
    parser.add_argument("--min-seeds", type=int, default=3,
                        help="leave out method settings paired on fewer seeds (default 3)")
    args = parser.parse_args(argv)
    paths = write_tables(find_runs(args.run_dirs), args.out, args.fraction, args.min_seeds)
    print(paths["md"].read_text())
    return paths


if __name__ == "__main__":
    sys.exit(run_cli(main))
