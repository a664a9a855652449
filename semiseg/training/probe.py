"""Is the teacher any good? Dice of a method's pseudo targets against hidden ground truth.

    python main.py train --method mean_teacher --preset smoke    # history.csv gains pseudo_dice

Semi-supervised training fails silently when its targets are wrong. Where the unlabelled training
cases have hidden truth (the embedded synthetic set always; real data only with
`data.hide_labels=true`), a method scores the targets it actually trains on against that truth,
once per epoch, on a fixed probe: the first `probe_cases` ids of `splits['hidden_truth']` (sorted,
so the probe is the same every epoch and on every resume).

The truth is read here, from the evaluation stream, and only here: the unlabelled training
stream is built with `with_mask=False`, so no hidden label can reach a loss
(tests/test_hidden_labels.py proves the trained weights do not depend on them).
Multi-class: the pseudo label is the argmax of the target, scored per class against the hidden
truth (`pseudo_dice_<class>`), and `pseudo_dice` is the mean over the foreground classes.
"""
from __future__ import annotations

import numpy as np

from semiseg.config import is_multiclass
from semiseg.evaluation import evaluate as evaluation


def hidden_truth_available(cfg, bundle) -> bool:
    """True where unlabelled training cases carry a truth we may use for diagnostics only."""
    allowed = bundle.fmt == "synthetic" or cfg.data.hide_labels
    return bool(allowed and bundle.splits.get("hidden_truth"))


def probe_case_ids(cfg, bundle, n_cases: int) -> list[str]:
    """The fixed probe: the first n hidden-truth cases, or [] when there is no usable truth."""
    if n_cases <= 0 or not hidden_truth_available(cfg, bundle):
        return []
    return sorted(bundle.splits["hidden_truth"])[:n_cases]


def pseudo_dice_logs(target_fn, cfg, bundle, case_ids, batch: int = 16) -> dict:
    """history.csv columns of the probe: {'pseudo_dice': ...} for binary; for multi-class the mean
    over the foreground classes plus 'pseudo_dice_<class>' for each (data.classes names).

    target_fn: images -> binary probabilities [B,H,W,1], or class scores [B,H,W,C] whose argmax is
    the pseudo label (an all-zero row is background: MIRA-U's dropped pixels)."""
    if not is_multiclass(cfg.data):
        return {"pseudo_dice": pseudo_target_dice(target_fn, bundle, case_ids, batch)}
    per_case = evaluation.case_class_dice(target_fn, bundle, None, batch, case_ids)      # [cases, K]
    by_class = per_case.mean(axis=0) if len(per_case) else [float("nan")] * len(cfg.data.classes)
    return {"pseudo_dice": float(np.mean(by_class)),
            **{f"pseudo_dice_{name}": float(v) for name, v in zip(cfg.data.classes, by_class)}}


def pseudo_target_dice(target_fn, bundle, case_ids, batch: int = 16) -> float:
    """Mean per-case Dice between target_fn(images) >= 0.5 and the hidden truth.

    target_fn: images [B,H,W,C] -> target probabilities [B,H,W,1] (a method's pseudo targets).
    The same per-case score as validation (`evaluation.mean_case_dice`; both-empty cases score 1).
    """
    return evaluation.mean_case_dice(lambda images: target_fn(images)[..., 0], bundle, None, batch, case_ids)


def epoch_pseudo_dice(trainer, n_cases: int) -> dict:
    """pseudo_dice_logs of `trainer.pseudo_targets` on the fixed probe, or {} where no
    hidden truth may be used. The traced function is built once per trainer (a new tf.function
    each epoch retraced every epoch, and TensorFlow warned about it)."""
    cases = probe_case_ids(trainer.cfg, trainer.data, n_cases)
    if not cases:
        return {}
    fn = getattr(trainer, "_probe_fn", None)
    if fn is None:
        import tensorflow as tf
        fn = trainer._probe_fn = tf.function(trainer.pseudo_targets, reduce_retracing=True)
    return pseudo_dice_logs(fn, trainer.cfg, trainer.data, cases, trainer.cfg.train.eval_batch_size)
