"""analysis/families.py on fake run folders over a tiny embedded 2D set generated here.

    python -m pytest tests/test_analysis_families.py -q
"""
import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

from analysis import families
from analysis.runs import find_runs, run_cli
from semiseg import config
from semiseg.data import synthetic

TEST_CASES = ["case_0004", "case_0005", "case_0007", "case_0011"]
LABELLED = ["case_0006", "case_0008", "case_0009", "case_0010"]


def data_section(cache):
    return {"format": "synthetic", "synthetic_kind": "2d", "synthetic_cases": 12, "synthetic_size": 32,
            "synthetic_seed": 0, "cache_dir": str(cache)}


def write_run(folder, method, fraction, seed, dice, cache, data=None):
    folder.mkdir(parents=True)
    section = dict(data or data_section(cache), labeled_fraction=fraction)
    (folder / "config.yaml").write_text(yaml.safe_dump({"method": method, "seed": seed, "data": section}))
    (folder / "splits.json").write_text(json.dumps({"labeled": LABELLED, "test": TEST_CASES}))
    pd.DataFrame({"case_id": TEST_CASES, "dice": dice}).to_csv(folder / "per_case.csv", index=False)
    (folder / "metrics.json").write_text(json.dumps({"dice": sum(dice) / len(dice)}))


@pytest.fixture()
def sweep(tmp_path):
    cache = tmp_path / "cache"
    base = {0: [0.5, 0.6, 0.7, 0.8], 1: [0.4, 0.5, 0.6, 0.7]}
    gain = [0.10, 0.0, 0.02, 0.04]                        # Mean Teacher's gain per test case
    for seed in (0, 1):
        write_run(tmp_path / "runs" / f"sup-s{seed}", "supervised", 0.25, seed, base[seed], cache)
        write_run(tmp_path / "runs" / f"mt-s{seed}", "mean_teacher", 0.25, seed,
                  [b + g for b, g in zip(base[seed], gain)], cache)
    write_run(tmp_path / "runs" / "fix-s0", "fixmatch", 0.25, 0, [0.9] * 4, cache)     # one seed only
    write_run(tmp_path / "runs" / "sup-all", "supervised", 1.0, 0, [0.9, 0.9, 0.8, 1.0], cache)
    return tmp_path, cache


def test_coverage_is_the_labelled_count_of_the_rarest_trait_and_bands_cover_every_count():
    counts = {"shape=oval": 3, "skin=fair": 1, "artefact=hair": 7}
    assert families.coverage(["shape=oval", "skin=fair"], counts) == 1
    assert families.coverage(["shape=oval", "skin=dark"], counts) == 0
    assert [families.band(n) for n in (0, 1, 2, 3, 4, 5, 40)] == ["0-1", "0-1", "2", "3-4", "3-4", "5+", "5+"]


def test_tables_pair_cases_count_coverage_and_leave_out_single_seed_groups(sweep):
    tmp_path, cache = sweep
    out = tmp_path / "out"
    assert run_cli(families.main, [str(tmp_path / "runs"), "--fraction", "0.25", "--min-seeds", "2",
                                   "--out", str(out)]) == 0
    pairs = pd.read_csv(out / "families.csv")
    cases = json.loads((synthetic.synthetic_root(config.from_dict({"data": data_section(cache)}).data)
                        / "families.json").read_text())["cases"]
    # case_0011: elongated (2 labelled), reticular (2), tanned (2), standard (3), gel_bubbles (1), ruler (2)
    counted = {}
    for case in LABELLED:
        for trait in families.case_traits(cases[case]):
            counted[trait] = counted.get(trait, 0) + 1
    mt = pairs[pairs["method"] == "mean_teacher"].set_index(["seed", "case_id"])
    assert mt.loc[(0, "case_0011"), "coverage"] == 1 == families.coverage(families.case_traits(cases["case_0011"]), counted)
    assert mt.loc[(1, "case_0005"), "coverage"] == 0            # blue_veil: no labelled example
    assert mt.loc[(1, "case_0004"), "dice"] - mt.loc[(1, "case_0004"), "dice_baseline"] == pytest.approx(0.10)
    text = (out / "families.md").read_text()
    assert "fixmatch" not in text                                # paired on one seed < --min-seeds 2
    # Every test case here has coverage 0 or 1: one band row; Mean Teacher's mean gain 4 points.
    band_row = next(line for line in text.splitlines() if line.startswith("| 0-1 |"))
    # pairs 8 (4 cases x 2 seeds), supervised mean 0.600, all labels 0.900, Mean Teacher +4.0
    assert band_row == "| 0-1 | 8 | 0.600 | 0.900 | +4.0 |"
    elongated = [c for c in TEST_CASES if cases[c]["shape"] == "elongated"]
    gains = {"case_0004": 10.0, "case_0005": 0.0, "case_0007": 2.0, "case_0011": 4.0}
    row = next(line for line in text.splitlines() if line.startswith("| shape=elongated |"))
    assert row.split(" | ")[-1].rstrip(" |") == f"{sum(gains[c] for c in elongated) / len(elongated):+.1f}"


def test_runs_on_other_data_are_an_error_naming_the_config(tmp_path, capsys):
    write_run(tmp_path / "runs" / "sup", "supervised", 0.1, 0, [0.5] * 4, tmp_path,
              data={"format": "isic", "path": str(tmp_path)})
    assert run_cli(families.main, [str(tmp_path / "runs"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "runs" / "sup" / "config.yaml") in err and "data.format=isic" in err
    assert not (tmp_path / "out").exists()


def test_no_run_at_the_fraction_is_an_error(sweep, capsys):
    tmp_path, _ = sweep
    assert run_cli(families.main, [str(tmp_path / "runs"), "--fraction", "0.5", "--out", str(tmp_path / "o")]) == 2
    assert "no run at 50% labels has a supervised run to pair with (labelled fractions found: 25%, 100%;" \
        in capsys.readouterr().err
    assert find_runs([tmp_path / "runs"])            # the runs are there: the fraction is what is missing


def test_supervised_runs_of_two_networks_are_an_error_not_one_column(sweep, capsys):
    tmp_path, cache = sweep
    folder = tmp_path / "runs" / "sup-wide-s0"
    write_run(folder, "supervised", 0.25, 0, [0.1] * 4, cache)
    for run, filters in ((folder, 48), (tmp_path / "runs" / "sup-s0", 16)):
        config_path = run / "config.yaml"
        saved = yaml.safe_load(config_path.read_text())
        saved["model"] = {"base_filters": filters}
        config_path.write_text(yaml.safe_dump(saved))
    assert run_cli(families.main, [str(tmp_path / "runs"), "--fraction", "0.25", "--out", str(tmp_path / "o")]) == 2
    assert ("the supervised runs differ in (no such key) / model.base_filters=16 / model.base_filters=48; "
            "give the runs of one comparison") in capsys.readouterr().err
