"""Every method trains, validates, evaluates and predicts with C = 4 classes (background + RV, MYO,
LV) on the tests' tiny ACDC layout (tests/data_layouts.make_acdc); multi-class predict writes label
maps.

    python -m pytest tests/test_multiclass_train.py -q

Runs use the smoke_multiclass preset's network and schedule with ACDC's classes, a split file by
patient, and data.hide_labels=true, so the methods' pseudo-label probes (pseudo_dice_<class>) run
too. Beyond tests/test_acdc.py's smoke runs, these check the files' per-class columns, the probe's,
that validation Dice (sharded, every epoch) equals `evaluate --split val`, and predict.
"""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from semiseg import cli as main
from semiseg import config
from data_layouts import make_acdc

CLASSES = ["RV", "MYO", "LV"]
METHODS = list(config.METHODS)      # every registered method, new ones included


AFFINE = np.array([[-1.5625, 0, 0, 180.0], [0, -1.5625, 0, 150.0], [0, 0, 10.0, -40.0], [0, 0, 0, 1]])  # make_acdc's


@pytest.fixture(scope="module")
def heart_data(tmp_path_factory):
    """Eight patients of the test ACDC generator (ED + ES frames each), a fixed split by patient."""
    root = make_acdc(tmp_path_factory.mktemp("heart") / "ACDC", patients=range(1, 9), shape=(16, 16, 3))
    (root / "split.yaml").write_text("train: [patient001, patient002, patient003, patient004, patient005]\n"
                                     "val: [patient006]\ntest: [patient007, patient008]\n")
    return root


def frame_path(root):
    return root / "training" / "patient007" / "patient007_frame01.nii.gz"


def train(method, data, out, *extra):
    args = ["train", "--method", method, "--preset", "smoke_multiclass", "--data", str(data), "--out", str(out),
            "--no-progress", "--set", "data.format=acdc", "data.classes=[RV,MYO,LV]", "data.label_set=[1,2,3]",
            f"data.split_file={data / 'split.yaml'}", "data.labeled_cases=2", "data.image_size=16",
            "data.hide_labels=true", *extra]
    assert main.main(args) == 0
    return out


def read_csv(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_with_four_classes(method, heart_data, tmp_path):
    run = train(method, heart_data, tmp_path / method)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["classes"] == CLASSES
    per_class = [metrics[f"dice_{c}"] for c in CLASSES]
    assert all(0.0 <= d <= 1.0 for d in per_class)
    assert metrics["dice"] == pytest.approx(np.mean(per_class))
    assert {f"hd95_{c}" for c in CLASSES} <= set(metrics)
    rows = read_csv(run / "per_case.csv")
    assert len(rows) == 4 and {"dice_RV", "dice_MYO", "dice_LV", "asd_LV"} <= set(rows[0])
    for row in rows:
        assert float(row["dice"]) == pytest.approx(np.mean([float(row[f"dice_{c}"]) for c in CLASSES]))
    history = read_csv(run / "history.csv")
    assert "loss_sup_ce" in history[0] and "loss_bce" not in history[0]
    assert all(np.isfinite(float(r["loss"])) for r in history)
    if method != "supervised":
        probe = [float(history[-1][f"pseudo_dice_{c}"]) for c in CLASSES]
        assert float(history[-1]["pseudo_dice"]) == pytest.approx(np.mean(probe), abs=1e-5)
    if method == "mira_u":      # --uncertainty: the MC std of the predicted class's probability, per voxel
        src = frame_path(heart_data)
        assert main.main(["predict", str(run), str(src), str(tmp_path / "m.nii.gz"), "--uncertainty", "--no-progress"]) == 0
        sigma = nib.load(str(tmp_path / "m_uncertainty.nii.gz")).get_fdata()
        assert sigma.shape == (16, 16, 3) and 0.0 <= sigma.min() and sigma.max() <= 0.5
    # Validation Dice (sharded counts, every epoch) is the same score evaluate gives on val.
    assert main.main(["evaluate", str(run), "--split", "val", "--no-progress"]) == 0
    val = json.loads(next((run / "eval").rglob("metrics.json")).read_text())
    best = max(float(r["val_dice"]) for r in history)
    assert val["dice"] == pytest.approx(best, abs=1e-5)


def test_multiclass_predict_writes_label_maps(heart_data, tmp_path):
    from PIL import Image
    from semiseg.evaluation.predict import Predictor, write_mask_picture, LABEL_PALETTE
    run = train("supervised", heart_data, tmp_path / "sup", "train.epochs=4", "train.lr=0.01")
    src = frame_path(heart_data)
    out = tmp_path / "pred.nii.gz"
    assert main.main(["predict", str(run), str(src), str(out), "--save-probabilities", "--tta", "--no-progress"]) == 0
    mask = nib.load(str(out))
    np.testing.assert_allclose(mask.affine, AFFINE)
    data = np.asarray(mask.dataobj)
    assert data.shape == (16, 16, 3) and data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2, 3}
    prob = nib.load(str(tmp_path / "pred_prob.nii.gz")).get_fdata()
    assert prob.shape == (16, 16, 3, 4)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(prob.argmax(-1), data)          # the label map is the argmax
    # The Python API: class probabilities [H, W, C]; labels() is their argmax.
    predictor = Predictor(run)
    image = nib.load(str(src)).get_fdata()[..., 0]
    p = predictor.predict_slices(((image - image.min()) / (image.max() - image.min()))[None, ..., None].astype(np.float32))
    assert p.shape == (1, 16, 16, 4) and predictor.labels(p).max() <= 3
    # Pictures: a palette PNG whose pixel values are the class indices.
    labels = np.arange(4, dtype=np.uint8).repeat(4).reshape(4, 4)
    write_mask_picture(labels, tmp_path / "labels.png", multiclass=True)
    picture = Image.open(tmp_path / "labels.png")
    assert picture.mode == "P"
    np.testing.assert_array_equal(np.asarray(picture), labels)
    assert picture.getpalette()[:12] == [c for rgb in LABEL_PALETTE[:4] for c in rgb]
