"""check-data: each bad input gives a problem naming its file; fatal ones stop check-data and train."""
import numpy as np
import pytest
from PIL import Image

from semiseg import config
from semiseg.data import checks as data_checks
from semiseg.data import sources as data_sources
from semiseg import cli as main
from data_layouts import make_folders_png, make_isic, make_msd, write_nifti


def _report(root, fmt, **cfg):
    data_cfg = config.DataConfig(**cfg)
    cases = data_sources.get_source(fmt).list_cases(root, data_cfg)
    return data_checks.check_data(fmt, root, cases, data_cfg, workers=1)


def _problems(report, severity):
    return [(p.path, p.message) for p in report.problems if p.severity == severity]


def test_clean_msd_has_no_problems(tmp_path):
    report = _report(make_msd(tmp_path / "m", n=3), "msd")
    assert report.problems == [] and "4 cases, 3 with labels" in report.summary()


def test_label_shape_mismatch_stops_check_data_and_train(tmp_path, capsys):
    root = make_msd(tmp_path / "m", n=4)
    write_nifti(root / "labelsTr" / "pancreas_001.nii.gz", np.zeros((16, 16, 5), np.uint8),
                np.diag([0.8, 0.8, 2.5, 1.0]))
    (err,) = _report(root, "msd").errors
    assert "labelsTr/pancreas_001.nii.gz" in err.message and "imagesTr/pancreas_001.nii.gz" in err.message
    assert "(16, 16, 5)" in err.message and "(16, 16, 6)" in err.message
    assert main.main(["check-data", "--data", str(root), "--no-progress"]) == 2
    captured = capsys.readouterr()
    assert "labelsTr/pancreas_001.nii.gz" in captured.err and "imagesTr/pancreas_001.nii.gz" in captured.err
    run = tmp_path / "run"
    assert main.main(["train", "--preset", "smoke", "--data", str(root), "--out", str(run), "--no-progress"]) == 2
    assert "labelsTr/pancreas_001.nii.gz" in capsys.readouterr().err
    assert not run.exists()                                  # nothing was created


def test_affine_mismatch_truncation_nan_and_missing_files(tmp_path):
    root = make_msd(tmp_path / "m", n=5)
    _, labels = np.zeros((16, 16, 6)), np.zeros((16, 16, 6), np.uint8)
    labels[3:6, 3:6, 2] = 1
    write_nifti(root / "labelsTr" / "pancreas_000.nii.gz", labels, np.diag([0.8, 0.8, 3.0, 1.0]))
    image = root / "imagesTr" / "pancreas_001.nii.gz"
    image.write_bytes(image.read_bytes()[:200])             # a killed copy
    nan = np.zeros((16, 16, 6), np.float32)
    nan[0, 0, 0] = np.nan
    write_nifti(root / "imagesTr" / "pancreas_002.nii.gz", nan, np.diag([0.8, -0.8, -2.5, 1.0]))
    (root / "labelsTr" / "pancreas_003.nii.gz").unlink()
    errors = _problems(_report(root, "msd"), "error")
    text = "\n".join(f"{p} {m}" for p, m in errors)
    assert "different affines" in text and "labelsTr/pancreas_000.nii.gz" in text
    assert any("pancreas_001" in p and "unreadable" in m for p, m in errors)
    assert any("pancreas_002" in p and "1 NaN/Inf voxels" in m for p, m in errors)
    assert any("labelsTr/pancreas_003" in p and "not found" in m for p, m in errors)
    assert len(errors) == 4, text


def test_label_values_empty_masks_and_orphans(tmp_path):
    root = make_msd(tmp_path / "m", n=4)
    affine = np.diag([0.8, 0.8, 2.5, 1.0])
    three = np.zeros((16, 16, 6), np.uint8)
    three[2:4, 2:4, 1] = 3
    write_nifti(root / "labelsTr" / "pancreas_000.nii.gz", three, affine)
    write_nifti(root / "labelsTr" / "pancreas_002.nii.gz", np.full((16, 16, 6), 0.5, np.float32),
                np.diag([0.8, -0.8, -2.5, 1.0]))
    write_nifti(root / "labelsTr" / "stray_009.nii.gz", three, affine)
    report = _report(root, "msd")
    warnings = _problems(report, "warning")
    assert any("pancreas_000" in p and "[3] are not in data.label_set" in m for p, m in warnings)
    assert any("pancreas_000" in p and "empty mask" in m for p, m in warnings)
    assert any("stray_009" in p and "not listed in dataset.json" in m for p, m in warnings)
    assert any("pancreas_002" in p and "non-integer" in m for p, m in _problems(report, "error"))


def test_pictures_non_binary_empty_truncated_and_size_mismatch(tmp_path):
    root = make_isic(tmp_path / "isic", n=5, unlabeled=1)
    masks = root / "masks"
    grey = np.zeros((24, 24), np.uint8)
    grey[5:10, 5:10] = 128
    grey[10:12, 10:12] = 255
    Image.fromarray(grey).save(masks / "ISIC_0000000_segmentation.png")
    Image.fromarray(np.zeros((24, 24), np.uint8)).save(masks / "ISIC_0000001_Segmentation.png")
    Image.fromarray(np.zeros((20, 24), np.uint8)).save(masks / "ISIC_0000002_segmentation.png")
    jpg = root / "images" / "ISIC_0000003.jpg"
    jpg.write_bytes(jpg.read_bytes()[:300])
    Image.fromarray(grey).save(masks / "ISIC_0000077_segmentation.png")
    report = _report(root, "isic")
    warnings, errors = _problems(report, "warning"), _problems(report, "error")
    assert any("ISIC_0000000" in p and "not binary (3 grey levels" in m for p, m in warnings)
    assert any("ISIC_0000001" in p and "empty mask" in m for p, m in warnings)
    assert any("ISIC_0000077" in p and "mask without an image" in m for p, m in warnings)
    assert any("ISIC_0000005" in p and "without a label" in m for p, m in warnings)
    assert any("ISIC_0000002_segmentation.png" in m and "ISIC_0000002.jpg" in m and "(20, 24)" in m for _, m in errors)
    assert any("ISIC_0000003.jpg" in p and "truncated" in m for p, m in errors)
    assert len(errors) == 2


def test_spacing_outlier_and_channel_mismatch(tmp_path):
    root = make_msd(tmp_path / "m", n=4)
    hu = np.zeros((16, 16, 6), np.int16)
    write_nifti(root / "imagesTr" / "pancreas_003.nii.gz", hu, np.diag([0.8, 0.8, 10.0, 1.0]))
    labels = np.zeros((16, 16, 6), np.uint8)
    labels[1, 1, 1] = 1
    write_nifti(root / "labelsTr" / "pancreas_003.nii.gz", labels, np.diag([0.8, 0.8, 10.0, 1.0]))
    (warning,) = [(p, m) for p, m in _problems(_report(root, "msd"), "warning") if "spacing" in m]
    assert "pancreas_003" in warning[0] and "10.0" in warning[1]
    folders = make_folders_png(tmp_path / "f")
    Image.fromarray(np.zeros((24, 24, 3), np.uint8)).save(folders / "images" / "train" / "train0.png")
    (err,) = _report(folders, "folders").errors
    assert "train0.png" in err.path and "3 channels but most images have 1" in err.message


def test_workers_give_the_same_report(tmp_path):
    root = make_isic(tmp_path / "isic", n=3, unlabeled=1)
    data_cfg = config.DataConfig()
    cases = data_sources.list_isic_cases(root, data_cfg)
    one = data_checks.check_data("isic", root, cases, data_cfg, workers=1)
    from semiseg.data import workers as worker_pool
    chunks = [[c] for c in cases]
    two = worker_pool.run_tasks(data_checks.check_chunk, [(c, data_cfg) for c in chunks], 2, len(cases), "t", False)
    assert [r for part in two for r in part] == [(cid, [p for p in one.problems if cid in p.path and
                                                        "without a label" not in p.message], one.case_info[cid])
                                                for cid in [c.case_id for c in cases]]
