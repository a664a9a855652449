"""Per-class metrics on tiny label maps (C = 4: background + RV, MYO, LV), against values computed
by hand, and the multi-class loss and sharpening against their formulas.

    python -m pytest tests/test_multiclass_metrics.py -q
"""
import math

import numpy as np
import pytest

from semiseg.evaluation import metrics

NAMES = ["RV", "MYO", "LV"]


def case_one():
    """RV: truth a 2x2 block, prediction its left column (TP 2, FN 2); MYO: exact; LV: absent in
    the truth, predicted at one pixel (the empty-structure rule: Dice 0, distances undefined)."""
    truth = np.zeros((6, 6), np.uint8)
    truth[0:2, 0:2] = 1
    truth[3:5, 3:5] = 2
    pred = np.zeros((6, 6), np.uint8)
    pred[0:2, 0] = 1
    pred[3:5, 3:5] = 2
    pred[5, 5] = 3
    return pred, truth


def test_multiclass_case_metrics_by_hand():
    pred, truth = case_one()
    # spacing (row 1 mm, column 2 mm): RV's truth pixels in column 1 lie 2 mm from the prediction.
    m = metrics.multiclass_case_metrics(pred, truth, NAMES, spacing=(1.0, 2.0))
    assert m["dice_RV"] == pytest.approx(2 / 3)                  # 2*2 / (2*2 + 0 + 2)
    assert m["iou_RV"] == pytest.approx(0.5)
    assert m["precision_RV"] == 1.0 and m["recall_RV"] == 0.5
    assert m["accuracy_RV"] == pytest.approx(34 / 36) and m["specificity_RV"] == 1.0
    # surface distances: pred->truth 0, 0; truth->pred 0, 0, 2, 2 -> sorted [0,0,0,0,2,2]
    assert m["hd95_RV"] == pytest.approx(2.0)                   # 95th percentile, linear: between the two 2s
    assert m["asd_RV"] == pytest.approx(4 / 6)
    assert (m["dice_MYO"], m["iou_MYO"], m["hd95_MYO"], m["asd_MYO"]) == (1.0, 1.0, 0.0, 0.0)
    assert (m["dice_LV"], m["iou_LV"], m["precision_LV"], m["recall_LV"]) == (0.0, 0.0, 0.0, 0.0)
    assert m["specificity_LV"] == pytest.approx(35 / 36)
    assert math.isnan(m["hd95_LV"]) and math.isnan(m["asd_LV"])
    # plain keys: the mean over the three classes, undefined distances left out
    assert m["dice"] == pytest.approx((2 / 3 + 1 + 0) / 3)
    assert m["hd95"] == pytest.approx((2.0 + 0.0) / 2)
    assert m["asd"] == pytest.approx((4 / 6 + 0.0) / 2)
    assert list(m)[:9] == list(metrics.METRIC_KEYS)
    assert list(m)[9:12] == ["dice_RV", "dice_MYO", "dice_LV"]


def test_multiclass_aggregate_mean_of_class_means():
    pred, truth = case_one()
    row1 = {"case_id": "a", **metrics.multiclass_case_metrics(pred, truth, NAMES, spacing=(1.0, 2.0))}
    perfect = np.zeros((6, 6), np.uint8)
    perfect[0:3, 0:3] = 1
    perfect[4:6, 4:6] = 3                                       # MYO absent in both: Dice 1, HD95 0
    row2 = {"case_id": "b", **metrics.multiclass_case_metrics(perfect, perfect, NAMES, spacing=(1.0, 2.0))}
    agg = metrics.aggregate([row1, row2], NAMES)
    assert agg["dice_RV"] == pytest.approx((2 / 3 + 1) / 2)
    assert agg["dice_MYO"] == 1.0
    assert agg["dice_LV"] == pytest.approx(0.5)
    assert agg["dice"] == pytest.approx(((2 / 3 + 1) / 2 + 1 + 0.5) / 3)
    assert agg["hd95_LV"] == 0.0                                # case a's undefined distance left out
    assert agg["n_distance_undefined_LV"] == 1 and agg["n_distance_undefined_RV"] == 0
    assert agg["hd95"] == pytest.approx((1.0 + 0.0 + 0.0) / 3)
    assert agg["n_cases"] == 2 and agg["std"]["dice_RV"] == pytest.approx(np.std([2 / 3, 1], ddof=1))


def test_multiclass_metrics_3d_and_bad_values(tmp_path):
    pred, truth = case_one()
    vol_p, vol_t = np.stack([pred, pred]), np.stack([truth, truth])
    m = metrics.multiclass_case_metrics(vol_p, vol_t, NAMES, spacing=(3.0, 1.0, 2.0))
    assert m["dice_RV"] == pytest.approx(2 / 3) and m["hd95_RV"] == pytest.approx(2.0)
    with pytest.raises(ValueError, match=r"truth holds values \[7\]"):
        metrics.multiclass_case_metrics(pred, np.where(truth == 2, 7, truth), NAMES)
    rows = [{"case_id": "a", **metrics.multiclass_case_metrics(pred, truth, NAMES)}]
    path = metrics.write_per_case_csv(tmp_path / "per_case.csv", rows)
    header = path.read_text().splitlines()[0].split(",")
    assert header[:10] == ["case_id", *metrics.METRIC_KEYS] and "dice_LV" in header and "hd95_MYO" in header


def test_class_dice_argmax_and_binary():
    from semiseg.evaluation.evaluate import class_dice
    pred, truth = case_one()
    probs = np.eye(4, dtype=np.float32)[pred][None]             # one-hot "probabilities" [1, 6, 6, 4]
    np.testing.assert_allclose(class_dice(probs, truth[None]), [2 / 3, 1.0, 0.0])
    binary = class_dice((truth[None] > 0).astype(np.float32) * 0.9, (truth[None] > 0).astype(np.uint8))
    assert binary.tolist() == [1.0]


def test_sharpen_over_classes_and_multiclass_dice_loss():
    import tensorflow as tf
    from semiseg.methods.mixmatch.trainer import sharpen
    p = tf.constant([[[[0.5, 0.3, 0.2]]]])
    got = sharpen(p, 0.5, over_classes=True).numpy()[0, 0, 0]
    want = np.array([0.25, 0.09, 0.04]) / 0.38                  # p^2 / sum p^2
    np.testing.assert_allclose(got, want, rtol=1e-5)
    assert sharpen(tf.constant([[[[0.7]]]]), 0.5).numpy()[0, 0, 0, 0] == pytest.approx(0.49 / (0.49 + 0.09), rel=1e-5)
    # Dice loss over foreground classes 1..2 (background left out), one replica:
    # class 1: inter 1, |P| 1.5, |T| 1 -> Dice 0.8; class 2: inter 0.5, |P| 0.5, |T| 1 -> 2/3.
    from types import SimpleNamespace
    from semiseg.training.trainer import Trainer
    one_replica = SimpleNamespace(all_reduce_sum=lambda v: v, n_replicas=1)
    probs = tf.constant([[[[0.0, 1.0, 0.0], [0.0, 0.5, 0.5]]]])
    targets = tf.constant([[[[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]]])
    loss = float(Trainer.multiclass_dice_loss(one_replica, probs, targets))
    assert loss == pytest.approx(((1 - 0.8) + (1 - 2 / 3)) / 2, rel=1e-4)


def test_mira_u_multiclass_targets_and_entropy():
    """The pseudo label is the argmax of the MC mean; its confidence reads the std of that class."""
    import tensorflow as tf
    from semiseg.methods.mira_u.trainer import entropy_from_logits, multiclass_confidence_targets
    mu = tf.constant([[[[0.7, 0.2, 0.1], [0.1, 0.3, 0.6]]]])
    sigma = tf.constant([[[[0.05, 0.3, 0.3], [0.01, 0.02, 0.25]]]])
    w, keep, target = multiclass_confidence_targets(mu, sigma, kappa=0.5, tau_u=0.8)
    np.testing.assert_allclose(w.numpy()[0, 0, :, 0], [np.exp(-0.1), np.exp(-0.5)], rtol=1e-6)
    assert keep.numpy()[0, 0, :, 0].tolist() == [1.0, 0.0]            # exp(-0.5) = 0.61 < 0.8
    assert target.numpy()[0, 0].tolist() == [[1, 0, 0], [0, 0, 1]]
    ent = entropy_from_logits(tf.zeros([1, 1, 1, 4])).numpy()
    assert ent.shape == (1, 1, 1, 1) and ent[0, 0, 0, 0] == pytest.approx(np.log(4), rel=1e-6)
