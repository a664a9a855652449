"""Box masks for CutMix as CPS's paper code draws them, stateless and in the graph.

    from semiseg.methods.cps.cutmix import box_masks, mix
    masks = box_masks(batch=4, height=64, width=64, seed=tf.constant([1, 2], tf.int64))
    mixed = mix(images, tf.roll(images, 1, axis=0), masks)    # masks == 1: the second image

Per image, `n_boxes` boxes: the mask's total area a ~ U(min_area, max_area) is split between the
boxes (each sqrt(a / n) of the side, times a random aspect ratio: h = a^u, w = a / h, u ~ U(0, 1),
then both scaled by sqrt(1 / n)); each box lies inside the image, and pixels covered by an odd
number of boxes are 1 (overlaps toggle, as the paper's code does). That code draws with NumPy in
its data loader; here the draws are stateless TF ops, so every replica and step draws its own
masks from `replica_seed` and a resumed run draws the same ones.
"""
from __future__ import annotations

import tensorflow as tf


def box_masks(batch, height: int, width: int, seed, n_boxes: int = 3, min_area: float = 0.25,
              max_area: float = 0.5):
    """[batch, height, width, 1] float32 masks in {0, 1} (1 inside an odd number of boxes)."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 3)
    shape = tf.stack([batch, n_boxes])
    area = tf.random.stateless_uniform(shape, seeds[0], min_area, max_area)
    # Random aspect ratio: h = area^u lies in [area, 1], w = area / h, so h * w = area.
    h_frac = tf.exp(tf.random.stateless_uniform(shape, seeds[1]) * tf.math.log(tf.maximum(area, 1e-12)))
    w_frac = area / h_frac
    scale = (1.0 / n_boxes) ** 0.5
    sizes = tf.round(tf.stack([h_frac * scale * height, w_frac * scale * width], axis=-1))      # [B, n, 2]
    extent = tf.constant([height, width], tf.float32)
    starts = tf.round((extent - sizes) * tf.random.stateless_uniform(tf.shape(sizes), seeds[2]))
    ends = starts + sizes
    rows = tf.range(height, dtype=tf.float32)[None, None, :, None]                            # [1, 1, H, 1]
    cols = tf.range(width, dtype=tf.float32)[None, None, None, :]                             # [1, 1, 1, W]
    inside = ((rows >= starts[..., 0, None, None]) & (rows < ends[..., 0, None, None])
              & (cols >= starts[..., 1, None, None]) & (cols < ends[..., 1, None, None]))    # [B, n, H, W]
    covered = tf.reduce_sum(tf.cast(inside, tf.int32), axis=1)
    return tf.cast(covered % 2, tf.float32)[..., None]


def mix(first, second, masks):
    """first outside the boxes, second inside: first * (1 - m) + second * m (m broadcast over channels)."""
    masks = tf.cast(masks, first.dtype)
    return first * (1.0 - masks) + second * masks
