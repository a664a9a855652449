"""Tests of the analysis scripts on fake run folders that follow the trainer's run-folder contract.

    python -m pytest tests/test_analysis.py -q
"""
import argparse
import json
import runpy
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from scipy import stats

from semiseg.evaluation import metrics
from analysis import collect, compare, curves, figures, label_efficiency, overlays, report
from analysis.runs import find_runs, load_run, run_cli, unique_names
from analysis.runs import main as runs_main

REPO = Path(__file__).resolve().parent.parent
CASE_IDS = [f"case_{index:03d}" for index in range(8)]
EXTRA_COLUMNS = {"supervised": [], "mean_teacher": ["loss_unsup", "val_dice_student", "rampup"],
                 "mira_u": ["loss_unsup", "loss_ent", "pseudo_dice", "rampup", "val_dice_teacher"]}
# How far the fake prediction's centre strays (pixels): SSL methods stray less.
METHOD_ERROR = {"supervised": 3.0, "mean_teacher": 2.0, "mira_u": 1.5}


def fake_case(case_index, method, fraction, seed, size=32):
    """A disc and a probability map for a shifted, resized disc: Dice falls with the error."""
    rng = np.random.default_rng([case_index, seed, int(fraction * 100), len(method)])
    case_rng = np.random.default_rng(case_index)  # the case itself does not depend on the run
    yy, xx = np.mgrid[:size, :size]
    centre = case_rng.uniform(11, 21, size=2)
    radius = case_rng.uniform(5, 8)
    truth = (np.hypot(yy - centre[0], xx - centre[1]) <= radius).astype(np.uint8)
    error = METHOD_ERROR[method] * (1.2 - fraction) * (1 + case_index / 8) + rng.uniform(0, 0.5)
    shifted = centre + error * np.array([np.cos(case_index), np.sin(case_index)])
    distance = np.hypot(yy - shifted[0], xx - shifted[1])
    prob = 1 / (1 + np.exp(distance - radius * (1 - 0.03 * error)))
    image = np.clip(0.3 + 0.5 * truth + case_rng.normal(0, 0.05, (size, size)), 0, 1)
    return image[..., None].astype(np.float32), truth, prob.astype(np.float32)


def write_fake_run(run_dir, method, fraction, seed, epochs=6, previews=True):
    run_dir = Path(run_dir)
    (run_dir / "previews" / "test").mkdir(parents=True)
    config = {"method": method, "seed": seed, "preset": "smoke",
              "data": {"format": "synthetic", "labeled_fraction": fraction, "image_size": 32},
              "model": {"base_filters": 8}, "train": {"epochs": epochs, "lr": 1e-3}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    epoch = np.arange(1, epochs + 1)
    history = {"epoch": epoch, "step": epoch * 10, "lr": 1e-3 * 0.5 ** (epoch - 1),
               "loss": 1.0 / epoch + 0.1 * seed, "loss_sup": 0.8 / epoch}
    for column in EXTRA_COLUMNS[method]:
        history[column] = (np.minimum(1.0, epoch / 4) if column == "rampup"
                           else 0.5 + 0.4 * (1 - 1 / epoch) if "dice" in column else 0.2 / epoch)
    history["val_dice"] = 1 - 0.5 / epoch - 0.1 * seed
    history["time_s"] = epoch * 2.0
    pd.DataFrame(history).to_csv(run_dir / "history.csv", index=False)
    rows = []
    for index, case_id in enumerate(CASE_IDS):
        image, truth, prob = fake_case(index, method, fraction, seed)
        rows.append(dict(case_id=case_id, **metrics.case_metrics(prob >= 0.5, truth)))
        if previews:
            arrays = dict(image=image, label=truth, prob=prob)
            if method == "mira_u":
                arrays["uncertainty"] = 4 * prob * (1 - prob)
            np.savez(run_dir / "previews" / "test" / f"{case_id}.npz", **arrays)
    metrics.write_per_case_csv(run_dir / "per_case.csv", rows)
    payload = dict(metrics.aggregate(rows), split="test", model="student", distance_unit="px")
    metrics.write_metrics_json(run_dir / "metrics.json", payload)
    (run_dir / "run_info.json").write_text(json.dumps({"command": "main.py train"}))
    return run_dir


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    for method in METHOD_ERROR:
        for fraction in (0.1, 0.3):
            for seed in (0, 1):
                write_fake_run(root / method / f"lf{int(fraction * 100)}" / f"seed{seed}",
                               method, fraction, seed)
    return root


def test_find_runs_reads_every_run_folder_of_a_sweep(sweep):
    runs = find_runs([sweep])
    assert len(runs) == 12
    run = next(r for r in runs if r.method == "mean_teacher" and r.labeled_fraction == 0.3
               and r.seed == 1)
    assert run.label == "mean_teacher, 30% labeled, seed 1"
    assert list(run.per_case["case_id"]) == CASE_IDS
    assert "val_dice_student" in run.history.columns
    assert run.metrics["n_cases"] == 8 and run.distance_unit() == "px"
    assert len(set(unique_names(runs))) == 12
    assert unique_names(runs)[0].endswith("lf10_seed0")


def test_run_folder_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.yaml"):
        load_run(tmp_path)
    with pytest.raises(FileNotFoundError, match="no run folder"):
        find_runs([tmp_path])
    (tmp_path / "config.yaml").write_text("- just a list\n")
    with pytest.raises(ValueError, match="config.yaml.*mapping"):
        load_run(tmp_path)
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    (tmp_path / "per_case.csv").write_text("case,score\na,1\n")
    with pytest.raises(ValueError, match="per_case.csv.*case_id"):
        load_run(tmp_path)
    (tmp_path / "per_case.csv").unlink()
    with pytest.raises(KeyError, match="config.yaml.*'method'"):
        load_run(tmp_path).method


def test_curves_overlay_runs_with_a_panel_per_logged_quantity(sweep, tmp_path):
    runs = find_runs([sweep / "supervised" / "lf10", sweep / "mean_teacher" / "lf10"])
    figure = curves.curves_figure(runs)
    titles = [axis.get_title() for axis in figure.axes if axis.get_visible()]
    assert titles[:3] == ["Total loss", "Supervised loss", "Unlabelled loss (unweighted)"]
    assert {"Validation Dice (exported network)", "Validation Dice (student)", "Learning rate",
            "Ramp-up factor"} <= set(titles)
    dice_axis = figure.axes[titles.index("Validation Dice (exported network)")]
    assert len(dice_axis.lines) == 4  # every run overlaid
    np.testing.assert_allclose(dice_axis.lines[0].get_ydata(), runs[0].history["val_dice"])
    assert dice_axis.get_xlabel() == "Epoch" and dice_axis.get_ylabel() == "Dice"
    assert figure.axes[titles.index("Learning rate")].get_yscale() == "log"  # lr spans 32x
    # Every column a method writes has a named panel (none falls back to its raw column name).
    mira = curves.curves_figure(find_runs([sweep / "mira_u" / "lf10"]))
    mira_titles = {axis.get_title() for axis in mira.axes if axis.get_visible()}
    assert not mira_titles & set(EXTRA_COLUMNS["mira_u"]), mira_titles
    assert {"Pseudo-target Dice vs hidden truth", "Validation Dice (teacher)"} <= mira_titles
    paths = curves.main([str(sweep / "mira_u" / "lf10" / "seed0"), "--out", str(tmp_path)])
    assert [p.name for p in paths] == ["curves.png"] and paths[0].stat().st_size > 1000


def test_compare_table_means_over_seeds_and_pairs_by_case(sweep, tmp_path):
    runs = find_runs([sweep])
    table = compare.summary_table(runs)
    assert list(zip(table["method"], table["labeled_fraction"]))[:3] == [
        ("supervised", 0.1), ("mean_teacher", 0.1), ("mira_u", 0.1)]
    row = table[(table["method"] == "mira_u") & (table["labeled_fraction"] == 0.3)].iloc[0]
    seeds = [json.loads((sweep / "mira_u" / "lf30" / f"seed{s}" / "metrics.json").read_text())
             for s in (0, 1)]
    assert row["n_seeds"] == 2
    assert row["dice_mean"] == pytest.approx(np.mean([s["dice"] for s in seeds]))
    assert row["dice_std"] == pytest.approx(np.std([s["dice"] for s in seeds], ddof=1))
    assert row["n_pairs"] == 8  # the same 8 test cases in both seeds count once
    # The pooled p-value is the test on per-case Dice averaged over the two seeds.
    def dice(method, seed):
        return pd.read_csv(sweep / method / "lf30" / f"seed{seed}" / "per_case.csv")["dice"]
    ssl = (dice("mira_u", 0) + dice("mira_u", 1)) / 2
    sup = (dice("supervised", 0) + dice("supervised", 1)) / 2
    assert row["p_wilcoxon"] == pytest.approx(stats.wilcoxon(ssl, sup).pvalue)
    assert row["p_wilcoxon"] < 0.05  # the fake SSL runs are better on every case
    assert np.isnan(table[table["method"] == "supervised"]["p_wilcoxon"]).all()
    paths = compare.main([str(sweep), "--out", str(tmp_path)])
    markdown = paths["md"].read_text()
    assert "| mira_u | 30% | 2 |" in markdown and "±" in markdown and "HD95 (px)" in markdown
    latex = paths["tex"].read_text()
    assert r"\toprule" in latex and r"$\pm$" in latex and r"mean\_teacher" in latex
    assert pd.read_csv(paths["csv"]).shape[0] == 6
    tests = pd.read_csv(paths["wilcoxon"])
    assert set(tests["seed"].astype(str)) == {"0", "1", "all"} and len(tests) == 12


def test_wilcoxon_pairs_by_case_id_not_by_row_order(tmp_path):
    sup = write_fake_run(tmp_path / "sup", "supervised", 0.1, 0)
    ssl = write_fake_run(tmp_path / "ssl", "mean_teacher", 0.1, 0)
    shuffled = pd.read_csv(ssl / "per_case.csv").iloc[::-1].iloc[1:]  # reversed, one case fewer
    shuffled.to_csv(ssl / "per_case.csv", index=False)
    pairs = compare.paired_dice(load_run(ssl), load_run(sup))
    assert len(pairs) == 7
    truth = pd.read_csv(sup / "per_case.csv").set_index("case_id")["dice"]
    np.testing.assert_allclose(pairs["dice_baseline"], truth.loc[pairs["case_id"]].to_numpy())
    assert compare.wilcoxon_p([0.5, 0.6], [0.5, 0.6]) == 1.0
    assert np.isnan(compare.wilcoxon_p([], []))


def test_label_efficiency_lines_are_means_and_bands_span_seeds(sweep, tmp_path):
    runs = find_runs([sweep])
    figure = label_efficiency.label_efficiency_figure(runs, band="minmax")
    axis = figure.axes[0]
    labels = [line.get_label() for line in axis.lines]
    assert labels == ["supervised (n=2 seeds)", "mean_teacher (n=2 seeds)", "mira_u (n=2 seeds)"]
    mira = axis.lines[2]
    np.testing.assert_allclose(mira.get_xdata(), [10, 30])
    expected = [np.mean([r.metrics["dice"] for r in runs if r.method == "mira_u"
                         and r.labeled_fraction == f]) for f in (0.1, 0.3)]
    np.testing.assert_allclose(mira.get_ydata(), expected)
    band = axis.collections[4].get_paths()[0].vertices  # mira_u band (a fill, then seed dots)
    lows = [min(r.metrics["dice"] for r in runs if r.method == "mira_u" and r.labeled_fraction == f)
            for f in (0.1, 0.3)]
    assert band[:, 1].min() == pytest.approx(min(lows))
    assert axis.get_xlabel() == "Labeled training cases (%)" and axis.get_ylabel() == "Test Dice"
    paths = label_efficiency.main([str(sweep), "--out", str(tmp_path), "--band", "std",
                                   "--metric", "hd95", "--formats", "png,pdf,svg"])
    assert sorted(p.name for p in paths) == [f"label_efficiency_hd95.{f}" for f in ("pdf", "png", "svg")]
    assert all(p.stat().st_size > 1000 for p in paths)


def test_overlays_pick_best_median_worst_and_show_uncertainty(sweep, tmp_path):
    run = load_run(sweep / "mira_u" / "lf10" / "seed0")
    picks = overlays.pick_cases(run)
    ranked = run.per_case.sort_values("dice", ascending=False)
    assert [p[0] for p in picks] == ["best", "median", "worst"]
    assert picks[0][1] == ranked["case_id"].iloc[0] and picks[2][1] == ranked["case_id"].iloc[-1]
    assert picks[1][1] == ranked["case_id"].iloc[4]
    figure = overlays.overlays_figure(run)
    titles = [axis.get_title() for axis in figure.axes[:5]]
    assert titles == ["Input", "Ground truth", "Probability", "Prediction (p ≥ 0.5)", "Uncertainty"]
    supervised = overlays.overlays_figure(load_run(sweep / "supervised" / "lf10" / "seed0"))
    assert "Uncertainty" not in [axis.get_title() for axis in supervised.axes]
    assert overlays.main([str(sweep / "mira_u" / "lf10" / "seed1"), "--out", str(tmp_path)]) == [
        tmp_path / "overlays_seed1.png"]
    with pytest.raises(FileNotFoundError, match="previews"):
        overlays.pick_cases(run, split="val")


def test_report_is_one_self_contained_html(sweep, tmp_path, monkeypatch):
    monkeypatch.setattr(figures, "DPI", 40)  # small PNGs: this test checks structure, not looks
    nopreview = write_fake_run(tmp_path / "extra" / "mt_s2", "mean_teacher", 0.1, 2, previews=False)
    runs = find_runs([sweep / "supervised" / "lf10", sweep / "mira_u" / "lf10", nopreview])
    path = report.build_report(runs, tmp_path / "report")
    text = path.read_text()
    # Label efficiency, one curve figure (one fraction), overlays for supervised and mira_u;
    # mean_teacher has no previews and gets a note instead.
    assert text.count('src="data:image/png;base64,') == 1 + 1 + 2
    assert "mean_teacher, 10% labeled, seed 2: not available" in text
    assert "src=\"http" not in text and "<table>" in text and "mira_u" in text
    assert (tmp_path / "report" / "comparison.md").is_file()
    assert (tmp_path / "report" / "label_efficiency.png").is_file()


def test_scripts_run_as_files_without_tensorflow(sweep, tmp_path):
    # One interpreter (imports are slow on a busy node): run compare.py as __main__ from its
    # file, then import every analysis module and check that none pulled in TensorFlow.
    script = REPO / "analysis" / "compare.py"
    probe = ("import runpy, sys; sys.argv = sys.argv[1:]\ntry: runpy.run_path(sys.argv[0], run_name='__main__')\n"
             "except SystemExit as done: print('exit code', done.code)\n"
             "import analysis.report, analysis.runs; "
             "print('tensorflow imported:', 'tensorflow' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe, str(script), str(sweep), "--out",
                             str(tmp_path)], capture_output=True, text=True, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "| supervised | 10% | 2 |" in result.stdout and (tmp_path / "comparison.tex").is_file()
    assert "tensorflow imported: False" in result.stdout and "exit code 0" in result.stdout


@pytest.mark.parametrize("script", ["collect", "compare", "curves", "families", "label_efficiency", "overlays", "report", "runs"])
def test_a_missing_run_folder_is_an_error_without_traceback(script, tmp_path, monkeypatch, capsys):
    # Each script as `python analysis/SCRIPT.py` (its __main__ block), in this interpreter.
    missing, out = tmp_path / "no_such_sweep", tmp_path / "out"
    monkeypatch.setattr(sys, "argv", [f"{script}.py", str(missing)] + ([] if script == "runs" else ["--out", str(out)]))
    with pytest.raises(SystemExit) as stopped:
        runpy.run_path(str(REPO / "analysis" / f"{script}.py"), run_name="__main__")
    assert stopped.value.code == 2
    assert capsys.readouterr().err == f"error: {missing}: no such folder\n"
    assert not out.exists()


def test_cli_errors_name_the_file_and_exit_2(tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(compare.main, [str(tmp_path), "--out", str(out)]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}: no run folder (a folder with config.yaml) inside\n"
    (tmp_path / "config.yaml").write_text("seed: 0\n")
    assert run_cli(runs_main, [str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"error: {tmp_path / 'config.yaml'}: missing key 'method'\n")
    assert run_cli(overlays.main, [str(tmp_path), "--out", str(out)]) == 2      # a run without previews
    assert capsys.readouterr().err.endswith(f"\nerror: no run under {tmp_path} has previews\n")
    assert not out.exists()


def test_formats_option_rejects_unknown_formats():
    assert figures.parse_formats("png, PDF,svg") == ("png", "pdf", "svg")
    with pytest.raises(argparse.ArgumentTypeError, match="bmp"):
        figures.parse_formats("png,bmp")


def _set_config(run_dir, dotted, value):
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    node = config
    *parents, last = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


def test_compare_never_merges_runs_whose_settings_differ(tmp_path):
    """Two networks make two supervised rows; two consistency weights make two Mean Teacher rows,
    each paired with the supervised run of its own network, never with the other's."""
    for filters in (8, 16):
        for seed in (0, 1):
            sup = write_fake_run(tmp_path / f"sup-f{filters}-s{seed}", "supervised", 0.1, seed)
            _set_config(sup, "model.base_filters", filters)
            _set_config(sup, "mean_teacher.consistency", 99.0)   # another method's section: ignored
    for weight in (1.0, 3.0):
        for seed in (0, 1):
            mt = write_fake_run(tmp_path / f"mt-w{weight}-s{seed}", "mean_teacher", 0.1, seed)
            _set_config(mt, "mean_teacher.consistency", weight)
    table = compare.summary_table(find_runs([tmp_path]))
    assert list(zip(table["method"], table["setting"])) == [
        ("supervised", "model.base_filters=16"), ("supervised", "model.base_filters=8"),
        ("mean_teacher", "mean_teacher.consistency=1.0, model.base_filters=8"),
        ("mean_teacher", "mean_teacher.consistency=3.0, model.base_filters=8")]
    assert list(table["n_seeds"]) == [2, 2, 2, 2]
    tests = compare.wilcoxon_table(find_runs([tmp_path]))
    assert len(tests[tests["seed"] != "all"]) == 4 and (tests["n_pairs"] == len(CASE_IDS)).all()
    # Paired with the 8-filter supervised runs: their per-case Dice, not the 16-filter ones'.
    paired = compare.paired_dice(load_run(tmp_path / "mt-w1.0-s0"), load_run(tmp_path / "sup-f8-s0"))
    assert tests.iloc[0]["median_difference"] == pytest.approx((paired["dice"] - paired["dice_baseline"]).median())
    assert "| supervised | model.base_filters=16 | 10% | 2 |" in compare.to_markdown(table)
def test_runs_saved_before_labeled_forward_read_as_joint_and_pair_with_one_baseline(tmp_path):
    """A run whose config.yaml predates train.labeled_forward trained joint: it is a row of its own
    beside the separate runs (never merged), and both rows pair with the same supervised runs,
    which that setting does not touch whatever their config.yaml says."""
    for seed in (0, 1):
        sup = write_fake_run(tmp_path / f"sup-s{seed}", "supervised", 0.1, seed)
        if seed:
            _set_config(sup, "train.labeled_forward", "separate")
        write_fake_run(tmp_path / f"mt-old-s{seed}", "mean_teacher", 0.1, seed)      # no such key
        _set_config(write_fake_run(tmp_path / f"mt-new-s{seed}", "mean_teacher", 0.1, seed),
                    "train.labeled_forward", "separate")
    assert load_run(tmp_path / "mt-old-s0").config["train"]["labeled_forward"] == "joint"
    table = compare.summary_table(find_runs([tmp_path]))
    assert list(zip(table["method"], table["setting"])) == [
        ("supervised", ""), ("mean_teacher", "train.labeled_forward=joint"),
        ("mean_teacher", "train.labeled_forward=separate")]
    tests = compare.wilcoxon_table(find_runs([tmp_path]))
    assert len(tests[tests["seed"] != "all"]) == 4 and (tests["n_pairs"] == len(CASE_IDS)).all()


def test_fused_update_never_splits_a_comparison(tmp_path):
    """train.fused_update changes how the update runs, not what it computes: runs that differ only in
    it (an old run without the key reads as false) are one row and pair with one baseline."""
    for seed in (0, 1):
        write_fake_run(tmp_path / f"sup-s{seed}", "supervised", 0.1, seed)          # no such key: false
        _set_config(write_fake_run(tmp_path / f"mt-s{seed}", "mean_teacher", 0.1, seed),
                    "train.fused_update", seed == 1)
    assert load_run(tmp_path / "sup-s0").config["train"]["fused_update"] is False
    table = compare.summary_table(find_runs([tmp_path]))
    assert list(zip(table["method"], table["setting"])) == [("supervised", ""), ("mean_teacher", "")]
    tests = compare.wilcoxon_table(find_runs([tmp_path]))
    assert len(tests[tests["seed"] != "all"]) == 2 and (tests["n_pairs"] == len(CASE_IDS)).all()


def test_older_runs_history_columns_read_under_todays_names(tmp_path):
    """Runs made before the one naming scheme (docs/outputs.md) read with today's column names."""
    old = {"mean_teacher": "epoch,loss,loss_cons,cons_weight,pseudo_target_dice,val_dice\n1,0.5,0.1,2.0,0.7,0.6\n",
           "mixmatch": "epoch,loss,loss_u,lambda_u_weight,pseudo_target_dice,val_dice\n1,0.5,0.2,3.0,0.7,0.6\n",
           "mira_u": "epoch,loss,loss_unsup,loss_ce,loss_cons,beta,pseudo_dice,val_dice\n1,0.5,0.3,0.4,0.05,0.9,0.7,0.6\n"}
    read = {}
    for method, text in old.items():
        (tmp_path / method).mkdir()
        (tmp_path / method / "config.yaml").write_text(f"method: {method}\n")
        (tmp_path / method / "history.csv").write_text(text)
        read[method] = load_run(tmp_path / method).history.iloc[0].to_dict()
    assert read["mean_teacher"] == {"epoch": 1, "loss": 0.5, "loss_unsup": 0.1, "unsup_weight": 2.0,
                                    "pseudo_dice": 0.7, "val_dice": 0.6}
    assert read["mixmatch"] == {"epoch": 1, "loss": 0.5, "loss_unsup": 0.2, "unsup_weight": 3.0,
                                "pseudo_dice": 0.7, "val_dice": 0.6}
    assert read["mira_u"] == {"epoch": 1, "loss": 0.5, "loss_unsup": 0.3, "loss_unsup_ce": 0.4,
                              "loss_unsup_cons": 0.05, "unsup_weight": 0.9, "pseudo_dice": 0.7, "val_dice": 0.6}


def test_collect_writes_one_row_per_run_with_differing_config_keys_and_metrics(sweep, tmp_path):
    out = tmp_path / "runs.csv"
    assert run_cli(collect.main, [str(sweep / "supervised"), str(sweep / "mira_u" / "lf30"), "--out", str(out)]) == 0
    table = pd.read_csv(out)
    assert len(table) == 6 and table["run"].is_unique
    config_columns = [c for c in table.columns if "." in c]
    # Only data.labeled_fraction differs besides the identity keys (same preset, lr, image size...).
    assert config_columns == ["data.labeled_fraction"]
    assert list(table.columns[:6]) == ["run", "path", "method", "preset", "seed", "data.labeled_fraction"]
    for _, row in table.iterrows():
        run = load_run(row["path"])
        assert (row["method"], row["seed"], row["data.labeled_fraction"]) == (run.method, run.seed, run.labeled_fraction)
        assert row["dice"] == pytest.approx(run.metrics["dice"]) and row["n_cases"] == 8
        assert row["epochs"] == 6 and row["best_val_dice"] == pytest.approx(run.history["val_dice"].max())
    # A key that differs in one run only becomes a column; every run gets a cell.
    other = write_fake_run(tmp_path / "lr_run", "supervised", 0.1, 0)
    config = yaml.safe_load((other / "config.yaml").read_text())
    config["train"]["lr"] = 0.01
    (other / "config.yaml").write_text(yaml.safe_dump(config))
    (other / "metrics.json").unlink()
    table = collect.collect(find_runs([sweep / "supervised" / "lf10", other]))
    assert list(table["train.lr"]) == [1e-3, 1e-3, 0.01] and "data.labeled_fraction" in table
    assert table["dice"].isna().tolist() == [False, False, True]


@pytest.mark.parametrize("script", ["collect", "compare", "curves", "families", "label_efficiency", "overlays", "report", "runs"])
def test_script_help_describes_it_in_whole_sentences(script, capsys):
    module = runpy.run_path(str(REPO / "analysis" / f"{script}.py"))
    with pytest.raises(SystemExit) as stopped:
        module["main"](["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    description = " ".join(text.split("\n\n")[1].split())
    assert description.endswith("."), description


def test_compare_shows_per_class_dice_of_multiclass_runs(tmp_path):
    """Runs whose metrics.json lists classes get a 'Dice <class>' column per class: mean over seeds."""
    for seed, (rv, lv) in enumerate([(0.6, 0.8), (0.7, 0.9)]):
        run = write_fake_run(tmp_path / f"mc-s{seed}", "supervised", 0.1, seed, previews=False)
        payload = json.loads((run / "metrics.json").read_text())
        payload.update(classes=["RV", "LV"], dice_RV=rv, dice_LV=lv)
        (run / "metrics.json").write_text(json.dumps(payload))
    table = compare.summary_table(find_runs([tmp_path]))
    assert table.attrs["metrics"][-2:] == ("dice_RV", "dice_LV")
    assert table["dice_RV_mean"].iloc[0] == pytest.approx(0.65) and table["dice_LV_mean"].iloc[0] == pytest.approx(0.85)
    header = compare.to_markdown(table).splitlines()[0]
    assert "| Dice RV | Dice LV |" in header
    assert "0.650 ± 0.071" in compare.to_markdown(table)


def test_curves_name_the_multiclass_columns(tmp_path):
    run = write_fake_run(tmp_path / "mc", "mean_teacher", 0.1, 0, previews=False)
    history = pd.read_csv(run / "history.csv")
    history["loss_sup_ce"], history["pseudo_dice"], history["pseudo_dice_RV"] = 0.5, 0.4, 0.3
    history.to_csv(run / "history.csv", index=False)
    columns = curves.plotted_columns(find_runs([run]))
    assert columns.index("pseudo_dice_RV") == columns.index("pseudo_dice") + 1
    assert curves.panel_names("pseudo_dice_RV") == ("Pseudo-target Dice vs hidden truth: RV", "Dice")
    assert curves.panel_names("loss_sup_ce")[0] == "Supervised CE loss (multi-class)"


def test_a_method_setting_an_older_run_lacks_is_never_merged(tmp_path, monkeypatch):
    """A run saved before a method's setting existed: read with the value it trained with where
    KEYS_ADDED_LATER knows it (mixmatch.mix_labeled: the labelled batch was mixed), and otherwise a
    row of its own rather than merged with runs that state a value."""
    monkeypatch.setitem(EXTRA_COLUMNS, "mixmatch", ["loss_unsup", "val_dice_student", "rampup"])
    monkeypatch.setitem(METHOD_ERROR, "mixmatch", 2.0)
    for seed in (0, 1):
        write_fake_run(tmp_path / f"sup-s{seed}", "supervised", 0.1, seed)
        _set_config(write_fake_run(tmp_path / f"mm-old-s{seed}", "mixmatch", 0.1, seed), "mixmatch.lambda_u", 0.75)
        new = write_fake_run(tmp_path / f"mm-new-s{seed}", "mixmatch", 0.1, seed)
        _set_config(new, "mixmatch.lambda_u", 0.75)
        _set_config(new, "mixmatch.mix_labeled", False)
        _set_config(write_fake_run(tmp_path / f"mt-old-s{seed}", "mean_teacher", 0.1, seed),
                    "mean_teacher.consistency", 1.0)
        knob = write_fake_run(tmp_path / f"mt-new-s{seed}", "mean_teacher", 0.1, seed)
        _set_config(knob, "mean_teacher.consistency", 1.0)
        _set_config(knob, "mean_teacher.some_later_knob", 2)
    table = compare.summary_table(find_runs([tmp_path]))
    rows = list(zip(table["method"], table["setting"], table["n_seeds"]))
    assert ("mixmatch", "mixmatch.mix_labeled=True", 2) in rows and ("mixmatch", "mixmatch.mix_labeled=False", 2) in rows
    assert ("mean_teacher", "", 2) in rows and ("mean_teacher", "mean_teacher.some_later_knob=2", 2) in rows
    assert len(rows) == 5
