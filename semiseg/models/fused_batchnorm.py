"""Keras BatchNormalization on TensorFlow's fused kernel (FusedBatchNormV3, TF 1's `tf.nn.fused_batch_norm`).

    from semiseg.models.fused_batchnorm import FusedBatchNormalization    # class BatchNormalization
    x = FusedBatchNormalization(momentum=0.99, name="bn1")(x)      # drop-in for layers.BatchNormalization

Keras 3's BatchNormalization on the TF backend computes the batch moments (`tf.nn.moments`) and the
normalisation (`tf.nn.batch_normalization`) as separate element-wise ops; their gradients are more
element-wise ops again. TF's FusedBatchNormV3 does statistics + normalisation in one pass forward
and one kernel backward (oneDNN on CPU, cuDNN on GPU); a U-Net's training step spends ~13% less
time in it (issue 19's probe, bench/step_vs_yardstick.py's BN ablation row).

The layer IS a keras.layers.BatchNormalization (subclass): the same weights (gamma, beta,
moving_mean, moving_variance, same names and shapes), the same config and the same behaviour, so
checkpoints (tf.train.Checkpoint, .weights.h5) restore across both classes and `isinstance(layer, BatchNormalization)` (which
semiseg.models.batchnorm.frozen_bn_statistics relies on) holds. Conventions matched:

- batch variance: Keras normalises by and averages the *biased* variance (divide by n); the fused
  op returns the unbiased (n - 1) one, so it is rescaled by (n - 1) / n before the moving update.
- moving update: moving * momentum + batch * (1 - momentum), Keras' form (read at trace time, so
  frozen_bn_statistics' momentum = 1 keeps the statistics), not the op's exponential_avg_factor.
- `training and self.trainable` picks batch statistics, as Keras (a frozen BN runs on moving stats).

Only 4D NHWC inputs (axis -1 or 3) of float16/bfloat16/float32 without masks, synchronisation
or renorm, and epsilon >= 1.001e-5 (cuDNN's floor) take the fused path; everything else calls
Keras' own implementation. Under a mixed policy the fused op takes the bfloat16/float16 input with
float32 gamma/beta/statistics and computes its statistics in float32 (as Keras, which upcasts).
"""
from __future__ import annotations

import keras
import tensorflow as tf

from semiseg.models.batchnorm import frozen_here

_FUSED_DTYPES = (tf.float16, tf.bfloat16, tf.float32)
_MIN_EPSILON = 1.001e-5     # cuDNN rejects smaller epsilons (Keras 2 fell back to unfused too)


def _fused(x, scale, offset, mean, variance, epsilon, is_training):
    """FusedBatchNormV3 (TF 2 exports no tf.nn.fused_batch_norm; the raw op has its gradient)."""
    y, mean, variance, _, _, _ = tf.raw_ops.FusedBatchNormV3(
        x=x, scale=scale, offset=offset, mean=mean, variance=variance, epsilon=epsilon,
        exponential_avg_factor=1.0, data_format="NHWC", is_training=is_training)
    return y, mean, variance


@keras.saving.register_keras_serializable(package="semiseg")
class BatchNormalization(keras.layers.BatchNormalization):
    """keras.layers.BatchNormalization whose 4D NHWC path runs FusedBatchNormV3 (see module).

    Named as Keras' class on purpose: .weights.h5 files address a layer by its class name
    (`.../batch_normalization_3/vars`), so only the same name keeps them loading across the two
    classes; .keras files tell them apart by the registered name `semiseg>BatchNormalization`."""

    thread_aware_momentum = True       # see semiseg.models.batchnorm: frozen per thread, not by mutation

    @property
    def momentum(self):
        """1.0 inside this thread's frozen_bn_statistics block (the statistics stay), else the layer's."""
        return 1.0 if frozen_here(self) else self._configured_momentum

    @momentum.setter
    def momentum(self, value):
        self._configured_momentum = value

    def _fusable(self, inputs, mask) -> bool:
        return (keras.backend.backend() == "tensorflow" and mask is None and not self.synchronized
                and not self.renorm and len(inputs.shape) == 4 and self.axis in (-1, 3)
                and self.epsilon >= _MIN_EPSILON and tf.as_dtype(inputs.dtype) in _FUSED_DTYPES)

    def call(self, inputs, training=None, mask=None):
        if not self._fusable(inputs, mask):
            return super().call(inputs, training=training, mask=mask)
        channels = inputs.shape[-1]
        # The op wants float32 scale/offset whatever x's dtype; center/scale=False mean 0 / 1.
        scale = tf.convert_to_tensor(self.gamma) if self.scale else tf.ones((channels,), tf.float32)
        offset = tf.convert_to_tensor(self.beta) if self.center else tf.zeros((channels,), tf.float32)
        if training and self.trainable:
            empty = tf.constant([], tf.float32)
            y, mean, unbiased = _fused(inputs, scale, offset, empty, empty, self.epsilon, True)
            shape = tf.shape(inputs)
            n = tf.cast(shape[0] * shape[1] * shape[2], tf.float32)
            # Keras' moving variance averages the biased batch variance (tf.nn.moments).
            variance = unbiased * ((n - 1.0) / tf.maximum(n, 1.0))
            m = self.momentum
            self.moving_mean.assign(tf.convert_to_tensor(self.moving_mean) * m + mean * (1.0 - m))
            self.moving_variance.assign(tf.convert_to_tensor(self.moving_variance) * m + variance * (1.0 - m))
        else:
            y, _, _ = _fused(inputs, scale, offset, tf.convert_to_tensor(self.moving_mean),
                             tf.convert_to_tensor(self.moving_variance), self.epsilon, False)
        return tf.cast(y, self.compute_dtype)


FusedBatchNormalization = BatchNormalization      # the name code reads as what it is


_use_keras_bn = False


def batch_normalization(**kwargs) -> keras.layers.BatchNormalization:
    """The BN layer the networks build: FusedBatchNormalization, or Keras' own inside
    `keras_batchnorm()` (the benchmarks' ablation of the fused kernel)."""
    return (keras.layers.BatchNormalization if _use_keras_bn else FusedBatchNormalization)(**kwargs)


class keras_batchnorm:
    """Context manager: networks built inside it use keras.layers.BatchNormalization (same weights,
    so the two builds are interchangeable); for benchmarks that time the fused kernel's saving."""

    def __enter__(self):
        global _use_keras_bn
        self.saved, _use_keras_bn = _use_keras_bn, True
        return self

    def __exit__(self, *exc):
        global _use_keras_bn
        _use_keras_bn = self.saved
