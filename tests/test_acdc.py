"""ACDC: the layout (--format acdc), splits by patient, split files (data.split_file) and the
shipped SSL4MIS split, on the tiny ACDC-layout generator of data_layouts.py.

    python -m pytest tests/test_acdc.py -q
"""
import json

import numpy as np
import pytest
from data_layouts import make_acdc, write_nifti

from semiseg import config
from semiseg.data import checks, loader, sources
from semiseg.data.sources import Case, DataError
from semiseg.data.splits import load_split_file, make_splits

ACDC_SETS = ["data.format=acdc", "data.classes=[RV,MYO,LV]", "data.label_set=[1,2,3]"]


def _cfg(tmp_path, root, *sets):
    return config.resolve("smoke", overrides=[f"data.path={root}", f"data.cache_dir={tmp_path / 'cache'}",
                                              "data.image_size=16", *ACDC_SETS, *sets])


def test_acdc_cases_are_ed_and_es_frames_grouped_by_patient(tmp_path):
    root = make_acdc(tmp_path / "ACDC", patients=(1, 2, 3), testing=(101,))
    assert sources.detect_format(root) == "acdc"
    cases = sources.list_acdc_cases(root, config.DataConfig())
    assert [c.case_id for c in cases] == ["patient001_frame01", "patient001_frame09", "patient002_frame01",
                                          "patient002_frame10", "patient003_frame01", "patient003_frame11",
                                          "patient101_frame01", "patient101_frame09"]
    assert [c.group for c in cases] == ["patient001"] * 2 + ["patient002"] * 2 + ["patient003"] * 2 + ["patient101"] * 2
    assert [c.subset for c in cases] == [None] * 6 + ["test"] * 2
    assert {c.modality for c in cases} == {"mri"} and all(c.label.endswith("_gt.nii.gz") for c in cases)
    # The 2021+ download nests everything in database/.
    nested = tmp_path / "nested"
    make_acdc(nested / "database", patients=(4,))
    assert [c.case_id for c in sources.list_acdc_cases(nested, config.DataConfig())] == ["patient004_frame01",
                                                                                         "patient004_frame12"]


def test_acdc_layout_errors_and_orphans_name_the_file(tmp_path):
    root = make_acdc(tmp_path / "ACDC", patients=(1, 2))
    cfg_file = root / "training" / "patient002" / "Info.cfg"
    stray = root / "training" / "patient001" / "patient001_frame05_gt.nii.gz"
    write_nifti(stray, np.zeros((20, 24, 5), np.uint8))
    write_nifti(root / "training" / "patient001" / "patient001_frame05.nii.gz", np.zeros((20, 24, 5), np.float32))
    assert sources.acdc_orphans(root, config.DataConfig()) == [
        (str(stray), "frame 5 is not ED or ES in Info.cfg: ignored")]
    cfg_file.write_text("ED: 1\nGroup: NOR\n")
    with pytest.raises(DataError, match=r"patient002/Info.cfg: needs 'ES: FRAME'"):
        sources.list_acdc_cases(root, config.DataConfig())
    cfg_file.write_text("ED: 1\nES: 3\n")
    with pytest.raises(DataError, match=r"frame 3 is listed but patient002_frame03.nii.gz is missing"):
        sources.list_acdc_cases(root, config.DataConfig())
    with pytest.raises(DataError, match="no ACDC patients"):
        sources.list_acdc_cases(tmp_path, config.DataConfig())


def test_acdc_unlabelled_testing_frames(tmp_path):
    root = make_acdc(tmp_path / "ACDC", patients=(1, 2), testing=(101,), testing_labels=False)
    cases = sources.list_acdc_cases(root, config.DataConfig())
    unlabelled = [c for c in cases if c.label is None]
    assert [c.case_id for c in unlabelled] == ["patient101_frame01", "patient101_frame09"]
    assert {c.subset for c in unlabelled} == {None}                      # unlabelled training data
    kept = sources.list_acdc_cases(root, config.DataConfig(unlabeled_test_images=False))
    assert [c.case_id for c in kept] == [c.case_id for c in cases if c.label is not None]
    # A testing patient with one frame's ground truth: that frame stays in test, its patient's other
    # frame is not drawn as unlabelled training data (the patient would be on two sides).
    write_nifti(root / "testing" / "patient101" / "patient101_frame09_gt.nii.gz", np.zeros((20, 24, 5), np.uint8))
    cases = sources.list_acdc_cases(root, config.DataConfig())
    assert [(c.case_id, c.subset, c.label is None) for c in cases if c.group == "patient101"] == [
        ("patient101_frame01", None, True), ("patient101_frame09", "test", False)]
    s = make_splits(cases, config.DataConfig(labeled_fraction=0.5, val_fraction=0.5), 0)
    assert s["test"] == ["patient101_frame09"] and "patient101_frame01" not in s["unlabeled"]


def _acdc_cases(patients, frames=("01", "12")):
    return [Case(f"patient{p:03d}_frame{f}", "i", "l", kind="3d", group=f"patient{p:03d}") for p in patients
            for f in frames]


@pytest.mark.parametrize("split_seed", range(4))
def test_splits_never_separate_a_patients_frames(split_seed):
    d = config.DataConfig(labeled_fraction=0.3, val_fraction=0.2, test_fraction=0.2, split_seed=split_seed)
    for seed in range(3):
        s = make_splits(_acdc_cases(range(1, 31)), d, seed)
        side = {}
        for name in ("labeled", "unlabeled", "val", "test"):
            for case_id in s[name]:
                side.setdefault(case_id.split("_")[0], set()).add(name)
        assert len(side) == 30 and all(len(v) == 1 for v in side.values())
        # Fractions count patients: 6 test, 6 val, 18 train of which round(0.3 * 18) = 5 labelled.
        assert (len(s["test"]), len(s["val"]), len(s["labeled"])) == (12, 12, 10)


def test_labeled_cases_counts_patients():
    d = config.DataConfig(labeled_cases=7, val_fraction=0.1, test_fraction=0.2)
    s = make_splits(_acdc_cases(range(1, 101)), d, 0)
    assert len(s["labeled"]) == 14 and len({c.split("_")[0] for c in s["labeled"]}) == 7
    assert s["labeled_cases"] == 7
    with pytest.raises(DataError, match="labeled_cases=80"):
        make_splits(_acdc_cases(range(1, 101)), config.DataConfig(labeled_cases=80), 0)


def test_shipped_ssl4mis_split_and_its_labelled_patients():
    path, spec = load_split_file("acdc_ssl4mis")
    assert path.name == "acdc_ssl4mis.yaml" and path.is_file()
    assert (len(spec["train"]), len(spec["val"]), len(spec["test"])) == (70, 10, 20)
    everyone = spec["train"] + spec["val"] + spec["test"]
    assert sorted(everyone) == [f"patient{i:03d}" for i in range(1, 101)]
    assert spec["labeled"] == spec["train"]
    cases = _acdc_cases(range(1, 101)) + _acdc_cases(range(101, 151))       # testing/ patients: not in the file
    for preset, patients in (("acdc_3", ["038", "050", "099"]),
                             ("acdc_7", ["021", "038", "049", "050", "058", "099", "100"])):
        d = config.resolve(preset, method="mean_teacher").data
        for seed in (0, 1):          # SSL4MIS's labelled patients are fixed: seeds vary only the rest
            s = make_splits(cases, d, seed)
            assert s["labeled"] == [f"patient{p}_frame{f}" for p in patients for f in ("01", "12")]
            assert len(s["unlabeled"]) == 2 * (70 - len(patients)) and len(s["val"]) == 20 and len(s["test"]) == 40
            assert len(s["not_in_split_file"]) == 100 and s["split_file"] == str(load_split_file("acdc_ssl4mis")[0])
    assert not set(spec["test"]) & set(spec["train"]) and not set(spec["val"]) & set(spec["train"])


def test_split_file_fixes_the_split_and_errors_name_the_file(tmp_path):
    cases = _acdc_cases(range(1, 9)) + [Case("loose", "i", None)]
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": ["patient001", "patient002", "patient003", "patient004", "loose"],
                                "val": ["patient005"], "test": ["patient006_frame01", "patient006_frame12"]}))
    d = config.DataConfig(split_file=str(path), labeled_cases=2)
    a, b = make_splits(cases, d, 0), make_splits(cases, d, 1)
    for s in (a, b):
        assert s["val"] == ["patient005_frame01", "patient005_frame12"]
        assert s["test"] == ["patient006_frame01", "patient006_frame12"]
        assert len(s["labeled"]) == 4 and set(s["labeled"]) | set(s["hidden_truth"]) == {
            c.case_id for c in cases[:8]}
        assert "loose" in s["unlabeled"] and s["not_in_split_file"] == [c.case_id for c in cases[12:16]]
    # No `labeled` order in the file: the run seed draws the labelled patients from its train list.
    assert len({tuple(make_splits(cases, d, seed)["labeled"]) for seed in range(6)}) > 1
    bad = [({"train": ["patient001"], "val": ["patient099"]}, "val names 'patient099', which is neither"),
           ({"train": ["patient001"], "val": ["patient001"]}, "named in both 'train' and 'val'"),
           ({"train": ["patient001"], "val": ["loose"]}, "val names cases without labels"),
           ({"train": ["patient001"], "val": ["patient002"], "labeled": ["patient003"]}, "not in 'train'"),
           ({"train": ["patient001"], "val": ["patient002"], "tset": []}, "unknown key"),
           ({"train": ["patient001"]}, "needs a 'val' list")]
    for k, (spec, words) in enumerate(bad):
        bad_path = tmp_path / f"bad{k}.yaml"
        bad_path.write_text(json.dumps(spec))
        with pytest.raises(DataError, match=str(bad_path)) as err:
            make_splits(cases, config.DataConfig(split_file=str(bad_path)), 0)
        assert words in str(err.value)
    with pytest.raises(DataError, match="data.split_file: nope is neither a file nor a shipped split"):
        make_splits(cases, config.DataConfig(split_file="nope"), 0)


def test_acdc_through_check_data_cache_and_streams(tmp_path):
    root = make_acdc(tmp_path / "ACDC", patients=range(1, 9), testing=(101,))
    stray = root / "training" / "patient002" / "patient002_frame01_gt.nii.gz"
    import nibabel as nib
    img = nib.load(str(stray))
    data = np.asarray(img.dataobj).copy()
    data[0, 0, 0] = 4
    write_nifti(stray, data, img.affine)
    cfg = _cfg(tmp_path, root)
    fmt, _, cases = sources.resolve_source(cfg.data, log=lambda *a: None)
    report = checks.check_data(fmt, root, cases, cfg.data)
    assert report.summary().startswith(f"{root} (acdc): 18 cases of 9 patients, 18 with labels, 0 without "
                                       f"(subsets: test 2); 0 errors, 1 warnings")
    assert [(p.path, p.message) for p in report.warnings] == [
        (str(stray), "unexpected label values [4]: data.label_set maps only 1->RV, 2->MYO, 3->LV; these count "
                     "as background")]
    bundle = loader.prepare_data(cfg, log=lambda *a: None, progress=False)
    assert bundle.num_classes == 4 and bundle.splits["test"] == ["patient101_frame01", "patient101_frame09"]
    info = bundle.case_info("patient001_frame01")
    assert info["spacing_unit"] == "mm" and info["spacing"] == pytest.approx([1.5625 * 20 / 16, 1.5625 * 24 / 16, 10.0])
    seen = np.zeros(5, np.int64)
    for batch in bundle.eval_dataset("val", 64):
        seen += np.bincount(batch["mask"].numpy().astype(np.int64).ravel(), minlength=5)
    assert seen[4] == 0 and (seen[:4] > 0).all()
    image, mask = next(iter(bundle.train_dataset("labeled", 4, None, 0, None)))
    assert mask.shape == (4, 16, 16, 1) and set(np.unique(mask.numpy())) <= {0.0, 1.0, 2.0, 3.0}


def test_documented_acdc_command_resolves_the_ssl4mis_protocol(tmp_path, capsys, monkeypatch):
    """README: `train --method mean_teacher --preset acdc_7 --data PATH/ACDC`, as a dry run on a tiny
    ACDC download of patients 1-100 (small images, a small network: the preset's protocol otherwise)."""
    from semiseg import cli
    monkeypatch.chdir(tmp_path)
    root = make_acdc(tmp_path / "ACDC", patients=range(1, 101), shape=(12, 12, 3))
    out = tmp_path / "never"
    assert cli.main(["train", "--method", "mean_teacher", "--preset", "acdc_7", "--data", str(root), "--out", str(out),
                     "--dry-run", "--dry-run-steps", "1", "--no-progress", "--set", f"data.cache_dir={tmp_path / 'c'}",
                     "data.image_size=16", "model.depth=2", "model.base_filters=4"]) == 0
    text = capsys.readouterr().out
    assert not out.exists()
    # 7 labelled patients (14 frames), 63 unlabelled, 10 val and 20 test patients; 3 slices a frame.
    assert "splits (cases): labeled 14, unlabeled 126, val 20, test 40" in text
    assert "slices: labeled 42, unlabeled 378, val 60, test 120" in text
    assert "global batch 12 labelled + 12 unlabelled" in text and "total steps: 30,000 (150 epochs x 200)" in text


def test_a_run_on_acdc_follows_the_split_file(tmp_path):
    """The ACDC path end to end (layout, split file by patient, C = 4 class-index masks): one short
    supervised epoch, its splits.json, and the per-class metrics of the test patients' frames.
    (tests/test_multiclass_train.py trains every method on this layout.)"""
    method = "supervised"
    from semiseg import cli
    root = make_acdc(tmp_path / "ACDC", patients=range(1, 9), testing=(101,), shape=(16, 16, 3))
    split = tmp_path / "split.yaml"
    split.write_text("train: [patient001, patient002, patient003, patient004, patient005]\n"
                     "val: [patient006]\ntest: [patient007, patient008]\n")
    out = tmp_path / "run"
    assert cli.main(["train", "--method", method, "--preset", "smoke_multiclass", "--out", str(out), "--no-progress",
                     "--set", f"data.cache_dir={tmp_path / 'c'}", f"data.path={root}", *ACDC_SETS,
                     f"data.split_file={split}", "data.labeled_cases=2", "data.image_size=16", "train.epochs=1",
                     "train.steps_per_epoch=2", "train.steps_per_loop=2", "mira_u.mim_epochs=1"]) == 0
    splits = json.loads((out / "splits.json").read_text())
    assert splits["test"] == [f"patient00{p}_frame{f:02d}" for p, f in ((7, 1), (7, 10), (8, 1), (8, 11))]
    assert len(splits["labeled"]) == 4 and len({c[:10] for c in splits["labeled"]}) == 2
    assert splits["not_in_split_file"] == ["patient101_frame01", "patient101_frame09"]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n_cases"] == 4
    per_class = [metrics[f"dice_{name}"] for name in ("RV", "MYO", "LV")]
    assert all(0.0 <= d <= 1.0 for d in per_class) and metrics["dice"] == pytest.approx(np.mean(per_class))
