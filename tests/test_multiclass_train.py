"""Every method trains, validates, evaluates and predicts with C = 4 classes (background + RV, MYO,
LV) on a tiny cardiac-like `folders` NIfTI set built here; multi-class predict writes label maps.

    python -m pytest tests/test_multiclass_train.py -q

The set: 32x32x4 MRI-like volumes, each slice an RV crescent (label 1), a myocardium ring (2)
around an LV disc (3), at a position varying per case. Runs use the smoke_multiclass preset's
network and schedule, with the classes and labels above and data.hide_labels=true, so the methods'
pseudo-label probes (pseudo_dice_<class>) run too.
"""
import csv
import json

import nibabel as nib
import numpy as np
import pytest

from semiseg import cli as main

CLASSES = ["RV", "MYO", "LV"]
METHODS = ["supervised", "mean_teacher", "mixmatch", "mira_u"]


def heart_case(seed: int, size: int = 32, depth: int = 4):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    labels = np.zeros((size, size, depth), np.uint8)
    cy, cx = rng.integers(12, 20, 2)
    for z in range(depth):
        r = 4 + z % 2
        d = np.hypot(yy - cy, xx - cx)
        labels[..., z][np.hypot(yy - cy, xx - cx - 2 * r - 1) < r] = 1      # RV beside the ring
        labels[..., z][(d >= r) & (d < r + 2)] = 2
        labels[..., z][d < r] = 3
    image = rng.normal(100, 10, labels.shape) + np.select([labels == 1, labels == 2, labels == 3], [300, 180, 400], 0)
    return image.astype(np.float32), labels


def write(path, data, affine):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(data, affine), str(path))


AFFINE = np.array([[1.5, 0, 0, -20.0], [0, 1.5, 0, 10.0], [0, 0, 8.0, 3.0], [0, 0, 0, 1]])


@pytest.fixture(scope="module")
def heart_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("heart")
    for subset, n in (("train", 6), ("val", 2), ("test", 2)):
        for i in range(n):
            image, labels = heart_case(i + 100 * len(subset))
            write(root / "images" / subset / f"{subset}{i}.nii.gz", image, AFFINE)
            write(root / "labels" / subset / f"{subset}{i}.nii.gz", labels, AFFINE)
    return root


def train(method, data, out, *extra):
    args = ["train", "--method", method, "--preset", "smoke_multiclass", "--data", str(data), "--out", str(out),
            "--no-progress", "--set", "data.format=folders", "data.modality=mri", "data.classes=[RV,MYO,LV]",
            "data.label_set=[1,2,3]", "data.hide_labels=true", "data.labeled_fraction=0.5", *extra]
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
    assert len(rows) == 2 and {"dice_RV", "dice_MYO", "dice_LV", "asd_LV"} <= set(rows[0])
    for row in rows:
        assert float(row["dice"]) == pytest.approx(np.mean([float(row[f"dice_{c}"]) for c in CLASSES]))
    history = read_csv(run / "history.csv")
    assert "loss_sup_ce" in history[0] and "loss_bce" not in history[0]
    assert all(np.isfinite(float(r["loss"])) for r in history)
    if method != "supervised":
        probe = [float(history[-1][f"pseudo_dice_{c}"]) for c in CLASSES]
        assert float(history[-1]["pseudo_dice"]) == pytest.approx(np.mean(probe), abs=1e-5)
    if method == "mira_u":      # --uncertainty: the MC std of the predicted class's probability, per voxel
        src = heart_data / "images" / "test" / "test0.nii.gz"
        assert main.main(["predict", str(run), str(src), str(tmp_path / "m.nii.gz"), "--uncertainty", "--no-progress"]) == 0
        sigma = nib.load(str(tmp_path / "m_uncertainty.nii.gz")).get_fdata()
        assert sigma.shape == (32, 32, 4) and 0.0 <= sigma.min() and sigma.max() <= 0.5
    # Validation Dice (sharded counts, every epoch) is the same score evaluate gives on val.
    assert main.main(["evaluate", str(run), "--split", "val", "--no-progress"]) == 0
    val = json.loads(next((run / "eval").rglob("metrics.json")).read_text())
    best = max(float(r["val_dice"]) for r in history)
    assert val["dice"] == pytest.approx(best, abs=1e-5)


def test_multiclass_predict_writes_label_maps(heart_data, tmp_path):
    from PIL import Image
    from semiseg.evaluation.predict import Predictor, write_mask_picture, LABEL_PALETTE
    run = train("supervised", heart_data, tmp_path / "sup", "train.epochs=4", "train.lr=0.01")
    src = heart_data / "images" / "test" / "test0.nii.gz"
    out = tmp_path / "pred.nii.gz"
    assert main.main(["predict", str(run), str(src), str(out), "--save-probabilities", "--tta", "--no-progress"]) == 0
    mask = nib.load(str(out))
    np.testing.assert_allclose(mask.affine, AFFINE)
    data = np.asarray(mask.dataobj)
    assert data.shape == (32, 32, 4) and data.dtype == np.uint8 and set(np.unique(data)) <= {0, 1, 2, 3}
    prob = nib.load(str(tmp_path / "pred_prob.nii.gz")).get_fdata()
    assert prob.shape == (32, 32, 4, 4)
    np.testing.assert_allclose(prob.sum(-1), 1.0, atol=1e-4)
    np.testing.assert_array_equal(prob.argmax(-1), data)          # the label map is the argmax
    # The Python API: class probabilities [H, W, C]; labels() is their argmax.
    predictor = Predictor(run)
    image = nib.load(str(src)).get_fdata()[..., 0]
    p = predictor.predict_slices(((image - image.min()) / (image.max() - image.min()))[None, ..., None].astype(np.float32))
    assert p.shape == (1, 32, 32, 4) and predictor.labels(p).max() <= 3
    # Pictures: a palette PNG whose pixel values are the class indices.
    labels = np.arange(4, dtype=np.uint8).repeat(4).reshape(4, 4)
    write_mask_picture(labels, tmp_path / "labels.png", multiclass=True)
    picture = Image.open(tmp_path / "labels.png")
    assert picture.mode == "P"
    np.testing.assert_array_equal(np.asarray(picture), labels)
    assert picture.getpalette()[:12] == [c for rgb in LABEL_PALETTE[:4] for c in rgb]
