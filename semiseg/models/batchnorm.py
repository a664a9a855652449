"""BatchNormalization in training mode without touching its moving statistics.

    with frozen_bn_statistics(model):
        logits = model(images, training=True)     # batch statistics, dropout on; moving stats kept

Semi-supervised methods compute targets from a network in training mode (MixMatch's guesses, a Mean
Teacher whose BN runs on batch statistics) and probe those targets each epoch. Keras 3 updates a BN
layer's moving statistics on every training-mode call; such extra calls must not count as training
batches (the paper's code excludes them), so the momentum reads 1 while the calls are traced:
moving = moving * 1 + batch * 0 (the momentum is read at trace time, so this holds for the graph).

Per thread: MirroredStrategy traces each replica's step in its own thread, and the threads take
turns at every cross-replica point (an all-reduce, a synchronised BN). Setting the shared attribute
`layer.momentum = 1` leaked into the other replica's ordinary forward while one replica waited inside
the block, and two interleaved blocks restored each other's 1.0, freezing the statistics for good
(measured: momentum 1.0 after one mirrored step; tests/test_fused_batchnorm.py). semiseg's BN layer
(semiseg.models.fused_batchnorm) reads its momentum through `frozen_here`, a per-thread set; a plain
Keras BN (the benchmarks' ablation build) falls back to setting the attribute, restored to the
value it had before any block.
"""
from __future__ import annotations

import threading

import keras

_LOCAL = threading.local()


def frozen_here(layer) -> bool:
    """Whether this thread is inside a frozen_bn_statistics block for `layer`."""
    return getattr(_LOCAL, "frozen", {}).get(id(layer), 0) > 0


class frozen_bn_statistics:
    """Context manager: BN layers of `model` keep their moving statistics inside the block (this thread)."""

    def __init__(self, model):
        self.layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.BatchNormalization)]

    def __enter__(self):
        counts = _LOCAL.__dict__.setdefault("frozen", {})
        for layer in self.layers:
            counts[id(layer)] = counts.get(id(layer), 0) + 1
            if not getattr(layer, "thread_aware_momentum", False):
                layer.__dict__.setdefault("_momentum_outside_freeze", layer.momentum)
                layer.momentum = 1.0
        return self

    def __exit__(self, *exc):
        counts = _LOCAL.frozen
        for layer in self.layers:
            counts[id(layer)] -= 1
            if not counts[id(layer)]:
                del counts[id(layer)]
                if not getattr(layer, "thread_aware_momentum", False):
                    layer.momentum = layer.__dict__.pop("_momentum_outside_freeze")
