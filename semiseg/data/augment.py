"""Weak and strong image/mask augmentation as pure TensorFlow graph ops.

Every random draw is a `tf.random.stateless_*` op driven by an explicit seed tensor of shape [2]
(int32 or int64), so one seed always gives one result: eagerly, inside `tf.data` map, inside
`tf.function`, and on every replica of a `tf.distribute` strategy (where the caller folds the
replica id into the seed with `seed_for`). No Keras layers, no hidden RNG state, no Python
randomness.

    python -m semiseg.data.augment preview.png            # writes a grid of weak/strong views to look at
    python -m pytest tests/test_augment.py   # the tests (eager and tf.data, alignment, seeds)

Per example (image [H,W,C] float32 in [0,1], mask [H,W,1] float32 0/1, or mask=None):
    weak_augment(image, mask, seed)      flips + rotation +-15 deg + scale 0.9-1.1
    strong_augment(image, mask, seed)    weak_augment(..., seed) then photometric_augment:
                                         its geometry (and so its mask) equals the weak view's
                                         for the same seed, so weak and strong views line up.
    photometric_augment(image, seed)     gamma/contrast/brightness, blur, noise, cutout; no mask.
In the train step (images [B,H,W,C], parameters drawn per example):
    batch_weak_augment, batch_strong_augment, batch_photometric, gaussian_noise,
    random_flips -> (flipped, flips [B,2] bool), apply_flips / undo_flips (MixMatch averages
    guesses over K views after undoing their flips), affine_warp.
Seeds: seed_for(step, replica_id, stream_id, base_seed) -> [2] int64.
In tf.data, give each element its own seed, e.g.
    ds.enumerate().map(lambda i, xy: weak_augment(*xy, seed_for(i, stream_id=1, base_seed=seed)))
"""
import math

import tensorflow as tf

# Defaults (keyword arguments of the functions below; documented in the report and README).
FLIP_PROBABILITY = 0.5          # each of horizontal and vertical, independently
MAX_ROTATION_DEGREES = 15.0     # angle ~ U(-15, 15) degrees
SCALE_RANGE = (0.9, 1.1)        # zoom ~ U(0.9, 1.1) about the image centre
FILL_MODE = "reflect"           # border fill of the warp; image and mask use the same one
GAMMA_RANGE = (0.7, 1.5)        # x**gamma, gamma log-uniform in the range (nnU-Net's range)
CONTRAST_RANGE = (0.75, 1.25)   # (x - mean) * c + mean, per image and channel
BRIGHTNESS_DELTA = 0.1          # x + d, d ~ U(-0.1, 0.1)
BLUR_PROBABILITY = 0.5
BLUR_SIGMA_RANGE = (0.5, 1.5)   # Gaussian sigma in pixels ~ U(0.5, 1.5)
NOISE_STD_MAX = 0.05            # additive Gaussian noise, std ~ U(0, 0.05) per image
CUTOUT_PROBABILITY = 0.5
CUTOUT_SIZE_RANGE = (0.1, 0.4)  # rectangle side as a fraction of the image side, per axis

# Folded into a caller's seed for the photometric half of strong_augment, so its draws are
# independent of the geometry's (which uses the seed itself, exactly as weak_augment does).
_PHOTOMETRIC_STREAM = 2


def seed_for(step, replica_id=0, stream_id=0, base_seed=0):
    """A [2] int64 seed, distinct for every (base_seed, step, replica_id, stream_id).

    `step`: the training step or element index; `replica_id`: the replica's
    `replica_id_in_sync_group` (draws must differ across replicas, see docs/design.md section 4); `stream_id`:
    a small integer naming the purpose (e.g. 0 labeled aug, 1 unlabeled aug, 2 MixMatch view k);
    `base_seed`: the run's config seed. Python ints or scalar integer tensors are accepted.
    Built with stateless_fold_in (a Philox hash), so nearby integers give unrelated streams.
    """
    as_int64 = lambda v: tf.cast(tf.convert_to_tensor(v), tf.int64)  # noqa: E731
    seed = tf.stack([as_int64(base_seed), as_int64(step)])
    seed = tf.random.experimental.stateless_fold_in(seed, as_int64(replica_id))
    return tf.cast(tf.random.experimental.stateless_fold_in(seed, as_int64(stream_id)), tf.int64)


def _check_seed(seed):
    seed = tf.convert_to_tensor(seed)
    if seed.dtype not in (tf.int32, tf.int64):
        raise ValueError(f"augment: seed must be int32 or int64, got {seed.dtype.name}")
    if seed.shape.rank is not None and seed.shape.as_list() not in ([2], [None]):
        raise ValueError(f"augment: seed must have shape [2], got {seed.shape}")
    # stateless_split draws sub-seeds in the seed's own dtype, so [1, 2] as int32 and as int64
    # would give different streams; one dtype makes the seed's value all that matters.
    return tf.cast(seed, tf.int64)


def _check_images(images, rank, name):
    images = tf.convert_to_tensor(images)
    if not images.dtype.is_floating:
        raise ValueError(f"augment: {name} must be float (float32 in [0, 1]), got {images.dtype.name}")
    if images.shape.rank != rank:
        layout = "[H, W, C]" if rank == 3 else "[B, H, W, C]"
        raise ValueError(f"augment: {name} must have rank {rank} {layout}, got shape {images.shape}")
    return tf.cast(images, tf.float32)


def _uniform(seed, batch, low, high):
    return tf.random.stateless_uniform([batch], seed, minval=low, maxval=high)


# ---------------------------------------------------------------- geometry (batched)
def apply_flips(x, flips):
    """Flip each x[b] ([B,H,W,C], any C: images, masks, logits) where flips[b] = (h, v) says so."""
    flips = tf.cast(flips, tf.bool)
    x = tf.where(flips[:, 0, None, None, None], tf.reverse(x, axis=[2]), x)
    return tf.where(flips[:, 1, None, None, None], tf.reverse(x, axis=[1]), x)


def undo_flips(x, flips):
    """Inverse of apply_flips; flips are their own inverse and h/v flips commute."""
    return apply_flips(x, flips)


def random_flips(images, seed, probability=FLIP_PROBABILITY):
    """Flip each image horizontally and/or vertically, each with `probability`.

    Returns (flipped [B,H,W,C], flips [B,2] bool: column 0 horizontal, column 1 vertical).
    """
    images = _check_images(images, 4, "images")
    draws = tf.random.stateless_uniform(tf.stack([tf.shape(images)[0], 2]), _check_seed(seed))
    flips = draws < probability
    return apply_flips(images, flips), flips


def affine_warp(images, angles, scales, interpolation="bilinear", fill_mode=FILL_MODE):
    """Rotate each images[b] by angles[b] radians and zoom by scales[b] about the image centre.

    Positive angles turn clockwise as displayed (row 0 on top); scale > 1 enlarges the content.
    interpolation: "bilinear" for images, "nearest" for masks (keeps them 0/1).
    fill_mode: "reflect", "nearest", "wrap" or "constant" (zeros) outside the source image.
    angle 0 and scale 1 give the input back exactly.
    """
    images = _check_images(images, 4, "images")
    static_hw = images.shape[1:3]
    hw = tf.constant(static_hw.as_list(), tf.int32) if static_hw.is_fully_defined() else tf.shape(images)[1:3]
    cy, cx = [(tf.cast(n, tf.float32) - 1.0) / 2.0 for n in (hw[0], hw[1])]
    angles, scales = tf.cast(angles, tf.float32), tf.cast(scales, tf.float32)
    # The op maps each *output* pixel to the input point it samples, so give it the inverse of
    # out = s * R(angle) (in - c) + c, i.e. in = R(-angle) (out - c) / s + c.
    cos, sin = tf.cos(angles) / scales, tf.sin(angles) / scales
    zeros = tf.zeros_like(cos)
    transforms = tf.stack([cos, sin, cx - (cos * cx + sin * cy),
                           -sin, cos, cy - (-sin * cx + cos * cy), zeros, zeros], axis=1)
    warped = tf.raw_ops.ImageProjectiveTransformV3(
        images=images, transforms=transforms, output_shape=hw, fill_value=0.0,
        interpolation=interpolation.upper(), fill_mode=fill_mode.upper())
    return tf.ensure_shape(warped, images.shape)


def batch_weak_augment(images, masks, seed, flip_probability=FLIP_PROBABILITY,
                       max_rotation_degrees=MAX_ROTATION_DEGREES, scale_range=SCALE_RANGE,
                       fill_mode=FILL_MODE):
    """Random flips, rotation and scale per example, identical for images and masks.

    images [B,H,W,C], masks [B,H,W,K] or None. Returns (images, masks or None).
    """
    images = _check_images(images, 4, "images")
    flip_seed, angle_seed, scale_seed = tf.unstack(
        tf.random.experimental.stateless_split(_check_seed(seed), 3))
    batch = tf.shape(images)[0]
    images, flips = random_flips(images, flip_seed, flip_probability)
    max_angle = math.radians(max_rotation_degrees)
    angles = _uniform(angle_seed, batch, -max_angle, max_angle)
    scales = _uniform(scale_seed, batch, scale_range[0], scale_range[1])
    images = affine_warp(images, angles, scales, "bilinear", fill_mode)
    if masks is None:
        return images, None
    masks = apply_flips(_check_images(masks, 4, "masks"), flips)
    return images, affine_warp(masks, angles, scales, "nearest", fill_mode)


# ---------------------------------------------------------------- photometric (batched)
def gaussian_noise(images, std, seed):
    """images + std * N(0, 1), a fresh draw per pixel; std: scalar or [B]. Not clipped."""
    images = _check_images(images, 4, "images")
    std = tf.reshape(tf.cast(std, tf.float32), [-1, 1, 1, 1])
    return images + std * tf.random.stateless_normal(tf.shape(images), _check_seed(seed))


def _gaussian_blur(images, sigmas, max_sigma):
    """Separable Gaussian blur with a different sigma per image, reflect-padded."""
    shape = tf.shape(images)
    batch, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    radius = max(1, math.ceil(3.0 * max_sigma))
    if images.shape[1] is not None and images.shape[2] is not None:
        radius = max(1, min(radius, images.shape[1] - 1, images.shape[2] - 1))
    taps = tf.range(-radius, radius + 1, dtype=tf.float32)
    kernel = tf.exp(-tf.square(taps)[None, :] / (2.0 * tf.square(sigmas)[:, None]))
    kernel /= tf.reduce_sum(kernel, axis=1, keepdims=True)                 # [B, 2r+1]
    # Put every (image, channel) pair in the channel axis of one depthwise convolution, so
    # each image is convolved with its own kernel in a single op.
    kernel = tf.reshape(tf.repeat(tf.transpose(kernel), channels, axis=1), [-1, batch * channels])
    stacked = tf.reshape(tf.transpose(images, [1, 2, 0, 3]), [1, height, width, batch * channels])
    for axis in (1, 2):
        pad = [[0, 0], [0, 0], [0, 0], [0, 0]]
        pad[axis] = [radius, radius]
        shape_k = [-1, 1, batch * channels, 1] if axis == 1 else [1, -1, batch * channels, 1]
        stacked = tf.nn.depthwise_conv2d(tf.pad(stacked, pad, mode="REFLECT"),
                                         tf.reshape(kernel, shape_k), [1, 1, 1, 1], "VALID")
    blurred = tf.transpose(tf.reshape(stacked, [height, width, batch, channels]), [2, 0, 1, 3])
    return tf.ensure_shape(blurred, images.shape)


def _cutout_region(images, seed, size_range):
    """[B,H,W,1] bool: one random axis-aligned rectangle per image (may run off the border)."""
    shape = tf.shape(images)
    batch = shape[0]
    height, width = tf.cast(shape[1], tf.float32), tf.cast(shape[2], tf.float32)
    seeds = tf.random.experimental.stateless_split(seed, 4)
    half_h = _uniform(seeds[0], batch, size_range[0], size_range[1]) * height / 2.0
    half_w = _uniform(seeds[1], batch, size_range[0], size_range[1]) * width / 2.0
    centre_y, centre_x = _uniform(seeds[2], batch, 0.0, height), _uniform(seeds[3], batch, 0.0, width)
    rows = tf.range(height)[None, :, None] + 0.5
    cols = tf.range(width)[None, None, :] + 0.5
    inside = ((tf.abs(rows - centre_y[:, None, None]) <= half_h[:, None, None])
              & (tf.abs(cols - centre_x[:, None, None]) <= half_w[:, None, None]))
    return inside[..., None]


def batch_photometric(images, seed, gamma_range=GAMMA_RANGE, contrast_range=CONTRAST_RANGE,
                      brightness_delta=BRIGHTNESS_DELTA, blur_probability=BLUR_PROBABILITY,
                      blur_sigma_range=BLUR_SIGMA_RANGE, noise_std_max=NOISE_STD_MAX,
                      cutout_probability=CUTOUT_PROBABILITY, cutout_size_range=CUTOUT_SIZE_RANGE,
                      clip=True):
    """Intensity jitter, blur, noise and cutout, each image with its own draws; masks untouched.

    Order: gamma, contrast, brightness, blur (with blur_probability), noise, cutout (with
    cutout_probability; the rectangle takes the image's per-channel mean), clip to [0, 1].
    Set a magnitude to its neutral value (range (1, 1), delta 0, probability 0) to switch it off.
    """
    images = _check_images(images, 4, "images")
    seeds = tf.random.experimental.stateless_split(_check_seed(seed), 9)
    batch = tf.shape(images)[0]
    per_image = lambda v: v[:, None, None, None]  # noqa: E731
    # Gamma is drawn log-uniformly so 0.7 and 1/0.7 are equally likely directions.
    log_gamma = _uniform(seeds[0], batch, math.log(gamma_range[0]), math.log(gamma_range[1]))
    x = tf.pow(tf.clip_by_value(images, 0.0, 1.0), per_image(tf.exp(log_gamma)))
    mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
    x = (x - mean) * per_image(_uniform(seeds[1], batch, *contrast_range)) + mean
    x = x + per_image(_uniform(seeds[2], batch, -brightness_delta, brightness_delta))
    if blur_probability > 0:
        sigmas = _uniform(seeds[3], batch, *blur_sigma_range)
        blurred = _gaussian_blur(x, sigmas, blur_sigma_range[1])
        x = tf.where(per_image(_uniform(seeds[4], batch, 0.0, 1.0) < blur_probability), blurred, x)
    if noise_std_max > 0:
        x = gaussian_noise(x, _uniform(seeds[5], batch, 0.0, noise_std_max), seeds[6])
    if cutout_probability > 0:
        cut = _cutout_region(x, seeds[7], cutout_size_range)
        cut &= per_image(_uniform(seeds[8], batch, 0.0, 1.0) < cutout_probability)
        x = tf.where(cut, tf.reduce_mean(x, axis=[1, 2], keepdims=True), x)
    return tf.clip_by_value(x, 0.0, 1.0) if clip else x


def batch_strong_augment(images, masks, seed, **magnitudes):
    """batch_weak_augment(seed) then batch_photometric: the masks equal the weak ones exactly."""
    geometry_keys = ("flip_probability", "max_rotation_degrees", "scale_range", "fill_mode")
    geometry = {k: magnitudes.pop(k) for k in geometry_keys if k in magnitudes}
    images, masks = batch_weak_augment(images, masks, seed, **geometry)
    photometric_seed = tf.random.experimental.stateless_fold_in(_check_seed(seed), _PHOTOMETRIC_STREAM)
    return batch_photometric(images, photometric_seed, **magnitudes), masks


# ---------------------------------------------------------------- per example (for tf.data)
def _one(images):
    return None if images is None else images[0]


def _batch_of_one(image, name):
    return None if image is None else _check_images(image, 3, name)[None]


def weak_augment(image, mask, seed, **magnitudes):
    """(image [H,W,C], mask [H,W,K] or None) -> flipped, rotated, scaled; see batch_weak_augment."""
    images, masks = batch_weak_augment(_batch_of_one(image, "image"),
                                       _batch_of_one(mask, "mask"), seed, **magnitudes)
    return _one(images), _one(masks)


def strong_augment(image, mask, seed, **magnitudes):
    """weak_augment(image, mask, seed) plus photometric_augment; same mask as the weak view."""
    images, masks = batch_strong_augment(_batch_of_one(image, "image"),
                                         _batch_of_one(mask, "mask"), seed, **magnitudes)
    return _one(images), _one(masks)


def photometric_augment(image, seed, **magnitudes):
    """image [H,W,C] -> intensity jitter, blur, noise, cutout; see batch_photometric."""
    return batch_photometric(_batch_of_one(image, "image"), seed, **magnitudes)[0]


def _write_preview(path, n_views=6):
    """A synthetic disc on a textured background, its weak and strong views and masks."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    yy, xx = tf.meshgrid(tf.range(96.0), tf.range(96.0), indexing="ij")
    mask = tf.cast((yy - 40.0) ** 2 + (xx - 55.0) ** 2 < 18.0 ** 2, tf.float32)[..., None]
    texture = 0.15 * tf.sin(xx / 5.0) * tf.cos(yy / 7.0)
    image = tf.clip_by_value(0.35 + texture[..., None] + 0.35 * mask, 0.0, 1.0)
    fig, axes = plt.subplots(3, n_views, figsize=(2 * n_views, 6))
    for k in range(n_views):
        seed = seed_for(k, base_seed=0)
        weak, weak_mask = weak_augment(image, mask, seed)
        strong, _ = strong_augment(image, mask, seed)
        for row, picture in enumerate((weak, strong, weak_mask)):
            axes[row, k].imshow(picture[..., 0], cmap="gray", vmin=0, vmax=1)
            axes[row, k].axis("off")
    for row, title in enumerate(("weak", "strong", "mask")):
        axes[row, 0].set_title(title, loc="left")
    fig.savefig(path, dpi=80, bbox_inches="tight")
    print(f"wrote {path}")


if __name__ == "__main__":
    import sys
    _write_preview(sys.argv[1] if len(sys.argv) > 1 else "augment_preview.png")
