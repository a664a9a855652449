"""Sources: each layout lists and pairs its cases right, detects its format, and trains (smoke)."""
import json
from pathlib import Path

import numpy as np
import pytest

from semiseg import config
from semiseg.data import loader as data_loader_tf2
from semiseg.data import sources as data_sources
from semiseg import cli as main
from data_layouts import (make_folders_nifti, make_folders_numbered_per_split, make_folders_png, make_isic,
                          make_isic_release, make_msd, make_ph2)


def _cfg(fmt, path, *sets):
    cfg = config.resolve("smoke", "", [f"data.format={fmt}", f"data.path={path}", *sets])
    return cfg


def test_msd_pairs_cases_reads_modality_and_unlabeled_test_images(tmp_path):
    root = make_msd(tmp_path / "Task07", n=4, n_test=2)
    assert data_sources.detect_format(root) == "msd"
    cases = data_sources.get_source("msd").list_cases(root, config.DataConfig())
    labelled = [c for c in cases if c.label]
    assert len(labelled) == 4 and len(cases) == 6
    for c in labelled:
        assert Path(c.image).name == Path(c.label).name and "imagesTr" in c.image and "labelsTr" in c.label
        assert c.kind == "3d" and c.modality == "ct"
    no_test = data_sources.list_msd_cases(root, config.DataConfig(unlabeled_test_images=False))
    assert len(no_test) == 4
    loaded = data_sources.load_any_case(labelled[1], config.DataConfig())
    assert loaded.image.shape == (6, 16, 16, 1) and loaded.label.shape == (6, 16, 16)
    assert loaded.spacing == pytest.approx((0.8, 0.8, 2.5)) and loaded.spacing_unit == "mm"
    assert set(np.unique(loaded.label)) == {0, 1}


def test_msd_mri_modality_from_dataset_json(tmp_path):
    root = make_msd(tmp_path / "mr", n=1, n_test=0, modality="T2")
    (case,) = data_sources.list_msd_cases(root, config.DataConfig())
    assert case.modality == "mri"


def test_isic_suffix_is_case_insensitive_and_unlabeled_images_kept(tmp_path):
    root = make_isic(tmp_path / "isic", n=4, unlabeled=2)
    assert data_sources.detect_format(root) == "isic"
    cases = data_sources.list_isic_cases(root, config.DataConfig())
    assert [c.case_id for c in cases] == [f"ISIC_{i:07d}" for i in range(6)]
    assert [c.label is not None for c in cases] == [True] * 4 + [False] * 2
    assert Path(cases[1].label).name == "ISIC_0000001_Segmentation.png"


@pytest.mark.parametrize("release", ["ISIC 2016", "ISIC 2017", "ISIC 2018"])
def test_isic_official_download_read_as_is_with_its_own_test_split(tmp_path, release):
    root, ids = make_isic_release(tmp_path / "isic", release)
    assert data_sources.detect_format(root) == "isic"
    cases = data_sources.list_isic_cases(root, config.DataConfig())
    every = sorted(i for subset in ids.values() for i in subset)
    assert sorted(c.case_id for c in cases) == every           # 2017's superpixel maps are no cases
    assert all(c.label and Path(c.label).stem.lower() == c.case_id.lower() + "_segmentation" for c in cases)
    splits = data_loader_tf2.make_splits(cases, config.DataConfig(labeled_fraction=0.5, val_fraction=0.2), seed=3)
    assert splits["test"] == ids["test"]
    if "val" in ids:
        assert splits["val"] == ids["val"]
    else:       # 2016 has no validation set: it is cut from the training images
        assert len(splits["val"]) == 1 and set(splits["val"]) < set(ids["train"])
    assert sorted(splits["labeled"] + splits["unlabeled"]) == sorted(set(ids["train"]) - set(splits["val"]))
    assert data_sources.isic_orphans(root, config.DataConfig()) == []


def test_isic_official_test_images_without_masks_are_left_out_or_unlabelled(tmp_path):
    root, ids = make_isic_release(tmp_path / "isic", "ISIC 2016", {"train": 4, "test": 2})
    for mask in (root / "ISBI2016_ISIC_Part1_Test_GroundTruth").iterdir():
        mask.unlink()
    kept = data_sources.list_isic_cases(root, config.DataConfig(unlabeled_test_images=False))
    assert sorted(c.case_id for c in kept) == ids["train"]
    used = data_sources.list_isic_cases(root, config.DataConfig(unlabeled_test_images=True))
    assert sorted(c.case_id for c in used if c.label is None) == ids["test"]
    assert all(c.subset is None for c in used)


def test_isic_official_folders_unzipped_one_level_deeper(tmp_path):
    """Some unzip tools put NAME/ inside NAME/: the release is still read."""
    root, ids = make_isic_release(tmp_path / "isic", "ISIC 2016", {"train": 3, "test": 2})
    for name in ("ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth"):
        (root / name).rename(tmp_path / "tmp")
        (root / name).mkdir()
        (tmp_path / "tmp").rename(root / name / name)
    cases = data_sources.list_isic_cases(root, config.DataConfig())
    assert sorted(c.case_id for c in cases) == ids["train"] + ids["test"] and all(c.label for c in cases)
    assert sorted(c.case_id for c in cases if c.subset == "test") == ids["test"]


def test_format_inference_error_lists_every_layout(tmp_path):
    (tmp_path / "somewhere").mkdir()
    with pytest.raises(data_sources.DataError) as caught:
        data_sources.detect_format(tmp_path)
    message = str(caught.value)
    assert "README" not in message
    for name in ("folders", "isic", "msd", "ph2"):
        assert f"--format {name}:" in message
    for folder in ("ISBI2016_ISIC_Part1_Test_Data", "ISIC-2017_Validation_Part1_GroundTruth",
                   "ISIC2018_Task1-2_Training_Input", "imagesTr", "masks/", "_Dermoscopic_Image"):
        assert folder in message


def test_smoke_train_on_the_official_isic2016_download(tmp_path):
    """The official ISIC-2016 folder names, tiny pictures: trains, and tests on the official test set."""
    root, ids = make_isic_release(tmp_path / "ISIC2016", "ISIC 2016", {"train": 6, "test": 3})
    run = tmp_path / "run"
    assert main.main(["train", "--preset", "smoke", "--data", str(root), "--out", str(run), "--no-progress",
                      "--set", "train.epochs=1", "train.steps_per_epoch=2", "data.val_fraction=0.2"]) == 0
    splits = json.loads((run / "splits.json").read_text())
    assert splits["test"] == ids["test"] and not set(splits["val"]) & set(ids["test"])
    per_case = (run / "per_case.csv").read_text().splitlines()
    header = per_case[0].split(",")
    assert sorted(line.split(",")[header.index("case_id")] for line in per_case[1:]) == ids["test"]
    assert json.loads((run / "metrics.json").read_text())["n_cases"] == 3
    assert json.loads((run / "run_info.json").read_text())["data"]["format"] == "isic"


def test_ph2_layout(tmp_path):
    root = make_ph2(tmp_path / "PH2Dataset", n=3)
    assert data_sources.detect_format(root) == "ph2"
    cases = data_sources.list_ph2_cases(root, config.DataConfig())
    assert [c.case_id for c in cases] == ["IMD000", "IMD001", "IMD002"]
    assert all(c.image.endswith(f"{c.case_id}.bmp") and c.label.endswith(f"{c.case_id}_lesion.bmp") for c in cases)
    loaded = data_sources.load_picture_case(cases[0], config.DataConfig())
    assert loaded.image.shape == (1, 24, 24, 3) and set(np.unique(loaded.label)) == {0, 1}


def test_folders_subsets_fixed_and_nifti_or_png(tmp_path):
    root = make_folders_png(tmp_path / "f")
    assert data_sources.detect_format(root) == "folders"
    cases = data_sources.list_folder_cases(root, config.DataConfig())
    assert {c.subset for c in cases} == {"train", "val", "test"} and all(c.label for c in cases)
    splits = data_loader_tf2.make_splits(cases, config.DataConfig(labeled_fraction=1.0), seed=0)
    assert splits["test"] == ["test0", "test1"] and splits["val"] == ["val0", "val1"]
    vols = data_sources.list_folder_cases(make_folders_nifti(tmp_path / "n"), config.DataConfig())
    assert all(c.kind == "3d" and c.label.endswith(".nii.gz") for c in vols)
    # No val/ folder: the train cases are left to the random split, which cuts val from them.
    partial = data_sources.list_folder_cases(make_folders_png(tmp_path / "p", (("train", 8), ("test", 2))),
                                             config.DataConfig())
    assert {c.subset for c in partial} == {None, "test"}



def test_folders_names_repeated_across_splits_are_qualified_by_their_split(tmp_path):
    """images/train/img_000.png next to images/val/img_000.png: ids train/img_000 and val/img_000
    (only the repeated names: train's img_002..img_005 keep their plain ids), each with its own label."""
    root = make_folders_numbered_per_split(tmp_path / "f")
    cases = {c.case_id: c for c in data_sources.list_folder_cases(root, config.DataConfig())}
    assert sorted(cases) == ["extra_train", "img_002", "img_003", "img_004", "img_005", "test/img_000", "test/img_001",
                             "train/img_000", "train/img_001", "val/img_000", "val/img_001"]
    for case_id, case in cases.items():
        subset = case.subset or "train"
        assert Path(case.image).parent.name == Path(case.label).parent.name == subset, case_id
    assert cases["val/img_000"].image.endswith("images/val/img_000.png")
    # Through the cache, the fixed split and the evaluation previews (the id holds a '/').
    run = tmp_path / "run"
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--data", str(root), "--out", str(run),
                      "--no-progress", "--set", "train.epochs=1", "train.steps_per_epoch=2"]) == 0
    splits = json.loads((run / "splits.json").read_text())
    assert splits["val"] == ["val/img_000", "val/img_001"] and splits["test"] == ["test/img_000", "test/img_001"]
    assert sorted(p.relative_to(run / "previews" / "test").as_posix() for p in (run / "previews").rglob("*.npz")) \
        == ["test/img_000.npz", "test/img_001.npz"]
    per_case = (run / "per_case.csv").read_text()
    assert "test/img_000" in per_case and "test/img_001" in per_case


def test_folders_ids_stay_plain_when_no_name_repeats(tmp_path):
    """Cache keys and the splits of existing users depend on the ids: unchanged without repeats."""
    cases = data_sources.list_folder_cases(make_folders_png(tmp_path / "f"), config.DataConfig())
    assert sorted(c.case_id for c in cases) == ["test0", "test1", "train0", "train1", "train2", "train3", "train4",
                                                "train5", "val0", "val1"]

def test_volume_cache_keeps_case_ids_and_splits_never_share_a_case(tmp_path):
    root = make_msd(tmp_path / "msd", n=6, n_test=1)
    cfg = _cfg("msd", root, "data.val_fraction=0.2", "data.test_fraction=0.2")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    cases = bundle.manifest["cases"]
    assert len(cases) == 7 and all(info["n_slices"] == 6 for info in cases.values())
    assert cases["pancreas_000"]["original_shape"] == [6, 16, 16]
    assert cases["pancreas_000"]["spacing"] == pytest.approx([0.8 * 16 / 32, 0.8 * 16 / 32, 2.5])
    parts = [set(bundle.splits[s]) for s in data_loader_tf2.SPLITS]
    assert sum(map(len, parts)) == 7 and len(set().union(*parts)) == 7
    seen = {}
    for batch in bundle.eval_dataset("test", 4, case_ids=sorted(cases)):
        for case, index in zip(batch["case"].numpy(), batch["index"].numpy()):
            seen.setdefault(case.decode(), []).append(int(index))
    assert all(indices == list(range(6)) for indices in seen.values()) and len(seen) == 7


@pytest.mark.parametrize("fmt,make", [("msd", make_msd), ("isic", make_isic), ("ph2", make_ph2),
                                      ("folders", make_folders_nifti), ("folders", make_folders_png)])
def test_check_data_and_preprocess_each_format(tmp_path, capsys, fmt, make):
    root = make(tmp_path / fmt)
    assert main.main(["check-data", "--data", str(root), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"data format inferred: {fmt}" in out and "0 errors" in out
    assert main.main(["preprocess", "--data", str(root), "--format", fmt, "--preset", "smoke", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "slice cache ready" in out
    n_cases = len(data_sources.get_source(fmt).list_cases(root, config.DataConfig()))
    assert f"of {n_cases} cases" in out


def test_smoke_train_on_a_volume_data_set(tmp_path):
    """The 3D path end to end (the 2D formats share the picture path the default data set trains)."""
    fmt, root = "msd", make_msd(tmp_path / "msd")
    run = tmp_path / "run"
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--data", str(root), "--format", fmt,
                      "--out", str(run), "--no-progress", "--set", "train.epochs=1", "train.steps_per_epoch=2",
                      "data.val_fraction=0.2", "data.test_fraction=0.2"]) == 0
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["n_cases"] >= 1 and 0.0 <= metrics["dice"] <= 1.0
    info = json.loads((run / "run_info.json").read_text())
    assert info["data"]["format"] == fmt
