"""Segmentation metrics on binary masks and multi-class label maps, their aggregation over cases, and the files they go to.

Plain NumPy/SciPy (no TensorFlow), so runs can be scored and re-scored anywhere:

    python -c "import numpy as np, metrics; a = np.zeros((32, 32), bool); a[8:16, 8:16] = 1; \
print(metrics.case_metrics(np.roll(a, 3, axis=0), a, spacing=(0.5, 0.5)))"

Per case (`case_metrics`): Dice, IoU, accuracy, precision, recall (= sensitivity), specificity,
HD95 and ASD. A 3D case is scored as one volume (slices stacked back) with its voxel spacing in
mm; a 2D image in pixels unless a spacing is given. Over cases (`aggregate`): mean, std, median
and counts, the payload of `metrics.json`; `write_per_case_csv` writes `per_case.csv`.

Definitions (see docs/evaluation.md):
- Overlap metrics from the confusion counts TP, FP, FN, TN of the two masks.
  Dice = 2TP/(2TP+FP+FN), IoU = TP/(TP+FP+FN), precision = TP/(TP+FP),
  recall = sensitivity = TP/(TP+FN), specificity = TN/(TN+FP), accuracy = (TP+TN)/N.
  A ratio whose denominator is 0 is 1 when the two masks are identical and 0 otherwise
  (both empty: everything is 1; an empty prediction of a non-empty truth has precision 0).
- Surface of a mask: its voxels that 1-connectivity erosion removes (mask XOR eroded mask),
  with everything outside the array counting as background, so an all-foreground mask has the
  array border as its surface.
- Directed surface distances A->B: for each surface voxel of A, the Euclidean distance (in the
  units of `spacing`) to the nearest surface voxel of B.
- HD95: the 95th percentile (linear interpolation) of the union of both directed sets, the
  MedPy `hd95` definition.
- ASD (average symmetric surface distance): the mean over the union of both directed sets
  (Heimann et al. 2009), so each surface voxel counts once; MedPy 0.5's `assd` is the same.
  (MedPy 0.4 averaged the two directed means; they differ when the surfaces differ in size.)
- Both masks empty: Dice = IoU = 1, HD95 = ASD = 0. Exactly one empty: Dice = IoU = 0 and
  HD95 = ASD = NaN (undefined), which `aggregate` excludes from its statistics and counts.
- Multi-class label maps (`multiclass_case_metrics`): every class 1..K scored as its own binary
  pair with the rules above (per class), keys `<metric>_<class name>`, and the plain keys the mean
  over the K classes.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
from scipy import ndimage

from semiseg.runs import atomic_write

METRIC_KEYS = ("dice", "iou", "accuracy", "precision", "recall", "sensitivity", "specificity",
               "hd95", "asd")
DISTANCE_KEYS = ("hd95", "asd")


def _as_binary_mask(mask, name: str) -> np.ndarray:
    array = np.asarray(mask)
    if array.dtype == bool:
        return array
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must be a binary mask (bool or 0/1 values); found values "
                         f"{np.unique(array)[:5].tolist()}...: threshold probabilities first")
    return array.astype(bool)


def _check_pair(pred, truth) -> tuple[np.ndarray, np.ndarray]:
    pred_shape, truth_shape = np.shape(pred), np.shape(truth)
    if pred_shape != truth_shape or len(pred_shape) not in (2, 3):
        raise ValueError(f"pred and truth must be 2D or 3D masks of equal shape; got pred shape "
                         f"{pred_shape} and truth shape {truth_shape}")
    return _as_binary_mask(pred, "pred"), _as_binary_mask(truth, "truth")


def _check_spacing(spacing, ndim: int) -> tuple[float, ...]:
    if spacing is None:
        return (1.0,) * ndim
    values = np.asarray(spacing, dtype=float)
    if values.ndim == 0:  # one number: isotropic voxels
        values = np.full(ndim, float(values))
    if values.shape != (ndim,) or not np.all(values > 0) or not np.all(np.isfinite(values)):
        raise ValueError(f"spacing must be one positive size per axis ({ndim} values); "
                         f"got {spacing!r}")
    return tuple(float(v) for v in values)


def _ratio(numerator: int, denominator: int, identical: bool) -> float:
    # 0/0 means the quantity has nothing to measure (e.g. precision of an empty prediction):
    # we call it perfect only if the masks agree everywhere, else a failure.
    if denominator == 0:
        return 1.0 if identical else 0.0
    return numerator / denominator


def surface(mask: np.ndarray) -> np.ndarray:
    """Boundary voxels of a boolean mask: mask XOR its 1-connectivity erosion, border = background."""
    structure = ndimage.generate_binary_structure(mask.ndim, 1)
    # Pad with background so foreground touching the array edge is surface there too.
    padded = np.pad(mask, 1, constant_values=False)
    eroded = ndimage.binary_erosion(padded, structure=structure, border_value=0)
    inner = tuple(slice(1, -1) for _ in range(mask.ndim))
    return padded[inner] & ~eroded[inner]


def surface_distances(pred, truth, spacing=None) -> tuple[np.ndarray, np.ndarray]:
    """Directed surface distances (pred->truth, truth->pred); both masks must be non-empty.

    Works on the bounding box of both masks plus one voxel: every surface voxel lies inside it,
    so the nearest-surface distances are exactly those of the full array, at a fraction of the
    cost for a small structure in a large volume.
    """
    pred, truth = _check_pair(pred, truth)
    sampling = _check_spacing(spacing, pred.ndim)
    if not pred.any() or not truth.any():
        raise ValueError("surface distances need two non-empty masks; "
                         f"pred has {int(pred.sum())} and truth {int(truth.sum())} voxels")
    union = pred | truth
    box = []
    for axis in range(union.ndim):
        other_axes = tuple(a for a in range(union.ndim) if a != axis)
        present = np.flatnonzero(union.any(axis=other_axes))
        box.append(slice(present[0], present[-1] + 1))
    box = tuple(box)
    # Cropping exactly to the union's box is safe because `surface` pads with background,
    # which is what lies outside the box in the full array.
    pred_surface, truth_surface = surface(pred[box]), surface(truth[box])
    to_truth = ndimage.distance_transform_edt(~truth_surface, sampling=sampling)
    to_pred = ndimage.distance_transform_edt(~pred_surface, sampling=sampling)
    return to_truth[pred_surface], to_pred[truth_surface]


def case_metrics(pred, truth, spacing=None) -> dict:
    """All metrics of one case (2D or 3D binary masks of equal shape) as a dict of floats.

    Keys: dice, iou, accuracy, precision, recall, sensitivity, specificity, hd95, asd.
    `spacing` is the voxel size per axis (mm), or None to measure distances in pixels.
    """
    pred, truth = _check_pair(pred, truth)
    sampling = _check_spacing(spacing, pred.ndim)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    tn = pred.size - tp - fp - fn
    identical = fp == 0 and fn == 0
    recall = _ratio(tp, tp + fn, identical)
    result = {
        "dice": _ratio(2 * tp, 2 * tp + fp + fn, identical),
        "iou": _ratio(tp, tp + fp + fn, identical),
        "accuracy": (tp + tn) / pred.size,
        "precision": _ratio(tp, tp + fp, identical),
        "recall": recall,
        "sensitivity": recall,
        "specificity": _ratio(tn, tn + fp, identical),
    }
    pred_empty, truth_empty = tp + fp == 0, tp + fn == 0
    if pred_empty and truth_empty:
        result.update(hd95=0.0, asd=0.0)
    elif pred_empty or truth_empty:
        result.update(hd95=math.nan, asd=math.nan)
    else:
        forward, backward = surface_distances(pred, truth, sampling)
        both = np.concatenate([forward, backward])
        result.update(hd95=float(np.percentile(both, 95)), asd=float(both.mean()))
    return result


def class_key(key: str, name: str) -> str:
    """The per-class name of a metric: dice + 'LV' -> 'dice_LV' (metrics.json, per_case.csv)."""
    return f"{key}_{name}"


def multiclass_case_metrics(pred, truth, class_names, spacing=None) -> dict:
    """Metrics of one case of integer label maps (0 = background, class i = class_names[i - 1]).

    Each class c is scored as the binary pair (pred == c, truth == c) by `case_metrics`, with the
    empty-structure rule per class (both empty: Dice 1, distances 0; one empty: Dice 0, distances
    NaN); keys `<metric>_<name>`. The plain keys (`dice`, `hd95`, ...) hold the mean over the
    classes, NaN distances left out (NaN only when every class's distance is undefined)."""
    pred, truth = np.asarray(pred), np.asarray(truth)
    if pred.shape != truth.shape or pred.ndim not in (2, 3):
        raise ValueError(f"pred and truth must be 2D or 3D label maps of equal shape; got pred shape "
                         f"{pred.shape} and truth shape {truth.shape}")
    n = len(class_names)
    for name, array in (("pred", pred), ("truth", truth)):
        bad = np.setdiff1d(np.unique(array), np.arange(n + 1))
        if bad.size:
            raise ValueError(f"{name} holds values {bad[:5].tolist()} outside the classes 0..{n} "
                             f"(0 = background, {', '.join(class_names)})")
    result, per_class = {}, []
    for index, name in enumerate(class_names, start=1):
        scores = case_metrics(pred == index, truth == index, spacing)
        per_class.append(scores)
        result.update({class_key(k, name): v for k, v in scores.items()})
    means = {}
    for key in METRIC_KEYS:
        values = np.array([scores[key] for scores in per_class], dtype=float)
        values = values[~np.isnan(values)]
        means[key] = float(values.mean()) if values.size else math.nan
    # Column order: the means, then metric by metric each class (dice_RV, dice_MYO, dice_LV, iou_RV, ...).
    return {**means, **{k: result[k] for k in per_class_keys(class_names)}}


def per_class_keys(class_names) -> list[str]:
    """per_case.csv's per-class columns, metric by metric: dice_<each class>, iou_<each class>, ..."""
    return [class_key(k, name) for k in METRIC_KEYS for name in class_names]


def _json_number(value):
    value = float(value)
    return None if math.isnan(value) or math.isinf(value) else value


def aggregate(rows: list[dict], class_names=None) -> dict:
    """The metrics.json payload for per-case rows from `case_metrics` (extra keys are ignored).

    For each metric key: the mean over cases; "std" (sample std, ddof=1) and "median" hold the
    same keys. NaN distances (one mask empty) are left out of mean/std/median; their count is
    "n_distance_undefined". Statistics without values are None (JSON null).

    Multi-class (`class_names`, rows from `multiclass_case_metrics`): the same statistics for every
    `<metric>_<class>` key, and each plain key's mean becomes the mean over the classes of the
    per-class means (the ACDC tables' "mean" column; for Dice it equals the mean of the rows'
    class means, for distances each class leaves out its own undefined cases). std and median of a
    plain key are over the rows' class means. `n_distance_undefined_<class>` counts per class.
    """
    if not rows:
        raise ValueError("aggregate needs at least one case row; got none")
    class_names = list(class_names or [])
    payload, std, median = {}, {}, {}
    for key in list(METRIC_KEYS) + per_class_keys(class_names):
        missing = [i for i, row in enumerate(rows) if key not in row]
        if missing:
            raise ValueError(f"case row {missing[0]} has no metric {key!r}")
        values = np.array([row[key] for row in rows], dtype=float)
        values = values[~np.isnan(values)]
        payload[key] = _json_number(values.mean()) if values.size else None
        std[key] = _json_number(values.std(ddof=1)) if values.size > 1 else None
        median[key] = _json_number(np.median(values)) if values.size else None
    for key in METRIC_KEYS if class_names else ():
        means = [payload[class_key(key, name)] for name in class_names]
        means = [m for m in means if m is not None]
        payload[key] = _json_number(np.mean(means)) if means else None
    payload["n_cases"] = len(rows)
    payload["n_distance_undefined"] = int(sum(math.isnan(float(row["hd95"])) for row in rows))
    for name in class_names:
        payload[f"n_distance_undefined_{name}"] = int(sum(math.isnan(float(row[class_key("hd95", name)]))
                                                          for row in rows))
    payload["std"] = std
    payload["median"] = median
    return payload


def _write_atomically(path, write) -> Path:
    # A crash or a killed job never leaves a half-written file that a later step would trust.
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    stream = io.StringIO(newline="")
    write(stream)
    return atomic_write.write_text(path, stream.getvalue())


def write_per_case_csv(path, rows: list[dict]) -> Path:
    """Write per_case.csv: case_id, the nine metrics, then any extra keys; NaN is written 'nan'."""
    for index, row in enumerate(rows):
        if "case_id" not in row:
            raise ValueError(f"{path}: case row {index} has no 'case_id'")
    extra = [key for row in rows for key in row if key != "case_id" and key not in METRIC_KEYS]
    columns = ["case_id", *METRIC_KEYS, *dict.fromkeys(extra)]

    def write(stream):
        writer = csv.DictWriter(stream, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({key: (repr(float(value)) if isinstance(value, (float, np.floating))
                                   else value) for key, value in row.items()})
    return _write_atomically(path, write)


def _json_safe(value):
    if isinstance(value, dict):
        return {str(key): _json_safe(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(item) for item in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return _json_number(value)
    return value


def write_metrics_json(path, payload: dict) -> Path:
    """Write metrics.json (NaN/inf become null, NumPy scalars plain numbers)."""
    text = json.dumps(_json_safe(payload), indent=2, allow_nan=False) + "\n"
    return _write_atomically(path, lambda stream: stream.write(text))
