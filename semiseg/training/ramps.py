"""Ramps of unlabelled-loss weights over training, as the papers define them; `epoch` is a float
(steps / steps per epoch) or a tensor of one, so the same function serves the step and the logs.

    from semiseg.training.ramps import sigmoid_rampup
    weight = consistency * sigmoid_rampup(self.epoch_float(step), rampup_epochs)
"""
from __future__ import annotations

import math

import tensorflow as tf


def sigmoid_rampup(epoch, rampup_epochs):
    """exp(-5 (1 - t/T)^2) for t < T, then 1 (Laine & Aila; Tarvainen & Valpola; MIRA-U's beta)."""
    if rampup_epochs <= 0:
        return tf.constant(1.0) if tf.is_tensor(epoch) else 1.0
    if tf.is_tensor(epoch):
        t = tf.clip_by_value(tf.cast(epoch, tf.float32) / rampup_epochs, 0.0, 1.0)
        return tf.exp(-5.0 * tf.square(1.0 - t))
    t = min(max(float(epoch) / rampup_epochs, 0.0), 1.0)
    return math.exp(-5.0 * (1.0 - t) ** 2)


def linear_rampup(epoch, rampup_epochs):
    """t/T for t < T, then 1 (MixMatch's ramp of lambda_u)."""
    if rampup_epochs <= 0:
        return tf.constant(1.0) if tf.is_tensor(epoch) else 1.0
    if tf.is_tensor(epoch):
        return tf.clip_by_value(tf.cast(epoch, tf.float32) / rampup_epochs, 0.0, 1.0)
    return min(max(float(epoch) / rampup_epochs, 0.0), 1.0)
