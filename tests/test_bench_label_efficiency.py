"""bench/label_efficiency.py: run names, the plan (every registered method, paper and tuned rows), and
the table's values - paired differences per seed and the Wilcoxon test over seeds x cases - on a
fixed toy input of hand-written run folders.

    python -m pytest tests/test_bench_label_efficiency.py -q
"""
import json
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import label_efficiency as bench  # noqa: E402

from analysis.runs import find_runs  # noqa: E402
from semiseg import config  # noqa: E402

CASES = [f"c{i}" for i in range(6)]


def toy_run(root: Path, name: str, method: str, fraction: float, seed: int, dice: list, last: float, steps: int,
            consistency: float | None = None) -> None:
    run = root / name
    (run / "eval" / "test_latest").mkdir(parents=True)
    cfg = {"method": method, "seed": seed, "data": {"labeled_fraction": fraction, "image_size": 64},
           "model": {"base_filters": 16}}
    if consistency is not None:
        cfg["mean_teacher"] = {"consistency": consistency}
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    pd.DataFrame({"epoch": [1, 2], "step": [steps // 2, steps], "val_dice": [0.5, 0.6]}).to_csv(run / "history.csv", index=False)
    pd.DataFrame({"case_id": CASES, "dice": dice}).to_csv(run / "per_case.csv", index=False)
    (run / "metrics.json").write_text(json.dumps({"dice": float(np.mean(dice))}))
    (run / "eval" / "test_latest" / "metrics.json").write_text(json.dumps({"dice": last}))


@pytest.fixture
def toy(tmp_path):
    sup = {0: [0.5, 0.6, 0.7, 0.4, 0.5, 0.6], 1: [0.55, 0.6, 0.65, 0.45, 0.5, 0.55]}
    for seed, dice in sup.items():
        toy_run(tmp_path, f"sup-{seed}", "supervised", 0.1, seed, dice, last=0.5, steps=800)
    # Mean Teacher with the paper's weight: +0.1 on every case of seed 0, +0.02..0.07 on seed 1.
    mt = {0: [d + 0.1 for d in sup[0]], 1: [d + 0.01 * (i + 2) for i, d in enumerate(sup[1])]}
    for seed, dice in mt.items():
        toy_run(tmp_path, f"mt-{seed}", "mean_teacher", 0.1, seed, dice, last=0.6, steps=1200 + 400 * seed,
                consistency=0.1)
    # A tuned weight: a separate row, paired with the same supervised runs.
    toy_run(tmp_path, "mt-tuned-0", "mean_teacher", 0.1, 0, [d - 0.05 for d in sup[0]], last=0.4, steps=400,
            consistency=1.0)
    return tmp_path, sup, mt


def test_table_pairs_by_seed_and_tests_over_seeds_times_cases(toy):
    root, sup, mt = toy
    rows = bench.paired_rows(find_runs([root]))
    assert [(r["method"], r["setting"], r["seeds"]) for r in rows] == [
        ("supervised", "", [0, 1]), ("mean_teacher", "mean_teacher.consistency=0.1", [0, 1]),
        ("mean_teacher", "mean_teacher.consistency=1.0", [0])]
    base, paper, tuned = rows
    assert base["dice_mean"] == pytest.approx(np.mean([np.mean(sup[0]), np.mean(sup[1])]))
    assert base["dice_std"] == pytest.approx(np.std([np.mean(sup[0]), np.mean(sup[1])], ddof=1))
    assert base["last_dice_mean"] == 0.5 and base["steps_mean"] == 800 and np.isnan(base["p_wilcoxon"])
    # Paired differences per seed, in Dice points.
    assert paper["diff_points"] == [10.0, pytest.approx(100 * np.mean([0.01 * (i + 2) for i in range(6)]))]
    assert paper["steps_mean"] == 1400 and paper["last_dice_mean"] == 0.6
    # Wilcoxon over the 12 (seed, case) pairs, not over 6 case means.
    expected = stats.wilcoxon(mt[0] + mt[1], sup[0] + sup[1]).pvalue
    assert paper["n_pairs"] == 12 and paper["p_wilcoxon"] == pytest.approx(expected)
    assert tuned["diff_points"] == [-5.0] and tuned["n_pairs"] == 6
    text = bench.summary_markdown(rows)
    assert "| mean_teacher | mean_teacher.consistency=0.1 | 10% | 2 |" in text
    assert "| +10.0 +4.5 | +7.2 |" in text and "(n=12)" in text
    assert "| supervised | – | 10% | 2 | 0.550 ± 0.000 | 0.500 | 800 | – | – | – |" in text


def test_rows_trained_on_different_code_are_named(toy):
    root, _, _ = toy
    rows = bench.paired_rows(find_runs([root]))
    assert all(r["commits"] == ["?"] for r in rows)          # no run_info.json: nothing recorded
    assert "Code versions" not in bench.summary_markdown(rows)   # one version: no footnote
    for name, commit, dirty in (("sup-0", "a" * 40, False), ("sup-1", "b" * 40, True), ("mt-0", "a" * 40, False),
                                ("mt-1", "a" * 40, False), ("mt-tuned-0", "a" * 40, False)):
        (root / name / "run_info.json").write_text(json.dumps({"git": {"commit": commit, "dirty": dirty}}))
    rows = bench.paired_rows(find_runs([root]))
    assert [r["commits"] for r in rows] == [["aaaaaaa", "bbbbbbb+dirty"], ["aaaaaaa"], ["aaaaaaa"]]
    text = bench.summary_markdown(rows)
    assert "- supervised 10%: aaaaaaa, bbbbbbb+dirty\n" in text
    assert "- mean_teacher mean_teacher.consistency=0.1 10%: aaaaaaa\n" in text


def test_plan_covers_every_registered_method_with_paper_and_tuned_rows():
    tuning = {"mean_teacher": {"key": "mean_teacher.consistency", "paper": 0.1, "tuned": 1.0},
              "mixmatch": {"key": "mixmatch.lambda_u", "paper": 75.0, "tuned": 75.0}}
    runs = bench.plan(list(config.METHODS), None, 2, tuning)
    names = [r[0] for r in runs]
    assert len(names) == len(set(names))
    for method in config.METHODS:
        fractions = (0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if method == "supervised" else (0.1, 0.3)
        for seed in (0, 1):
            for fraction in fractions:
                assert bench.run_name(method, fraction, seed) in names
    assert "mean_teacher-10pct-seed1-consistency=1" in names           # tuned differs: its own rows
    assert not any(n.startswith("mixmatch") and "lambda_u" in n for n in names)   # tuned = paper: none
    assert ("mean_teacher-30pct-seed0-consistency=1", "mean_teacher", 0.3, 0, ["mean_teacher.consistency=1"]) in runs


def test_plan_carries_the_settings_the_tuning_chose_into_the_tuned_rows():
    tuning = {"mixmatch": {"key": "mixmatch.lambda_u", "paper": 75.0, "tuned": 0.75,
                           "settings": {"mixmatch.mix_labeled": False}}}
    runs = bench.plan(["supervised", "mixmatch"], [0.1], 1, tuning)
    assert ("mixmatch-10pct-seed0", "mixmatch", 0.1, 0, []) in runs                 # the paper row: no settings
    assert ("mixmatch-10pct-seed0-lambda_u=0.75-mix_labeled=false", "mixmatch", 0.1, 0,
            ["mixmatch.lambda_u=0.75", "mixmatch.mix_labeled=false"]) in runs
    tuning["mixmatch"]["tuned"] = 75.0          # the paper's weight won, the setting still differs: a row
    names = [r[0] for r in bench.plan(["mixmatch"], [0.1], 1, tuning)]
    assert names == ["mixmatch-10pct-seed0", "mixmatch-10pct-seed0-mix_labeled=false"]


def _saved_run(root: Path, method: str, sets: list[str], drop: tuple = ()) -> Path:
    """A run folder whose config.yaml is what `train --preset bench` wrote with these --set values
    (`drop`: section.key entries removed, as a run saved before the key existed lacks them)."""
    run = root / "run"
    run.mkdir(parents=True)
    mapping = config.to_dict(config.resolve("bench", "", sets, method))
    for dotted in drop:
        section, key = dotted.split(".")
        del mapping[section][key]
    (run / "config.yaml").write_text(yaml.safe_dump(mapping))
    return run


def test_a_kept_run_is_reused_only_if_it_trained_what_is_planned(tmp_path):
    sets = bench.run_overrides(0.1, 0, ["mixmatch.lambda_u=0.75"])
    run = _saved_run(tmp_path / "a", "mixmatch", sets)
    assert bench.differences(run, "mixmatch", 0.1, 0, ["mixmatch.lambda_u=0.75"]) == {}
    assert bench.differences(run, "mixmatch", 0.1, 1, ["mixmatch.lambda_u=0.75"]) == {}    # the seed names the run
    assert bench.differences(run, "mixmatch", 0.1, 0, ["mixmatch.lambda_u=7.5"]) == {"mixmatch.lambda_u": (0.75, 7.5)}
    with pytest.raises(SystemExit, match=r"mixmatch.mix_labeled: True there, False planned"):
        bench.check_reusable(run, "x", "mixmatch", 0.1, 0, ["mixmatch.lambda_u=0.75", "mixmatch.mix_labeled=false"])
    # A run saved before mix_labeled existed trained with mixing (config.KEYS_ADDED_LATER), not "unknown".
    old = _saved_run(tmp_path / "b", "mixmatch", sets, drop=("mixmatch.mix_labeled",))
    assert bench.differences(old, "mixmatch", 0.1, 0, ["mixmatch.lambda_u=0.75"]) == {}
    # A default that changed since the run trained (here: its photometric views) is a difference.
    photometric = _saved_run(tmp_path / "c", "mixmatch", sets + ["mixmatch.photometric_views=true"])
    assert bench.differences(photometric, "mixmatch", 0.1, 0, ["mixmatch.lambda_u=0.75"]) == {
        "mixmatch.photometric_views": (True, False)}
    # Supervised reads no unlabelled images: the unlabelled-only keys do not split it.
    sup = _saved_run(tmp_path / "d", "supervised", bench.run_overrides(0.1, 0, ["train.labeled_forward=joint"]))
    assert bench.differences(sup, "supervised", 0.1, 0, []) == {}


def test_every_kept_run_the_plan_reuses_trained_what_the_plan_asks():
    """The committed bench/results/label_efficiency: `python bench/label_efficiency.py` reuses each
    kept run by name, so each one whose name the plan (and the tuning budget) asks for must have
    trained those settings on today's defaults."""
    results = REPO / "bench" / "results" / "label_efficiency"
    tuning = json.loads((results / "tuning.json").read_text())
    planned = bench.plan(list(config.METHODS), None, 4, tuning)
    for method, t in tuning.items():
        default = bench.default_weight(method)[1]
        for factor in config.METHODS[method].tune_factors:
            value = float(f"{default * factor:.6g}")
            weight = None if factor == 1.0 else (t["key"], value)
            planned.append((bench.run_name(method, 0.1, 0, weight, t.get("settings", {})), method, 0.1, 0,
                            [f"{t['key']}={value:g}", *bench.set_list(t.get("settings", {}))]))
    reused = 0
    for name, method, fraction, seed, extra in planned:
        if (results / "runs" / name / "metrics.json").exists():
            reused += 1
            assert bench.differences(results / "runs" / name, method, fraction, seed, extra) == {}, name
    assert reused >= 40


def test_every_ssl_method_names_the_weight_it_is_tuned_on():
    for name, info in config.METHODS.items():
        if name == "supervised":
            assert bench.default_weight(name) is None
            continue
        key, value = bench.default_weight(name)
        section, field = key.split(".")
        assert section == name and value == getattr(getattr(config.Config(), section), field) > 0


def test_bench_tuned_preset_holds_the_committed_tuning_choice():
    """The `bench_tuned` preset is what the kept tuning budget chose (bench/results/label_efficiency/
    tuning.json), for every method it tuned: a new tuning round must move the preset with it."""
    tuning = json.loads((REPO / "bench" / "results" / "label_efficiency" / "tuning.json").read_text())
    assert tuning
    for method, choice in tuning.items():
        section, key = choice["key"].split(".")
        cfg = config.resolve("bench_tuned", "", [], method)
        assert getattr(getattr(cfg, section), key) == pytest.approx(choice["tuned"]), method
        for dotted, value in choice.get("settings", {}).items():
            assert config.get(cfg, dotted) == value, dotted


@pytest.mark.slow   # five tiny trainings in a subprocess (a minute or more on 2 cores)
def test_quick_mode_end_to_end_tunes_trains_pairs_and_reuses(tmp_path):
    """`--quick` through the real CLI: Mean Teacher's tuning budget (3 weights), the table's runs,
    summary.md whose paired difference and Wilcoxon p are the per-case files' own, and a second call
    that trains nothing (every run reused from --results)."""
    import os
    import re
    import subprocess
    results, out = tmp_path / "results", tmp_path / "out"
    command = [sys.executable, str(REPO / "bench" / "label_efficiency.py"), "--quick", "--methods", "supervised",
               "mean_teacher", "--fractions", "0.1", "--results", str(results), "--out", str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    first = subprocess.run(command, capture_output=True, text=True, timeout=1200, env=env)
    assert first.returncode == 0, first.stderr[-3000:]
    tuning = json.loads((results / "tuning.json").read_text())["mean_teacher"]
    assert tuning["key"] == "mean_teacher.consistency" and len(tuning["best_val_dice"]) == 3
    assert tuning["tuned"] in [float(v) for v in tuning["best_val_dice"]]
    kept = sorted(p.name for p in (results / "runs").iterdir())
    assert "supervised-10pct-seed0" in kept and "mean_teacher-10pct-seed0" in kept and len(kept) == 4
    for name in kept:
        assert (results / "runs" / name / "eval" / "test_latest" / "metrics.json").is_file(), name
    # The table's Mean Teacher row at the paper's weight, recomputed from the kept per-case files.
    sup = pd.read_csv(results / "runs" / "supervised-10pct-seed0" / "per_case.csv")
    mt = pd.read_csv(results / "runs" / "mean_teacher-10pct-seed0" / "per_case.csv")
    pairs = mt.merge(sup, on="case_id", suffixes=("", "_sup"))
    diff = 100 * (pairs["dice"].mean() - pairs["dice_sup"].mean())
    row = next(line for line in (results / "summary.md").read_text().splitlines()
               if line.startswith("| mean_teacher | mean_teacher.consistency=0.1 |"))
    assert f"| {diff:+.1f} | {diff:+.1f} |" in row and f"(n={len(pairs)})" in row
    # A second call finds every run in --results: nothing is trained again.
    second = subprocess.run(command + ["--stage", "table"], capture_output=True, text=True, timeout=600, env=env)
    assert second.returncode == 0, second.stderr[-3000:]
    table_runs = 3 if tuning["tuned"] != tuning["paper"] else 2     # supervised, paper row, tuned row
    assert second.stdout.count("[bench] reuse") == table_runs
    assert not re.search(r"\[bench\] \S+: \d+ s", second.stdout)    # the line a trained run prints


def test_the_plot_draws_each_method_at_its_tuned_weight_only(toy):
    root, _, _ = toy
    runs = find_runs([root])
    tuning = {"mean_teacher": {"key": "mean_teacher.consistency", "paper": 0.1, "tuned": 1.0}}
    assert sorted(r.name for r in bench.figure_runs(runs, tuning)) == ["mt-tuned-0", "sup-0", "sup-1"]
    tuning["mean_teacher"]["tuned"] = 0.1
    assert sorted(r.name for r in bench.figure_runs(runs, tuning)) == ["mt-0", "mt-1", "sup-0", "sup-1"]


def test_the_plot_draws_a_method_at_the_settings_its_tuning_chose(toy):
    """A setting in tuning.json's `settings` (mean_teacher.student_view here) picks the plotted runs
    as the tuned weight does; without it the default (noise) is drawn."""
    root, sup, _ = toy
    for name, view in (("mt-view-0", "strong"), ("mt-noise-0", "noise")):
        toy_run(root, name, "mean_teacher", 0.1, 0, sup[0], last=0.5, steps=800, consistency=1.0)
        saved = yaml.safe_load((root / name / "config.yaml").read_text())
        saved["mean_teacher"]["student_view"] = view
        (root / name / "config.yaml").write_text(yaml.safe_dump(saved))
    runs = [r for r in find_runs([root]) if r.name != "mt-tuned-0"]
    tuning = {"mean_teacher": {"key": "mean_teacher.consistency", "paper": 0.1, "tuned": 1.0}}
    assert sorted(r.name for r in bench.figure_runs(runs, tuning)) == ["mt-noise-0", "sup-0", "sup-1"]
    tuning["mean_teacher"]["settings"] = {"mean_teacher.student_view": "strong"}
    assert sorted(r.name for r in bench.figure_runs(runs, tuning)) == ["mt-view-0", "sup-0", "sup-1"]
