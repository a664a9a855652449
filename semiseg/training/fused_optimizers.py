"""Adam, AdamW and SGD with momentum whose update of one variable is one TensorFlow kernel.

Keras 3's optimizers write the update of each variable as 8-10 separate element-wise ops (sub, mul,
square, sqrt, div, three assigns): for the U-Net's ~70 variables some 700 small ops per step, each
a full pass over its tensor and a trip through TF's executor. `bench/profile_step.py` put that
update at 6% of the supervised step's op time at 128x128 on a 2-core CPU (12 ms of 187), more at
smaller images. TensorFlow has the same updates as single kernels (`ResourceApplyAdam`,
`ResourceApplyKerasMomentum`): one pass, no temporaries.

The classes below subclass Keras' optimizers and replace only `update_step`, with the same
equations (Keras 3 and TF both use lr_t = lr * sqrt(1 - b2^t) / (1 - b1^t) and
var -= lr_t * m / (sqrt(v) + eps) for Adam; accum = momentum * accum - lr * g, var += accum for
SGD), so:
  - the variables (momentums, velocities, iterations) and their checkpoint names are Keras' own:
    a checkpoint written with one class restores into the other;
  - weight decay (AdamW, SGD's weight_decay), schedules, clipping and loss scaling stay Keras'
    (they run outside update_step);
  - where the kernel does not apply (amsgrad, sparse gradients, SGD without momentum) Keras' own
    update runs.
Outputs agree with Keras' to float32 rounding (tests/test_fused_optimizers.py), not bit for bit:
the kernel evaluates the same expression in another order.
"""
from __future__ import annotations

import keras
import tensorflow as tf


def optimizer_classes(fused: bool) -> dict:
    """{'sgd', 'adamw', 'adam'}: the classes below (train.fused_update) or Keras' own."""
    if fused:
        return {"sgd": FusedSGD, "adamw": FusedAdamW, "adam": FusedAdam}
    return {"sgd": keras.optimizers.SGD, "adamw": keras.optimizers.AdamW, "adam": keras.optimizers.Adam}


def _handle(variable):
    """The resource handle of `variable` (a Keras variable, a tf.Variable, or under tf.distribute the
    component of the device being updated: DistributedVariable.handle resolves it in an update call)."""
    if isinstance(variable, keras.Variable):
        variable = variable.value
    return variable.handle


def _dense(gradient) -> bool:
    return not isinstance(gradient, tf.IndexedSlices)


class _FusedAdamUpdate:
    """update_step of Adam / AdamW as one ResourceApplyAdam (mixed in before the Keras class)."""

    def update_step(self, gradient, variable, learning_rate):
        if self.amsgrad or not _dense(gradient):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)     # as Keras does (a bfloat16 gradient of a float32 weight)
        step = tf.cast(self.iterations + 1, dtype)
        beta_1 = tf.cast(self.beta_1, dtype)
        beta_2 = tf.cast(self.beta_2, dtype)
        index = self._get_variable_index(variable)
        tf.raw_ops.ResourceApplyAdam(
            var=_handle(variable), m=_handle(self._momentums[index]), v=_handle(self._velocities[index]),
            beta1_power=tf.pow(beta_1, step), beta2_power=tf.pow(beta_2, step),
            lr=tf.cast(learning_rate, dtype), beta1=beta_1, beta2=beta_2,
            epsilon=tf.cast(self.epsilon, dtype), grad=gradient, use_locking=False)


@keras.saving.register_keras_serializable(package="semiseg")
class FusedAdam(_FusedAdamUpdate, keras.optimizers.Adam):
    pass


@keras.saving.register_keras_serializable(package="semiseg")
class FusedAdamW(_FusedAdamUpdate, keras.optimizers.AdamW):
    pass


@keras.saving.register_keras_serializable(package="semiseg")
class FusedSGD(keras.optimizers.SGD):
    """SGD whose momentum update is one ResourceApplyKerasMomentum (Keras' equation, nesterov too);
    without momentum Keras' single assign_sub already is one op."""

    def update_step(self, gradient, variable, learning_rate):
        if not self.momentum or not _dense(gradient):
            return super().update_step(gradient, variable, learning_rate)
        dtype = variable.dtype
        gradient = tf.cast(gradient, dtype)
        tf.raw_ops.ResourceApplyKerasMomentum(
            var=_handle(variable), accum=_handle(self.momentums[self._get_variable_index(variable)]),
            lr=tf.cast(learning_rate, dtype), grad=gradient, momentum=tf.cast(self.momentum, dtype),
            use_locking=False, use_nesterov=self.nesterov)
