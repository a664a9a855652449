"""Exponential moving averages of weights (EMA teachers, evaluation copies), with the warm-up of
Mean Teacher's code, for every method that keeps one.

    from semiseg.training.ema import ema_decay_at, ema_update, ema_weights
    ema_update(ema_weights(teacher), ema_weights(student), ema_decay_at(step, 0.99, warmup=True))
"""
from __future__ import annotations

import tensorflow as tf


def ema_update(teacher_vars, student_vars, decay):
    """teacher <- decay * teacher + (1 - decay) * student, for every weight (BN statistics too)."""
    for t, s in zip(teacher_vars, student_vars):
        t.assign(decay * t + (1.0 - decay) * tf.cast(s, t.dtype))


def ema_weights(model, teacher_bn: str = "moving") -> list:
    """The weights the teacher averages: all of them (BN moving stats too) except RNG counters;
    with teacher_bn="batch" only the trainable ones (the teacher keeps its own BN statistics)."""
    averaged_stats = teacher_bn != "batch"
    return [v for v in model.weights if "seed_generator_state" not in v.path
            and (averaged_stats or not v.path.endswith(("moving_mean", "moving_variance")))]


def ema_decay_at(n_updates, ema_decay: float, warmup: bool):
    """a for the n-th update (n >= 1): min(1 - 1/(n+1), ema_decay) with warm-up, else ema_decay."""
    if not warmup:
        return tf.constant(ema_decay, tf.float32)
    n = tf.cast(n_updates, tf.float32)
    return tf.minimum(1.0 - 1.0 / (n + 1.0), ema_decay)


def copy_weights(target, source, teacher_bn: str = "moving") -> None:
    """target's averaged weights <- source's: an EMA network's starting point (a copy, as the papers)."""
    for t, s in zip(ema_weights(target, teacher_bn), ema_weights(source, teacher_bn)):
        t.assign(s)
