"""Label-efficiency benchmark on the embedded data set: does each method help, and by how much?

    python bench/label_efficiency.py                      # tuning, then the table (hours on 2 cores)
    python bench/label_efficiency.py --stage tune         # only the tuning budget (seed 0, 10% labels)
    python bench/label_efficiency.py --seeds 1 --fractions 0.1 --methods supervised mean_teacher
    python bench/label_efficiency.py --quick --out /tmp/le  # tiny sizes: checks the harness in minutes

Every run is `main.py train --preset bench` (64x64 images, U-Net 16-256 of depth 4, batch 8 labelled
+ 8 unlabelled, 40 steps per epoch, cosine LR from 2e-3): the same network, batch, schedule and
budget for every method. A run stops when validation Dice has not improved for `train.patience`
(10) epochs, or at the 40-epoch cap (1600 steps); the table reports the steps each run used and
the test Dice of the best-on-validation network and of the last checkpoint (papers differ on which
they report). The test and validation cases are fixed (data.split_seed); the run seed draws the
labelled subset and the initialisation.

Methods are every registered method (semiseg.config.METHODS): supervised at 5/10/20/30/50/100%
labels (the label curve), the others at 10/30%, each with its paper's settings (the method's defaults
plus the `bench` preset's ramps). Tuning budget (Oliver et al. 2018): on validation, at 10% labels
and seed 0, each method tries its unlabelled-loss weight (MethodSpec.unsup_weight) at 3 factors of its default
(MethodSpec.tune_factors: 1/10, 1 and 10 unless the method says otherwise); the
best validation Dice wins, and the table has both a "paper" and a "tuned" row when they differ.
A method's tuning.json entry may also name `settings`, further keys chosen on validation at the same
10% / seed 0 (MixMatch: {"mixmatch.mix_labeled": false}); its 3 weights are then tried with them and
the tuned row carries them. Test data is never used to choose.

Resumable: a run whose files are in --results (`runs/<name>/metrics.json`) is reused, so the
benchmark can be run in parts and in later sessions, provided its config.yaml says it trained what
the plan asks for today (else the script stops and names the settings that differ: a default that
changed since must not pass under the old run's name); each finished run's small files (config,
history, metrics, per-case scores, the last checkpoint's scores) are copied there, the models are
left in --out. At the end --results holds summary.md (the table with paired differences and
Wilcoxon tests), comparison.{md,csv,tex}, wilcoxon.csv, label_efficiency.png and tuning.json.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:        # `python bench/label_efficiency.py` from a checkout
    sys.path.insert(0, str(REPO))

from semiseg import config  # noqa: E402  (no TensorFlow)

# Supervised also draws the curve of test Dice against the labelled share (5-100%): how much the labels
# alone buy, the room the SSL rows at 10% and 30% are measured in. Supervised runs are the cheap ones.
FRACTIONS = {"supervised": (0.05, 0.1, 0.2, 0.3, 0.5, 1.0)}
SSL_FRACTIONS = (0.1, 0.3)
TUNE_FRACTION, TUNE_SEED = 0.1, 0
# Tiny settings for --quick: the harness end to end in minutes, numbers meaningless.
QUICK = ["data.image_size=32", "data.synthetic_cases=60", "model.base_filters=4", "model.depth=2",
         "train.epochs=2", "train.steps_per_epoch=3", "train.patience=0", "mira_u.mim_epochs=1",
         "mira_u.embed_dim=16", "mira_u.depth=1", "mira_u.num_heads=2", "mira_u.student_base_channels=4",
         "mira_u.student_swin_depth=1", "mira_u.mc_samples=2", "mira_u.patch_size=8"]
KEPT_FILES = ("config.yaml", "history.csv", "metrics.json", "per_case.csv", "run_info.json", "export.json",
              "splits.json", "mim_history.csv", "eval/test_latest/metrics.json", "eval/test_latest/per_case.csv")


def fraction_tag(fraction: float) -> str:
    return f"{round(100 * fraction)}pct"


def setting_text(value) -> str:
    """A setting's value as run names and --set write it: false, 0.75, weak."""
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def run_name(method: str, fraction: float, seed: int, weight: tuple | None = None, settings: dict | None = None) -> str:
    """mean_teacher-10pct-seed0, then -field=value for a weight other than the paper's and for each
    further setting (tuning.json's `settings`), e.g. mixmatch-10pct-seed0-lambda_u=0.75-mix_labeled=false."""
    name = f"{method}-{fraction_tag(fraction)}-seed{seed}"
    pairs = ([weight] if weight is not None else []) + sorted((settings or {}).items())
    return name + "".join(f"-{key.split('.', 1)[1]}={setting_text(value)}" for key, value in pairs)


def set_list(settings: dict) -> list[str]:
    """{'mixmatch.mix_labeled': False} -> ['mixmatch.mix_labeled=false'] (--set's form)."""
    return [f"{key}={setting_text(value)}" for key, value in sorted(settings.items())]


def default_weight(method: str) -> tuple | None:
    """(dotted key, default value) of the method's unlabelled-loss weight; None for supervised."""
    key = config.METHODS[method].unsup_weight
    if not key:
        return None
    section, field = key.split(".")
    return key, float(getattr(getattr(config.Config(), section), field))


def run_overrides(fraction: float, seed: int, overrides: list[str]) -> list[str]:
    # float32 unless overridden (precision_dice.py): the stored runs are float32, and
    # train.precision's default (auto) would pick bfloat16 on some CPUs.
    return [f"seed={seed}", f"data.labeled_fraction={fraction}", "train.precision=float32", *overrides]


def differences(run: Path, method: str, fraction: float, seed: int, overrides: list[str]) -> dict:
    """{key: (value RUN trained with, value planned)} for every setting in which the run folder's
    config.yaml differs from what `main.py train --preset bench` with these overrides resolves to
    today (run-identity keys, other methods' sections and, for supervised, the unlabelled-only keys
    aside: the settings analysis/runs.run_settings compares runs by). A run is reused by name; this
    says when the name no longer means what it trained."""
    from analysis.runs import Run, load_run, run_settings
    resolved = config.resolve("bench", "", run_overrides(fraction, seed, overrides), method)
    planned = run_settings(Run(path=run, config=config.to_dict(resolved), history=None, metrics=None, per_case=None))
    saved = run_settings(load_run(run))
    return {key: (saved.get(key, "<unset>"), value) for key, value in planned.items()
            if repr(saved.get(key, "<unset>")) != repr(value)}


def check_reusable(run: Path, name: str, method: str, fraction: float, seed: int, overrides: list[str]) -> None:
    """Exit naming the keys where a run folder about to be reused (kept, or interrupted) trained
    otherwise than planned: a changed default or another --set must not pass for the planned run."""
    diffs = differences(run, method, fraction, seed, overrides)
    if diffs:
        text = ", ".join(f"{key}: {got!r} there, {want!r} planned" for key, (got, want) in sorted(diffs.items()))
        raise SystemExit(f"[bench] {name}: the run in {run} trained with other settings than planned ({text}); "
                         f"move or rename it to train the planned run, or give another --results/--out")


def train_run(results: Path, out: Path, name: str, method: str, fraction: float, seed: int,
              overrides: list[str], log=print) -> Path:
    """Train (unless --results already holds it), score the last checkpoint, keep the small files."""
    kept = results / "runs" / name
    if (kept / "metrics.json").exists():
        check_reusable(kept, name, method, fraction, seed, overrides)
        log(f"[bench] reuse {name}")
        return kept
    from semiseg import cli
    run = out / name
    if (run / "config.yaml").exists():      # an interrupted run: resume it (its checkpoints are exact)
        check_reusable(run, name, method, fraction, seed, overrides)
        code = cli.main(["train", "--out", str(run), "--resume", "--no-progress"])
    else:
        t0 = time.time()
        code = cli.main(["train", "--method", method, "--preset", "bench", "--out", str(run), "--no-progress",
                         "--set", *run_overrides(fraction, seed, overrides)])
        log(f"[bench] {name}: {time.time() - t0:.0f} s")
    if code != 0:
        raise SystemExit(f"[bench] {name} failed with exit code {code} (run folder {run})")
    if cli.main(["evaluate", str(run), "--checkpoint", "latest", "--no-progress"]) != 0:
        raise SystemExit(f"[bench] scoring the last checkpoint of {run} failed")
    partial = kept.with_name(kept.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for rel in KEPT_FILES:
        if (run / rel).exists():
            (partial / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(run / rel, partial / rel)
    partial.rename(kept)        # all of a run's files or none
    return kept


def best_val(run: Path) -> float:
    import pandas as pd
    return float(pd.read_csv(run / "history.csv")["val_dice"].max())


def tune(results: Path, out: Path, methods: list[str], overrides: list[str], log=print,
         previous: dict | None = None) -> dict:
    """The tuning budget: 3 weights per method at 10% labels, seed 0, chosen on validation Dice.
    A method whose entry in `previous` (tuning.json) has `settings` (further keys chosen on
    validation, e.g. {"mixmatch.mix_labeled": false}) tries its 3 weights with those settings; the
    entry's other notes are kept."""
    chosen = {}
    for method in methods:
        weight = default_weight(method)
        if weight is None:
            continue
        key, default = weight
        before = (previous or {}).get(method, {})
        settings = before.get("settings", {})
        scores = {}
        for factor in config.METHODS[method].tune_factors:
            value = float(f"{default * factor:.6g}")     # 0.1 * 0.1 is 0.010000000000000002
            name = run_name(method, TUNE_FRACTION, TUNE_SEED, None if factor == 1.0 else (key, value), settings)
            run = train_run(results, out, name, method, TUNE_FRACTION, TUNE_SEED,
                            overrides + [f"{key}={value:g}", *set_list(settings)], log)
            scores[value] = best_val(run)
        best = max(scores, key=lambda v: (scores[v], v == default))     # ties keep the paper's value
        chosen[method] = {**before, "key": key, "paper": default, "tuned": best,
                          "best_val_dice": {f"{v:g}": round(s, 4) for v, s in scores.items()}}
        log(f"[bench] tuned {key}: {best:g} (best validation Dice: "
            f"{', '.join(f'{v:g} -> {s:.4f}' for v, s in scores.items())})")
    return chosen


def plan(methods: list[str], fractions, seeds: int, tuning: dict) -> list[tuple]:
    """(name, method, fraction, seed, overrides) of every table run."""
    runs = []
    for seed in range(seeds):
        for method in methods:
            for fraction in FRACTIONS.get(method, SSL_FRACTIONS):
                if fractions and fraction not in fractions:
                    continue
                runs.append((run_name(method, fraction, seed), method, fraction, seed, []))
                t = tuning.get(method)
                settings = (t or {}).get("settings", {})
                if t and (t["tuned"] != t["paper"] or settings):
                    weight = (t["key"], t["tuned"]) if t["tuned"] != t["paper"] else None
                    runs.append((run_name(method, fraction, seed, weight, settings), method, fraction, seed,
                                 [f"{t['key']}={t['tuned']:g}", *set_list(settings)]))
    return runs


# ------------------------------------------------------------------ the table
def paired_rows(runs) -> list[dict]:
    """One row per (method, setting, fraction): test Dice of the best and the last checkpoint, steps,
    the paired difference to supervised per seed, and a Wilcoxon signed-rank test over every
    (seed, test case) pair. `runs` are analysis.runs.Run objects; the last checkpoint's scores are
    read from RUN/eval/test_latest/metrics.json."""
    import numpy as np
    import pandas as pd
    from analysis.compare import Grouping, paired_dice, wilcoxon_p
    grouping = Grouping(runs)
    baseline = {grouping.pairing(r): r for r in runs if r.method == "supervised"}
    groups: dict = {}
    for run in runs:
        groups.setdefault(grouping.group(run), []).append(run)

    def last_dice(run):
        path = run.path / "eval" / "test_latest" / "metrics.json"
        return json.loads(path.read_text())["dice"] if path.exists() else math.nan

    rows = []
    for (method, fraction, setting), members in groups.items():
        members = sorted(members, key=lambda r: r.seed)
        commits = sorted({code_version(r) for r in members})
        dice = np.array([r.metrics["dice"] for r in members])
        row = {"method": method, "setting": setting, "labeled_fraction": fraction, "seeds": [r.seed for r in members],
               "dice_mean": dice.mean(), "dice_std": dice.std(ddof=1) if len(dice) > 1 else math.nan,
               "last_dice_mean": float(np.mean([last_dice(r) for r in members])),
               "steps_mean": float(np.mean([r.history["step"].iloc[-1] for r in members])),
               "diff_points": [], "n_pairs": 0, "p_wilcoxon": math.nan, "commits": commits}
        if method != "supervised":
            pairs = []
            for run in members:
                base = baseline.get(grouping.pairing(run))
                if base is None:
                    continue
                row["diff_points"].append(round(100 * (run.metrics["dice"] - base.metrics["dice"]), 2))
                pairs.append(paired_dice(run, base))
            if pairs:
                pooled = pd.concat(pairs)          # seeds x cases: each (seed, case) is one pair
                row["n_pairs"] = len(pooled)
                row["p_wilcoxon"] = wilcoxon_p(pooled["dice"], pooled["dice_baseline"])
        rows.append(row)
    rows.sort(key=lambda r: (r["labeled_fraction"], r["method"] != "supervised", r["method"], r["setting"]))
    return rows


def code_version(run) -> str:
    """The commit a run was trained on (run_info.json's git record; '?' where none was recorded)."""
    path = run.path / "run_info.json"
    git = json.loads(path.read_text()).get("git") if path.exists() else None
    if not git or not git.get("commit"):
        return "?"
    return git["commit"][:7] + ("+dirty" if git.get("dirty") else "")


def summary_markdown(rows: list[dict]) -> str:
    lines = ["| Method | Setting | Labeled | Seeds | Test Dice, best val (mean ± std) | Test Dice, last | Steps |"
             " Δ vs supervised per seed (points) | mean Δ | p (Wilcoxon, seeds × cases) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        spread = "" if math.isnan(r["dice_std"]) else f" ± {r['dice_std']:.3f}"
        cells = [r["method"], r["setting"] or "–", f"{100 * r['labeled_fraction']:g}%", str(len(r["seeds"])),
                 f"{r['dice_mean']:.3f}{spread}", f"{r['last_dice_mean']:.3f}", f"{r['steps_mean']:.0f}"]
        diffs, p = r["diff_points"], r["p_wilcoxon"]
        if diffs:
            p_text = "–" if math.isnan(p) else ("<0.001" if p < 0.001 else f"{p:.3f}")
            cells += [" ".join(f"{d:+.1f}" for d in diffs), f"{sum(diffs) / len(diffs):+.1f}", f"{p_text} (n={r['n_pairs']})"]
        else:
            cells += ["–", "–", "–"]
        lines.append("| " + " | ".join(cells) + " |")
    text = "\n".join(lines) + "\n"
    if len({c for r in rows for c in r["commits"]}) > 1:
        # Retraining one seed on other code (same equations, other round-off) lands elsewhere: the
        # reader must see which rows were trained on which code before reading a paired difference.
        text += "\nCode versions (commits the runs of each row were trained on):\n\n" + "".join(
            f"- {r['method']} {r['setting'] or ''} {100 * r['labeled_fraction']:g}%: {', '.join(r['commits'])}\n"
            .replace("  ", " ") for r in rows)
    return text


def figure_runs(runs, tuning: dict) -> list:
    """The runs the plot draws: one line per method, so one setting per method - its tuned weight
    and settings (tuning.json) and today's default for every other setting its runs differ in (the
    tuning runs' other weights and superseded settings stay in the table, where each is its own row)."""
    from analysis.runs import run_settings
    defaults = config.Config()
    settings = {id(run): run_settings(run) for run in runs}       # once per run, not once per pair
    kept = []
    for run in runs:
        t = tuning.get(run.method)
        if t and run.config_value(t["key"]) is not None and float(run.config_value(t["key"])) != float(t["tuned"]):
            continue
        peers = [settings[id(r)] for r in runs if r.method == run.method]
        varying = {k for s in peers for k in s if len({repr(p.get(k)) for p in peers}) > 1}
        varying -= {"seed", "data.labeled_fraction", t["key"] if t else ""}
        current = True
        chosen = (t or {}).get("settings", {})
        for key in varying:
            section, _, field = key.partition(".")
            default = getattr(getattr(defaults, section, None), field, None) if field else None
            default = chosen.get(key, default)      # a setting the tuning chose beats the default
            if default is not None and settings[id(run)].get(key) != default:
                current = False
        if current:
            kept.append(run)
    return kept


def summarize(results: Path) -> str:
    from analysis import compare, figures
    from analysis.label_efficiency import label_efficiency_figure
    from analysis.runs import find_runs
    runs = [r for r in find_runs([results / "runs"]) if r.metrics is not None]
    compare.write_tables(runs, results)
    tuning_path = results / "tuning.json"
    tuning = json.loads(tuning_path.read_text()) if tuning_path.exists() else {}
    figure = label_efficiency_figure(figure_runs(runs, tuning), "dice", band="std")
    figures.save_figure(figure, results, "label_efficiency", ("png",))
    figures.close(figure)
    text = summary_markdown(paired_rows(runs))
    from semiseg.runs import atomic_write
    atomic_write.write_text(results / "summary.md", text)
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/bench_label_efficiency", help="run folders (models included)")
    parser.add_argument("--results", default=str(REPO / "bench" / "results" / "label_efficiency"),
                        help="the kept files of every run and the tables (committed; reused on the next call)")
    parser.add_argument("--stage", choices=("all", "tune", "table", "summary"), default="all",
                        help="tune: the tuning budget only; table: the table's runs (tuned values from "
                             "tuning.json); summary: tables from the runs already kept")
    parser.add_argument("--seeds", type=int, default=3, help="run seeds 0..N-1")
    parser.add_argument("--methods", nargs="*", default=list(config.METHODS), choices=list(config.METHODS),
                        help="default: every registered method")
    parser.add_argument("--fractions", nargs="*", type=float, default=None,
                        help="subset of the planned fractions (supervised: 0.05 0.1 0.2 0.3 0.5 1.0; the others: 0.1 0.3)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes and 1 seed: a check of the harness")
    config.add_set_argument(parser, help="extra overrides for every run; runs are named without them, so "
                                         "give another --results folder for another setting")
    args = parser.parse_args(argv)
    results, out = Path(args.results), Path(args.out)
    seeds = 1 if args.quick else args.seeds
    overrides = (QUICK if args.quick else []) + args.set
    results.mkdir(parents=True, exist_ok=True)
    tuning_path = results / "tuning.json"
    tuning = json.loads(tuning_path.read_text()) if tuning_path.exists() else {}
    if args.stage in ("all", "tune"):
        tuning.update(tune(results, out, args.methods, overrides, previous=tuning))
        from semiseg.runs import atomic_write
        atomic_write.write_text(tuning_path, json.dumps(tuning, indent=1))
    if args.stage in ("all", "table"):
        for name, method, fraction, seed, extra in plan(args.methods, args.fractions, seeds, tuning):
            train_run(results, out, name, method, fraction, seed, overrides + extra)
    text = summarize(results)
    print(text)
    print(f"[bench] tables and plot in {results}")
    return 0


if __name__ == "__main__":
    code = main()
    # Dozens of trainings ran in this process, and the tf.data iterators they leave behind can deadlock
    # in their C++ destructors when the interpreter finalises (seen once after 24 runs: the summary was
    # printed, then 10 minutes in a tf.data thread pool's destructor at 1.5 CPUs). Every file is
    # written by now, so finalisation is skipped, as the test suite does (tests/conftest.py).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
