"""BatchNormalization in training mode without touching its moving statistics.

    with frozen_bn_statistics(model):
        logits = model(images, training=True)     # batch statistics, dropout on; moving stats kept

Semi-supervised methods compute targets from a network in training mode (MixMatch's guesses, a Mean
Teacher whose BN runs on batch statistics) and probe those targets each epoch. Keras 3 updates a BN
layer's moving statistics on every training-mode call; such extra calls must not count as training
batches (the paper's code excludes them), so the momentum is set to 1 while the calls are traced:
moving = moving * 1 + batch * 0. The momentum is a Python float read at trace time, so this holds
for the traced graph too.
"""
from __future__ import annotations

import keras


class frozen_bn_statistics:
    """Context manager: BN layers of `model` keep their moving statistics inside the block."""

    def __init__(self, model):
        self.layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]

    def __enter__(self):
        self.saved = [layer.momentum for layer in self.layers]
        for layer in self.layers:
            layer.momentum = 1.0
        return self

    def __exit__(self, *exc):
        for layer, momentum in zip(self.layers, self.saved):
            layer.momentum = momentum
