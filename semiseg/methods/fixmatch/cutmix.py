"""CutMix across an unlabelled batch (Yun et al., ICCV 2019; FixMatch-style segmentation, UniMatch's box):
each image gets one random box pasted from another image of the same batch, and everything aligned
with the images (pseudo labels, confidence masks, weights) is mixed with the same boxes.

    boxes = cutmix_boxes(tf.shape(images), seed, (0.02, 0.4))       # [B,H,W,1] float 0/1
    partner = cutmix_partners(tf.shape(images)[0], seed)            # [B] int: the image pasted into each
    mixed_images, mixed_labels, mixed_conf = cutmix([images, labels, conf], boxes, partner)

Stateless: one seed gives one draw (eagerly, in tf.function, on every replica with its own seed).
Used by FixMatch and by the methods built on it (SemSim).
"""
from __future__ import annotations

import tensorflow as tf

ASPECT_RATIO_RANGE = (0.3, 1.0 / 0.3)      # height / width of the box ~ U(0.3, 3.33), UniMatch's range


def cutmix_boxes(shape, seed, area_range=(0.02, 0.4), ratio_range=ASPECT_RATIO_RANGE):
    """[B,H,W,1] float32 masks, 1 inside one axis-aligned box per image, 0 outside.

    shape: [B,H,W,...] (a tensor or list); area ~ U(area_range) of the image, height/width ratio
    ~ U(ratio_range); sides clipped to the image; the box lies wholly inside the image (its corner
    uniform over the positions where it fits)."""
    batch, height, width = shape[0], shape[1], shape[2]
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 4)
    h, w = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    area = tf.random.stateless_uniform([batch], seeds[0], area_range[0], area_range[1]) * h * w
    ratio = tf.random.stateless_uniform([batch], seeds[1], ratio_range[0], ratio_range[1])
    box_h = tf.clip_by_value(tf.round(tf.sqrt(area * ratio)), 1.0, h)
    box_w = tf.clip_by_value(tf.round(tf.sqrt(area / ratio)), 1.0, w)
    top = tf.floor(tf.random.stateless_uniform([batch], seeds[2]) * (h - box_h + 1.0))
    left = tf.floor(tf.random.stateless_uniform([batch], seeds[3]) * (w - box_w + 1.0))
    rows = tf.range(h)[None, :, None]
    cols = tf.range(w)[None, None, :]
    inside = ((rows >= top[:, None, None]) & (rows < (top + box_h)[:, None, None])
              & (cols >= left[:, None, None]) & (cols < (left + box_w)[:, None, None]))
    return tf.cast(inside, tf.float32)[..., None]


def cutmix_partners(batch, seed):
    """[B] int32: image i receives its box from image (i + s) mod B, s ~ U{1..B-1} (one shift per
    batch), so no image pastes from itself while B >= 2; B = 1 pastes from itself (a no-op)."""
    batch = tf.cast(batch, tf.int32)
    shift = tf.random.stateless_uniform([], tf.cast(seed, tf.int64), 1, tf.maximum(batch, 2), dtype=tf.int32)
    return tf.math.floormod(tf.range(batch) + shift, batch)


def boxes_at(boxes, size: int):
    """The boxes on a coarser square grid of `size` (the image side a multiple of it): a cell is inside
    where at least half of its pixels are (what a feature map of that size sees of the paste)."""
    factor = int(boxes.shape[1]) // size
    if factor <= 1:
        return boxes
    return tf.cast(tf.nn.avg_pool2d(boxes, factor, factor, "VALID") >= 0.5, boxes.dtype)


def cutmix(tensors, boxes, partner):
    """Each tensor [B,h,w,C]: inside image i's box the values of image partner[i], elsewhere its own.
    The same boxes and partners for every tensor, so images and what is aligned with them stay aligned;
    a tensor on a coarser grid (features, down-sampled predictions) gets the boxes at its size."""
    mixed = []
    for x in tensors:
        box = tf.cast(boxes_at(boxes, int(x.shape[1])), x.dtype)
        mixed.append(box * tf.gather(x, partner) + (1 - box) * x)
    return mixed
