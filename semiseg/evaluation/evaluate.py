"""Evaluation: run a model over a split, stack slices back into cases, compute per-case metrics.

    python main.py evaluate RUN_DIR [--split test|val] [--tta]

Predictions are made slice by slice from the slice cache and regrouped per case (cache records of
one case are contiguous), so a CT volume is scored as one 3D case with its voxel spacing (in-plane
spacing scaled by the resize factor), and memory holds one case at a time.
Test-time augmentation averages the probabilities of the original and the h-, v- and hv-flipped
input, each flipped back before averaging.
Multi-class networks (C softmax channels, data.classes with K >= 2 names): the prediction is the
argmax label map, every metric is computed per class (`dice_<class>`, ...) and `dice` etc. are
their mean over the foreground classes; validation Dice is the same mean.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from semiseg.runs import atomic_write
from semiseg.evaluation import metrics

FLIPS = ((False, False), (True, False), (False, True), (True, True))   # (horizontal, vertical)


def make_predict_fn(model, tta: bool = False):
    """A tf.function: images [B,H,W,C] -> foreground probabilities [B,H,W] (float32) of a binary
    network, or class probabilities [B,H,W,C] (softmax) of a multi-class one. TTA averages the
    probabilities (softmax for multi-class), never logits."""
    import tensorflow as tf
    from semiseg.models.outputs import probabilities

    def squeeze(prob):          # binary: the one channel; multi-class: every class
        return prob if prob.shape[-1] > 1 else prob[..., 0]

    def flip(x, h, v):
        if h:
            x = tf.reverse(x, axis=[2])
        if v:
            x = tf.reverse(x, axis=[1])
        return x

    @tf.function(reduce_retracing=True)
    def predict(images):
        if not tta:
            return squeeze(probabilities(model(images, training=False)))
        total = 0.0
        for h, v in FLIPS:
            prob = probabilities(model(flip(images, h, v), training=False))
            total += flip(prob, h, v)          # flips are their own inverse
        return squeeze(total / len(FLIPS))

    return predict


def iterate_cases(predict, bundle, split: str | None = None, batch: int = 16, case_ids=None):
    """Yield (case_id, image [S,H,W,C], label [S,H,W] uint8, prob [S,H,W] or [S,H,W,C]) in cache order."""
    current, parts = None, []

    def emit():
        parts.sort(key=lambda p: p[0])
        image = np.stack([p[1] for p in parts])
        label = np.stack([p[2] for p in parts]).astype(np.uint8)
        prob = np.stack([p[3] for p in parts])
        return current, image, label, prob

    for batch_data in bundle.eval_dataset(split, batch, case_ids):
        probs = predict(batch_data["image"]).numpy()
        images = batch_data["image"].numpy()
        masks = batch_data["mask"].numpy()[..., 0]
        for i, case in enumerate(batch_data["case"].numpy()):
            case = case.decode()
            if case != current and parts:
                yield emit()
                parts = []
            current = case
            parts.append((int(batch_data["index"][i]), images[i], masks[i], probs[i]))
    if parts:
        yield emit()


def _dice(pred: np.ndarray, truth: np.ndarray) -> float:
    denom = pred.sum() + truth.sum()
    return 1.0 if denom == 0 else float(2.0 * np.logical_and(pred, truth).sum() / denom)


def class_dice(prob: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Dice per foreground class of one case: [1] for binary probabilities [S,H,W] (threshold
    0.5), [C - 1] for class probabilities [S,H,W,C] (argmax; classes 1..C-1)."""
    if prob.ndim == label.ndim:
        return np.array([_dice(prob >= 0.5, label > 0)])
    pred = prob.argmax(-1)
    return np.array([_dice(pred == c, label == c) for c in range(1, prob.shape[-1])])


def case_class_dice(predict, bundle, split: str = "val", batch: int = 16, case_ids=None) -> np.ndarray:
    """[cases, classes]: `class_dice` of every case (one column for binary)."""
    rows = [class_dice(prob, label) for _, _, label, prob in iterate_cases(predict, bundle, split, batch, case_ids)]
    return np.array(rows)


def mean_case_dice(predict, bundle, split: str = "val", batch: int = 16, case_ids=None) -> float:
    """Mean per-case Dice at threshold 0.5 (multi-class: argmax, mean over the foreground classes):
    the cheap score used for model selection each epoch. `predict` is a `make_predict_fn` result,
    made once per network so it is traced once."""
    scores = case_class_dice(predict, bundle, split, batch, case_ids)
    return float(np.mean(scores)) if len(scores) else float("nan")


class ShardedCaseDice:
    """Validation Dice on every replica of every worker: `score()` == `mean_case_dice` of one device.

    Each replica predicts its share of the slices (DataBundle.sharded_eval_dataset) and returns, per
    slice, (case, |P & T|, |P|, |T|) at threshold 0.5; `strategy.gather` brings them to every worker,
    where they are summed per case in float64 (exact: integer counts) and turned into per-case Dice.
    So the score does not depend on how slices were spread, and every worker gets the same value.
    Built once per network: its step is traced once and reused every epoch."""

    def __init__(self, strategy, model, bundle, split: str = "val", batch: int = 16):
        import tensorflow as tf
        self.strategy, self.bundle = strategy, bundle
        self.case_ids = sorted(bundle.splits[split])
        replicas = strategy.num_replicas_in_sync
        self.per_replica_batch = max(1, batch // replicas)
        self.steps = bundle.eval_steps(self.case_ids, self.per_replica_batch, replicas)
        self.dataset = strategy.distribute_datasets_from_function(
            lambda ctx: bundle.sharded_eval_dataset(self.case_ids, self.per_replica_batch, ctx))

        def replica_counts(batch):
            logits = model(batch["image"], training=False)
            if logits.shape[-1] > 1:        # multi-class: argmax, then one (|P&T|, |P|, |T|) per class 1..C-1
                pred = tf.one_hot(tf.argmax(logits, axis=-1), logits.shape[-1])[..., 1:]
                truth = tf.one_hot(tf.cast(tf.round(batch["mask"][..., 0]), tf.int32), logits.shape[-1])[..., 1:]
                sums = tf.concat([tf.reduce_sum(pred * truth, [1, 2]), tf.reduce_sum(pred, [1, 2]),
                                  tf.reduce_sum(truth, [1, 2])], axis=1)       # [b, 3K]: inter..., pred..., truth...
            else:
                prob = tf.sigmoid(tf.cast(logits, tf.float32))
                pred = tf.cast(prob >= 0.5, tf.float32)
                truth = tf.cast(batch["mask"] > 0, tf.float32)
                sums = tf.stack([tf.reduce_sum(pred * truth, [1, 2, 3]), tf.reduce_sum(pred, [1, 2, 3]),
                                 tf.reduce_sum(truth, [1, 2, 3])], axis=1)
            case = tf.where(batch["valid"], batch["case"], -1)
            return tf.concat([tf.cast(case, tf.float32)[:, None], sums], axis=1)      # [b, 1 + 3K]

        @tf.function
        def step(iterator):
            return strategy.gather(strategy.run(replica_counts, args=(next(iterator),)), axis=0)

        self._step = step

    def case_counts(self) -> np.ndarray:
        """[cases, 1 + 3K]: slices counted, then |P & T|, |P|, |T| of each of the K foreground classes
        (K = 1 for binary; grouped: K intersections, K prediction sizes, K truth sizes) per case of
        the split (sorted case ids)."""
        totals = None
        iterator = iter(self.dataset)
        for _ in range(self.steps):
            rows = self._step(iterator).numpy().astype(np.float64)
            if totals is None:
                totals = np.zeros((len(self.case_ids), rows.shape[1]))
            rows = rows[rows[:, 0] >= 0]                    # padding
            cases = rows[:, 0].astype(np.int64)
            np.add.at(totals, cases, np.concatenate([np.ones((len(rows), 1)), rows[:, 1:]], axis=1))
        return totals if totals is not None else np.zeros((len(self.case_ids), 4))

    def class_scores(self) -> np.ndarray:
        """[cases, K]: Dice per case and foreground class (both empty: 1)."""
        totals = self.case_counts()
        k = (totals.shape[1] - 1) // 3
        inter, pred, truth = totals[:, 1:1 + k], totals[:, 1 + k:1 + 2 * k], totals[:, 1 + 2 * k:]
        denom = pred + truth
        return np.where(denom == 0, 1.0, 2.0 * inter / np.maximum(denom, 1))

    def score(self) -> float:
        """Mean per-case Dice (multi-class: also mean over the foreground classes)."""
        dice = self.class_scores()
        return float(dice.mean()) if len(dice) else float("nan")


def class_names(bundle) -> list[str]:
    """The foreground classes' names (data.classes): column suffixes of the per-class metrics."""
    return list(getattr(bundle.data_cfg, "classes", None) or ["foreground"])


def case_spacing(bundle, case_id: str, n_slices: int):
    """Spacing in the order of the stacked array [S, H, W] (slice, row, col), or (row, col) for 2D."""
    info = bundle.case_info(case_id)
    row, col, slc = info["spacing"]
    return ((row, col) if n_slices == 1 else (slc, row, col)), info.get("spacing_unit", "px")


def evaluate(model, bundle, split: str = "test", batch: int = 16, tta: bool = False, out_dir=None,
             threshold: float = 0.5, model_name: str = "student", previews: bool = True, progress: bool = False,
             run_fields: dict | None = None) -> dict:
    """Full metrics over a split; writes metrics.json, per_case.csv and previews/ under out_dir.
    `run_fields` (run_dir.run_fields: run, method, preset, seed, ...) go into metrics.json, and its
    'run' into a `run` column of per_case.csv, so tables of many runs concatenate."""
    from semiseg.progress import progress_bar
    predict = make_predict_fn(model, tta)
    rows, units = [], set()
    out_dir = Path(out_dir) if out_dir else None
    preview_dir = out_dir / "previews" / split if (out_dir and previews) else None
    if preview_dir:
        preview_dir.mkdir(parents=True, exist_ok=True)
    cases = progress_bar(iterate_cases(predict, bundle, split, batch), desc=f"evaluate {split}", unit="case",
                         enabled=progress, leave=False)
    names = class_names(bundle)
    for case_id, image, label, prob in cases:
        multiclass = prob.ndim == label.ndim + 1
        pred = prob.argmax(-1).astype(np.uint8) if multiclass else prob >= threshold
        spacing, unit = case_spacing(bundle, case_id, len(prob))
        units.add(unit)
        arrays = (pred[0], label[0]) if len(prob) == 1 else (pred, label)
        scores = (metrics.multiclass_case_metrics(arrays[0], arrays[1], names, spacing) if multiclass
                  else metrics.case_metrics(arrays[0], arrays[1] > 0, spacing))
        row = {"case_id": case_id, **scores}
        if run_fields:
            row["run"] = run_fields.get("run")
        rows.append(row)
        if preview_dir:
            # The slice with most ground truth (or most prediction): what a reader wants to see.
            k = int(np.argmax(label.reshape(len(label), -1).sum(1) if label.any() else prob.reshape(len(prob), -1).sum(1)))
            arrays = {"image": image[k], "label": label[k], "prob": prob[k].astype(np.float32)}
            if multiclass:      # prob: any structure (1 - background), as the binary previews; pred: the label map
                arrays.update(prob=(1.0 - prob[k][..., 0]).astype(np.float32), pred=pred[k],
                              class_probs=prob[k].astype(np.float32))
            path = preview_dir / f"{case_id}.npz"
            path.parent.mkdir(parents=True, exist_ok=True)     # a folders id "val/img_000" has a '/'
            atomic_write.write_with(path, lambda tmp: np.savez_compressed(tmp, **arrays))
    multiclass = bool(rows) and any(k.startswith("dice_") for k in rows[0])
    payload = metrics.aggregate(rows, names if multiclass else None)
    if multiclass:
        payload["classes"] = list(names)
    payload.update({"split": split, "model": model_name, "tta": tta, "threshold": threshold,
                    "distance_unit": "mm" if units == {"mm"} else "px", **(run_fields or {})})
    if out_dir:
        metrics.write_per_case_csv(out_dir / "per_case.csv", rows)
        metrics.write_metrics_json(out_dir / "metrics.json", payload)
    return payload
