"""Tests of metrics.py against hand-computed values, a brute-force reference and MedPy.

    python -m pytest tests/test_metrics.py -q
"""
import json
import math

import numpy as np
import pandas as pd
import pytest
from scipy import ndimage

from semiseg.evaluation import metrics


def square(shape=(32, 32), top=8, left=8, side=8):
    mask = np.zeros(shape, dtype=bool)
    mask[top:top + side, left:left + side] = True
    return mask


def blob(shape, seed, level=0.6):
    """A few smooth random blobs: a thresholded, smoothed noise field."""
    noise = np.random.default_rng(seed).normal(size=shape)
    smooth = ndimage.gaussian_filter(noise, sigma=3)
    return smooth > level * smooth.std()


def brute_force_distances(pred, truth, spacing):
    """Reference without erosion or EDT: a surface voxel is a foreground voxel with a
    face-neighbour outside the mask (or outside the array); distances by all pairs."""
    def surface_points(mask):
        padded = np.pad(mask, 1)
        boundary = np.zeros_like(padded)
        for axis in range(mask.ndim):
            for step in (-1, 1):
                boundary |= padded & ~np.roll(padded, step, axis=axis)
        inner = tuple(slice(1, -1) for _ in range(mask.ndim))
        return np.argwhere(boundary[inner]) * np.asarray(spacing, dtype=float)

    a, b = surface_points(pred), surface_points(truth)
    pairwise = np.sqrt(((a[:, None, :] - b[None, :, :]) ** 2).sum(-1))
    return pairwise.min(axis=1), pairwise.min(axis=0)


def test_square_shifted_by_k_has_known_dice_iou_and_hausdorff():
    truth = square(side=8)
    for k in (1, 3, 5):
        pred = np.roll(truth, k, axis=0)
        result = metrics.case_metrics(pred, truth)
        # Overlap 8*(8-k) of two 8x8 squares.
        assert result["dice"] == pytest.approx((8 - k) / 8)
        assert result["iou"] == pytest.approx((8 - k) / (8 + k))
        forward, backward = metrics.surface_distances(pred, truth)
        assert max(forward.max(), backward.max()) == pytest.approx(k)  # Hausdorff distance
        assert result["hd95"] <= k + 1e-12


def test_parallel_lines_have_all_distances_k_in_pixels_and_in_mm():
    truth = np.zeros((20, 12), dtype=bool)
    truth[5, 2:10] = True
    pred = np.roll(truth, 4, axis=0)  # every surface voxel is exactly 4 rows from the other line
    in_pixels = metrics.case_metrics(pred, truth)
    assert in_pixels["hd95"] == pytest.approx(4.0)
    assert in_pixels["asd"] == pytest.approx(4.0)
    assert in_pixels["dice"] == 0.0
    along_coarse_axis = metrics.case_metrics(pred, truth, spacing=(2.5, 0.7))
    assert along_coarse_axis["hd95"] == pytest.approx(2.5 * 4)
    assert along_coarse_axis["asd"] == pytest.approx(2.5 * 4)


def test_anisotropic_spacing_scales_only_the_shifted_axis():
    truth = square(side=8)
    pred = np.roll(truth, 3, axis=1)
    isotropic = metrics.case_metrics(pred, truth)
    # The Hausdorff distance runs along the shifted axis: row spacing leaves it alone,
    # column spacing scales it.
    forward, backward = metrics.surface_distances(pred, truth, spacing=(4.0, 1.0))
    assert max(forward.max(), backward.max()) == pytest.approx(3.0)
    forward, backward = metrics.surface_distances(pred, truth, spacing=(1.0, 2.5))
    assert max(forward.max(), backward.max()) == pytest.approx(2.5 * 3)
    # Isotropic spacing scales every distance, overlap metrics stay.
    scaled = metrics.case_metrics(pred, truth, spacing=2.0)
    assert scaled["hd95"] == pytest.approx(2 * isotropic["hd95"])
    assert scaled["asd"] == pytest.approx(2 * isotropic["asd"])
    assert scaled["dice"] == isotropic["dice"]


def test_all_foreground_prediction_uses_the_array_border_as_surface():
    pred = np.ones((6, 6), dtype=bool)
    truth = np.zeros((6, 6), dtype=bool)
    truth[:, :3] = True
    result = metrics.case_metrics(pred, truth)
    # Hand count: 20 border voxels of pred (10 on truth's surface, distances 1,2,1,2 on top and
    # bottom, 3 x 6 on the right column); truth's 14 surface voxels: 10 zeros and 1,2,2,1.
    assert result["asd"] == pytest.approx(30 / 34)
    assert result["hd95"] == pytest.approx(3.0)
    assert result["dice"] == pytest.approx(2 / 3)
    assert result["precision"] == pytest.approx(0.5)
    assert result["recall"] == result["sensitivity"] == 1.0
    assert result["specificity"] == 0.0  # truth has no negatives, pred is not identical
    both_full = metrics.case_metrics(pred, pred)
    assert both_full["specificity"] == 1.0 and both_full["hd95"] == 0.0


def test_both_empty_is_a_perfect_match():
    empty = np.zeros((9, 9), dtype=np.uint8)
    result = metrics.case_metrics(empty, empty)
    assert result == {"dice": 1.0, "iou": 1.0, "accuracy": 1.0, "precision": 1.0, "recall": 1.0,
                      "sensitivity": 1.0, "specificity": 1.0, "hd95": 0.0, "asd": 0.0}


def test_one_empty_mask_gives_zero_overlap_and_undefined_distances():
    truth = square(side=4)
    empty = np.zeros_like(truth)
    missed = metrics.case_metrics(empty, truth)
    assert missed["dice"] == 0.0 and missed["iou"] == 0.0
    assert missed["precision"] == 0.0 and missed["recall"] == 0.0
    assert missed["specificity"] == 1.0
    assert math.isnan(missed["hd95"]) and math.isnan(missed["asd"])
    hallucinated = metrics.case_metrics(truth, empty)
    assert hallucinated["dice"] == 0.0 and hallucinated["recall"] == 0.0
    assert math.isnan(hallucinated["hd95"])


def test_confusion_based_metrics_on_a_small_hand_example():
    truth = np.array([[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    pred = np.array([[1, 1, 1, 0], [0, 0, 0, 0], [0, 0, 0, 0]], dtype=np.uint8)
    result = metrics.case_metrics(pred, truth)  # TP 2, FP 1, FN 2, TN 7
    assert result["dice"] == pytest.approx(4 / 7)
    assert result["iou"] == pytest.approx(2 / 5)
    assert result["accuracy"] == pytest.approx(9 / 12)
    assert result["precision"] == pytest.approx(2 / 3)
    assert result["recall"] == pytest.approx(2 / 4)
    assert result["specificity"] == pytest.approx(7 / 8)


def test_3d_cube_shifted_through_slices_with_slice_spacing():
    truth = np.zeros((12, 10, 10), dtype=bool)
    truth[3:7, 2:8, 2:8] = True
    pred = np.roll(truth, 2, axis=0)
    result = metrics.case_metrics(pred, truth, spacing=(3.0, 0.8, 0.8))
    assert result["dice"] == pytest.approx(2 / 4)
    forward, backward = metrics.surface_distances(pred, truth, spacing=(3.0, 0.8, 0.8))
    assert max(forward.max(), backward.max()) == pytest.approx(2 * 3.0)


@pytest.mark.parametrize("shape, spacing", [((40, 48), (1.0, 1.0)), ((40, 48), (0.5, 2.0)),
                                            ((14, 20, 18), (2.5, 0.7, 0.9))])
def test_distances_match_a_brute_force_reference_on_random_blobs(shape, spacing):
    pred, truth = blob(shape, seed=1), blob(shape, seed=2)
    forward, backward = metrics.surface_distances(pred, truth, spacing)
    ref_forward, ref_backward = brute_force_distances(pred, truth, spacing)
    np.testing.assert_allclose(np.sort(forward), np.sort(ref_forward), atol=1e-9)
    np.testing.assert_allclose(np.sort(backward), np.sort(ref_backward), atol=1e-9)
    both = np.concatenate([ref_forward, ref_backward])
    result = metrics.case_metrics(pred, truth, spacing)
    assert result["hd95"] == pytest.approx(np.percentile(both, 95))
    assert result["asd"] == pytest.approx(both.mean())


def test_cropping_to_the_masks_does_not_change_distances():
    small = blob((24, 24), seed=3)
    other = blob((24, 24), seed=4)
    big_pred = np.zeros((100, 90), dtype=bool)
    big_truth = np.zeros((100, 90), dtype=bool)
    big_pred[30:54, 40:64], big_truth[30:54, 40:64] = small, other
    big = metrics.case_metrics(big_pred, big_truth, (0.6, 1.3))
    alone = metrics.case_metrics(small, other, (0.6, 1.3))
    for key in ("dice", "iou", "precision", "recall", "hd95", "asd"):
        assert big[key] == pytest.approx(alone[key])
    assert big["accuracy"] > alone["accuracy"]  # more true negatives around the blobs


def test_matches_medpy_on_random_blobs():
    binary = pytest.importorskip("medpy.metric.binary",
                                 reason="medpy not installed (pip install -r requirements-dev.txt)")
    for shape, spacing in [((40, 48), (0.5, 2.0)), ((14, 20, 18), (2.5, 0.7, 0.9))]:
        for seed in range(3):
            pred, truth = blob(shape, seed=10 + seed), blob(shape, seed=20 + seed)
            result = metrics.case_metrics(pred, truth, spacing)
            assert result["dice"] == pytest.approx(binary.dc(pred, truth))
            assert result["hd95"] == pytest.approx(binary.hd95(pred, truth, voxelspacing=spacing))
            forward, backward = metrics.surface_distances(pred, truth, spacing)
            # medpy.asd is one directed mean; medpy>=0.5 assd is the mean over both sets.
            assert forward.mean() == pytest.approx(binary.asd(pred, truth, voxelspacing=spacing))
            assert backward.mean() == pytest.approx(binary.asd(truth, pred, voxelspacing=spacing))
            assert result["asd"] == pytest.approx(binary.assd(pred, truth, voxelspacing=spacing))


def test_bad_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match=r"\(4, 4\).*\(4, 5\)"):
        metrics.case_metrics(np.zeros((4, 4)), np.zeros((4, 5)))
    with pytest.raises(ValueError, match="2D or 3D"):
        metrics.case_metrics(np.zeros(4), np.zeros(4))
    with pytest.raises(ValueError, match="binary"):
        metrics.case_metrics(np.full((4, 4), 0.7), np.zeros((4, 4)))
    with pytest.raises(ValueError, match="spacing"):
        metrics.case_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="spacing"):
        metrics.case_metrics(np.zeros((4, 4)), np.zeros((4, 4)), spacing=(1.0, 0.0))


def test_aggregate_excludes_and_counts_undefined_distances():
    rows = [dict(metrics.case_metrics(np.roll(square(), k, axis=0), square()), case_id=f"c{k}")
            for k in (0, 2)]
    rows.append(dict(metrics.case_metrics(np.zeros((32, 32)), square()), case_id="missed"))
    payload = metrics.aggregate(rows)
    assert set(payload) == {*metrics.METRIC_KEYS, "n_cases", "n_distance_undefined", "std", "median"}
    assert payload["n_cases"] == 3 and payload["n_distance_undefined"] == 1
    assert payload["dice"] == pytest.approx((1 + 6 / 8 + 0) / 3)
    assert payload["median"]["dice"] == pytest.approx(6 / 8)
    assert payload["std"]["dice"] == pytest.approx(np.std([1, 6 / 8, 0], ddof=1))
    assert payload["hd95"] == pytest.approx((0 + rows[1]["hd95"]) / 2)  # NaN left out, not 0
    assert payload["std"]["asd"] == pytest.approx(np.std([0, rows[1]["asd"]], ddof=1))
    json.dumps(payload, allow_nan=False)


def test_aggregate_all_distances_undefined_gives_null_and_one_case_no_std():
    row = metrics.case_metrics(np.zeros((8, 8)), square((8, 8), 2, 2, 3))
    payload = metrics.aggregate([row])
    assert payload["hd95"] is None and payload["median"]["asd"] is None
    assert payload["std"]["dice"] is None  # a sample std needs two cases
    assert payload["dice"] == 0.0
    with pytest.raises(ValueError, match="at least one"):
        metrics.aggregate([])
    with pytest.raises(ValueError, match="hd95"):
        metrics.aggregate([{k: 1.0 for k in metrics.METRIC_KEYS if k != "hd95"}])


def test_written_files_round_trip(tmp_path):
    rows = [dict(case_id="a", **metrics.case_metrics(square(), square())),
            dict(case_id="b", **metrics.case_metrics(np.zeros((32, 32)), square()))]
    csv_path = metrics.write_per_case_csv(tmp_path / "run" / "per_case.csv", rows)
    table = pd.read_csv(csv_path)
    assert list(table.columns) == ["case_id", *metrics.METRIC_KEYS]
    assert table["dice"].tolist() == [1.0, 0.0]
    assert table["hd95"].isna().tolist() == [False, True]
    payload = dict(metrics.aggregate(rows), split="test", model="student", distance_unit="px",
                   extra=np.float32(np.nan))
    json_path = metrics.write_metrics_json(tmp_path / "run" / "metrics.json", payload)
    loaded = json.loads(json_path.read_text())
    assert loaded["n_distance_undefined"] == 1 and loaded["extra"] is None
    assert loaded["split"] == "test" and loaded["dice"] == 0.5
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["metrics.json", "per_case.csv"]
    with pytest.raises(ValueError, match="case_id"):
        metrics.write_per_case_csv(tmp_path / "x.csv", [{"dice": 1.0}])
