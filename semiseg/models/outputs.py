"""What a network's logits mean: one sigmoid channel (binary) or C softmax channels (multi-class).

    python -c "import tensorflow as tf; from semiseg.models.outputs import probabilities; print(probabilities(tf.zeros([1, 2, 2, 4]))[0, 0, 0])"

Every network ends in float32 logits with `semiseg.config.output_channels(data)` channels: 1 for a
binary task (the default, data.classes = ['foreground']) and C = K + 1 for K named structures. The
channel count alone says which: losses, methods, evaluation and prediction all turn logits into
probabilities here, so they agree. A leaf: it imports TensorFlow and nothing of semiseg.
"""
from __future__ import annotations

import tensorflow as tf


def is_multiclass_logits(logits) -> bool:
    """True for C > 1 channels (a static shape: the channel axis is always known)."""
    return int(logits.shape[-1]) > 1


def probabilities(logits):
    """sigmoid for one channel (the foreground probability), softmax over the channels otherwise."""
    logits = tf.cast(logits, tf.float32)
    return tf.nn.softmax(logits, axis=-1) if is_multiclass_logits(logits) else tf.sigmoid(logits)


def one_hot_masks(masks, n_classes: int):
    """Class-index masks [B,H,W,1] (float class indices, as the data streams yield them) -> one-hot
    [B,H,W,C] float32."""
    index = tf.cast(tf.round(tf.cast(masks[..., 0], tf.float32)), tf.int32)
    return tf.one_hot(index, n_classes, dtype=tf.float32)



def main_output(model):
    """`model` itself when it has one output; else a model over the same layers returning its first
    (main) output, built once and kept on the model: what validation, export and prediction use of a
    network whose training view returns several tensors (deep supervision, features)."""
    outputs = getattr(model, "outputs", None)
    if not outputs or len(outputs) == 1:
        return model
    view = getattr(model, "_semiseg_main_output", None)
    if view is None:
        import keras
        # One input as a tensor, not a one-element list: Keras warns when a list-input model is called
        # with a tensor (validation and prediction call it so).
        inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
        view = keras.Model(inputs, outputs[0], name=model.name)
        model._semiseg_main_output = view
    return view
