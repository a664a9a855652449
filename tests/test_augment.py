"""Tests for augment.py: each op eagerly and inside tf.data, seeds, alignment, inverses, ranges.

    TF_CPP_MIN_LOG_LEVEL=3 python -m pytest tests/test_augment.py -q
"""
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402
from scipy import ndimage  # noqa: E402

from semiseg.data import augment  # noqa: E402

SIZE = 32
N = 4


def _disc_batch(n=N, size=SIZE, channels=1):
    """n images [size,size,channels] = textured background + a brighter off-centre disc, masks."""
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:size, :size].astype(np.float32)
    images, masks = [], []
    for k in range(n):
        cy, cx, r = 10 + 3 * k, 18 - 2 * k, 6 + k
        mask = (((yy - cy) ** 2 + (xx - cx) ** 2) < r * r).astype(np.float32)[..., None]
        background = 0.3 + 0.1 * rng.random((size, size, channels), dtype=np.float32)
        images.append(np.clip(background + 0.4 * mask, 0, 1).astype(np.float32))
        masks.append(mask)
    return np.stack(images), np.stack(masks)


def _seeds(n=N, offset=0):
    return np.stack([augment.seed_for(offset + i, stream_id=3).numpy() for i in range(n)])


PER_EXAMPLE = {
    "weak": lambda x, m, s: augment.weak_augment(x, m, s),
    "strong": lambda x, m, s: augment.strong_augment(x, m, s),
    "photometric": lambda x, m, s: (augment.photometric_augment(x, s), m),
}

SEED = tf.constant([7, 11], tf.int32)
BATCHED = {
    "batch_weak": lambda x, m: augment.batch_weak_augment(x, m, SEED),
    "batch_strong": lambda x, m: augment.batch_strong_augment(x, m, SEED),
    "batch_photometric": lambda x, m: (augment.batch_photometric(x, SEED), m),
    "random_flips": lambda x, m: augment.random_flips(x, SEED),
    "gaussian_noise": lambda x, m: (augment.gaussian_noise(x, 0.05, SEED), m),
    "apply_flips": lambda x, m: (augment.apply_flips(x, [[1, 0], [0, 1], [1, 1], [0, 0]]), m),
    "affine_warp": lambda x, m: (augment.affine_warp(x, [0.2, -0.1, 0.0, 0.25], [0.9, 1.1, 1.0, 1.0]),
                                 augment.affine_warp(m, [0.2, -0.1, 0.0, 0.25], [0.9, 1.1, 1.0, 1.0],
                                                     "nearest")),
}


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_per_example_op_gives_the_same_result_eagerly_in_tf_data_and_in_tf_function(name):
    op = PER_EXAMPLE[name]
    images, masks = _disc_batch()
    seeds = _seeds()
    eager = [op(images[i], masks[i], seeds[i]) for i in range(N)]
    dataset = tf.data.Dataset.from_tensor_slices((images, masks, seeds)).map(op)
    in_data = list(dataset.as_numpy_iterator())
    compiled = tf.function(op)
    for i in range(N):
        for got in (in_data[i], compiled(images[i], masks[i], seeds[i])):
            np.testing.assert_allclose(np.asarray(got[0]), eager[i][0].numpy(), atol=1e-5)
            np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(eager[i][1]))


@pytest.mark.parametrize("name", sorted(BATCHED))
def test_batched_op_gives_the_same_result_eagerly_and_in_tf_data(name):
    op = BATCHED[name]
    images, masks = _disc_batch()
    eager = op(tf.constant(images), tf.constant(masks))
    in_data = next(tf.data.Dataset.from_tensor_slices((images, masks)).batch(N).map(op)
                   .as_numpy_iterator())
    np.testing.assert_allclose(in_data[0], eager[0].numpy(), atol=1e-5)
    np.testing.assert_array_equal(in_data[1], eager[1].numpy())


@pytest.mark.parametrize("name", sorted(PER_EXAMPLE))
def test_same_seed_same_output_different_seed_different_output(name):
    op = PER_EXAMPLE[name]
    images, masks = _disc_batch(1)
    first = op(images[0], masks[0], tf.constant([1, 2]))[0].numpy()
    again = op(images[0], masks[0], tf.constant([1, 2], tf.int64))[0].numpy()
    other = op(images[0], masks[0], tf.constant([1, 3]))[0].numpy()
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 0.05


def test_warped_mask_still_covers_the_warped_lesion():
    # An image that *is* its mask (plus a flat background): the bilinear-warped image thresholded
    # at mid-level must equal the nearest-warped mask except on the mask's one-pixel border.
    _, masks = _disc_batch()
    moved = 0
    for i, mask in enumerate(masks):
        for k in range(5):
            image = 0.2 + 0.6 * mask
            seed = augment.seed_for(k, base_seed=i)
            warped_image, warped_mask = augment.weak_augment(image, mask, seed)
            warped_mask = warped_mask.numpy()[..., 0].astype(bool)
            from_image = warped_image.numpy()[..., 0] > 0.5
            border = ndimage.binary_dilation(warped_mask) & ~ndimage.binary_erosion(warped_mask)
            mismatch = from_image != warped_mask
            assert not (mismatch & ~border).any(), f"misaligned away from the border, seed {k}"
            assert mismatch.sum() <= 0.25 * border.sum()
            moved += int((warped_mask != mask[..., 0].astype(bool)).sum() > 0)
    assert moved >= 15, "the warp should move the mask for most seeds"


def test_weak_mask_stays_binary_and_weak_is_a_batch_of_one():
    images, masks = _disc_batch(1)
    image, mask = augment.weak_augment(images[0], masks[0], tf.constant([3, 4]))
    assert set(np.unique(mask.numpy())) <= {0.0, 1.0}
    batch_images, batch_masks = augment.batch_weak_augment(images, masks, tf.constant([3, 4]))
    np.testing.assert_array_equal(image.numpy(), batch_images[0].numpy())
    np.testing.assert_array_equal(mask.numpy(), batch_masks[0].numpy())
    image_only, none = augment.weak_augment(images[0], None, tf.constant([3, 4]))
    assert none is None
    np.testing.assert_array_equal(image_only.numpy(), image.numpy())


def test_strong_mask_equals_weak_mask_for_the_same_seed_while_the_image_differs():
    images, masks = _disc_batch()
    for i, seed in enumerate(_seeds()):
        weak_image, weak_mask = augment.weak_augment(images[i], masks[i], seed)
        strong_image, strong_mask = augment.strong_augment(images[i], masks[i], seed)
        np.testing.assert_array_equal(strong_mask.numpy(), weak_mask.numpy())
        assert np.abs(strong_image.numpy() - weak_image.numpy()).mean() > 0.005
    weak, weak_masks = augment.batch_weak_augment(images, masks, SEED)
    strong, strong_masks = augment.batch_strong_augment(images, masks, SEED)
    np.testing.assert_array_equal(strong_masks.numpy(), weak_masks.numpy())


def test_flips_undo_and_act_on_the_right_axes():
    x = tf.random.stateless_uniform([4, 5, 6, 3], [0, 1])
    flips = tf.constant([[False, False], [True, False], [False, True], [True, True]])
    flipped = augment.apply_flips(x, flips).numpy()
    np.testing.assert_array_equal(augment.undo_flips(flipped, flips).numpy(), x.numpy())
    x = x.numpy()
    np.testing.assert_array_equal(flipped[0], x[0])
    np.testing.assert_array_equal(flipped[1], x[1][:, ::-1])
    np.testing.assert_array_equal(flipped[2], x[2][::-1])
    np.testing.assert_array_equal(flipped[3], x[3][::-1, ::-1])
    out, drawn = augment.random_flips(x, tf.constant([5, 6]))
    np.testing.assert_array_equal(out.numpy(), augment.apply_flips(x, drawn).numpy())
    assert drawn.shape == (4, 2) and drawn.dtype == tf.bool
    never = augment.random_flips(x, tf.constant([5, 6]), probability=0.0)[1].numpy()
    always = augment.random_flips(x, tf.constant([5, 6]), probability=1.0)[1].numpy()
    assert not never.any() and always.all()


def test_values_stay_finite_and_in_range_on_extreme_images():
    images = np.stack([np.zeros((SIZE, SIZE, 1)), np.ones((SIZE, SIZE, 1)),
                       np.tile(np.arange(SIZE) % 2, (SIZE, 1))[..., None],
                       np.full((SIZE, SIZE, 1), 0.5)]).astype(np.float32)
    for k in range(3):
        strong, _ = augment.batch_strong_augment(images, None, tf.constant([k, 9]))
        assert np.isfinite(strong.numpy()).all()
        assert strong.numpy().min() >= 0.0 and strong.numpy().max() <= 1.0
        unclipped = augment.batch_photometric(images, tf.constant([k, 9]), clip=False).numpy()
        assert np.isfinite(unclipped).all() and np.abs(unclipped).max() < 2.0


def test_rotation_zero_and_scale_one_is_the_identity():
    images, masks = _disc_batch()
    warped = augment.affine_warp(images, tf.zeros([N]), tf.ones([N]))
    np.testing.assert_array_equal(warped.numpy(), images)
    image, mask = augment.weak_augment(images[0], masks[0], tf.constant([1, 2]),
                                       flip_probability=0.0, max_rotation_degrees=0.0,
                                       scale_range=(1.0, 1.0))
    np.testing.assert_array_equal(image.numpy(), images[0])
    np.testing.assert_array_equal(mask.numpy(), masks[0])


def test_rotation_by_a_quarter_turn_is_a_clockwise_rot90():
    x = np.arange(2 * 7 * 7, dtype=np.float32).reshape(2, 7, 7, 1)
    turned = augment.affine_warp(x, tf.fill([2], np.pi / 2), tf.ones([2]), "nearest").numpy()
    np.testing.assert_array_equal(turned, np.rot90(x, k=-1, axes=(1, 2)))


def test_static_shapes_and_float32_survive_tf_function_and_dynamic_shapes_work():
    images, masks = _disc_batch(1)
    seed_spec = tf.TensorSpec([2], tf.int32)
    for hw in ([SIZE, SIZE], [None, None]):
        spec = tf.TensorSpec(hw + [1], tf.float32)

        @tf.function(input_signature=[spec, spec, seed_spec])
        def strong(image, mask, seed):
            out_image, out_mask = augment.strong_augment(image, mask, seed)
            assert out_image.shape.as_list() == hw + [1] and out_mask.shape.as_list() == hw + [1]
            return out_image, out_mask

        out_image, out_mask = strong(images[0], masks[0], tf.constant([1, 2]))
        assert out_image.dtype == tf.float32 and out_mask.dtype == tf.float32
        eager_image, _ = augment.strong_augment(images[0], masks[0], tf.constant([1, 2]))
        np.testing.assert_allclose(out_image.numpy(), eager_image.numpy(), atol=1e-5)


def test_seed_for_is_deterministic_distinct_and_graph_safe():
    seeds = {tuple(augment.seed_for(s, r, k).numpy()) for s in range(3) for r in range(3)
             for k in range(3)}
    assert len(seeds) == 27
    assert tuple(augment.seed_for(2, 1, 0, base_seed=5).numpy()) != tuple(augment.seed_for(2, 1, 0).numpy())
    in_graph = tf.function(augment.seed_for)(tf.constant(4, tf.int64), tf.constant(1), 2)
    np.testing.assert_array_equal(in_graph.numpy(), augment.seed_for(4, 1, 2).numpy())
    assert in_graph.shape == (2,)
    # Different replicas get different noise for the same step and stream.
    x = tf.zeros([1, 8, 8, 1])
    a = augment.gaussian_noise(x, 1.0, augment.seed_for(0, replica_id=0))
    b = augment.gaussian_noise(x, 1.0, augment.seed_for(0, replica_id=1))
    assert np.abs(a.numpy() - b.numpy()).max() > 0.1


def test_each_image_of_a_batch_gets_its_own_photometric_draws():
    images = np.repeat(_disc_batch(1)[0], 3, axis=0)
    out = augment.batch_photometric(images, tf.constant([2, 2])).numpy()
    assert np.abs(out[0] - out[1]).mean() > 0.005 and np.abs(out[1] - out[2]).mean() > 0.005


def test_gaussian_noise_per_example_std():
    x = tf.fill([2, SIZE, SIZE, 1], 0.5)
    out = augment.gaussian_noise(x, tf.constant([0.0, 0.1]), tf.constant([1, 1])).numpy()
    np.testing.assert_array_equal(out[0], 0.5)
    assert 0.08 < (out[1] - 0.5).std() < 0.12


NEUTRAL = dict(gamma_range=(1.0, 1.0), contrast_range=(1.0, 1.0), brightness_delta=0.0,
               blur_probability=0.0, noise_std_max=0.0, cutout_probability=0.0)


def test_photometric_with_neutral_magnitudes_is_the_identity_and_brightness_is_bounded():
    images, _ = _disc_batch()
    np.testing.assert_allclose(augment.batch_photometric(images, SEED, **NEUTRAL).numpy(), images,
                               atol=1e-6)
    bright = augment.batch_photometric(images, SEED, **{**NEUTRAL, "brightness_delta": 0.1},
                                       clip=False).numpy()
    shift = (bright - images).reshape(N, -1)
    np.testing.assert_allclose(shift, shift[:, :1] * np.ones_like(shift), atol=1e-6)
    assert np.abs(shift).max() <= 0.1 and np.abs(shift).max() > 0.0


def test_blur_keeps_a_flat_image_flat_and_smooths_an_edge():
    flat = np.full((2, SIZE, SIZE, 1), 0.3, np.float32)
    blur_only = {**NEUTRAL, "blur_probability": 1.0}
    np.testing.assert_allclose(augment.batch_photometric(flat, SEED, **blur_only).numpy(), flat,
                               atol=1e-6)
    images, _ = _disc_batch(2)
    blurred = augment.batch_photometric(images, SEED, **blur_only).numpy()
    gradient = lambda x: np.abs(np.diff(x, axis=2)).mean()  # noqa: E731
    assert gradient(blurred) < 0.7 * gradient(images)
    np.testing.assert_allclose(blurred.mean(axis=(1, 2)), images.mean(axis=(1, 2)), atol=0.01)


def test_blur_treats_each_channel_of_each_image_alone():
    # The blur runs every (image, channel) pair through one depthwise convolution; an RGB batch
    # must give what each channel blurred on its own gives (the same per-image sigma draws).
    rgb = np.random.default_rng(1).random((3, SIZE, SIZE, 3), dtype=np.float32)
    blur_only = {**NEUTRAL, "blur_probability": 1.0}
    together = augment.batch_photometric(rgb, SEED, **blur_only).numpy()
    for c in range(3):
        alone = augment.batch_photometric(rgb[..., c:c + 1], SEED, **blur_only).numpy()
        np.testing.assert_allclose(together[..., c:c + 1], alone, atol=1e-6)
    assert np.abs(together - rgb).mean() > 0.05


def test_cutout_fills_one_rectangle_with_the_image_mean():
    images, _ = _disc_batch()
    cut = augment.batch_photometric(images, SEED, **{**NEUTRAL, "cutout_probability": 1.0}).numpy()
    for before, after in zip(images[..., 0], cut[..., 0]):
        changed = np.abs(after - before) > 1e-7
        rows, cols = np.nonzero(changed)
        assert changed.sum() > 0
        box = np.zeros_like(changed)
        box[rows.min():rows.max() + 1, cols.min():cols.max() + 1] = True
        inside = after[box]
        # Pixels in the box either changed to the mean or already were (within float noise).
        np.testing.assert_allclose(inside, before.mean(), atol=1e-6)
        assert box.sum() <= (0.4 * SIZE + 1) ** 2


def test_bad_inputs_raise_clear_errors():
    images, masks = _disc_batch(1)
    with pytest.raises(ValueError, match="image must have rank 3"):
        augment.weak_augment(images, masks[0], SEED)
    with pytest.raises(ValueError, match="mask must have rank 3"):
        augment.weak_augment(images[0], masks[0, ..., 0], SEED)
    with pytest.raises(ValueError, match="seed must have shape"):
        augment.weak_augment(images[0], masks[0], tf.constant([1, 2, 3]))
    with pytest.raises(ValueError, match="seed must be int32 or int64"):
        augment.photometric_augment(images[0], tf.constant([1.0, 2.0]))
    with pytest.raises(ValueError, match="image must be float"):
        augment.photometric_augment(tf.zeros([8, 8, 1], tf.uint8), SEED)


DISTRIBUTED_SCRIPT = """
import sys
import numpy as np
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from semiseg.data import augment
strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
images = tf.random.stateless_uniform([4, 16, 16, 1], [0, 0])
masks = tf.cast(images > 0.5, tf.float32)
batches = strategy.experimental_distribute_dataset(
    tf.data.Dataset.from_tensor_slices((images, masks)).batch(4))

@tf.function
def step(batch, step_id):
    def replica_fn(x, m):
        replica = tf.distribute.get_replica_context().replica_id_in_sync_group
        return augment.batch_strong_augment(x, m, augment.seed_for(step_id, replica, 1))
    return strategy.run(replica_fn, args=batch)

out = step(next(iter(batches)), tf.constant(3, tf.int64))
for replica, got in enumerate(strategy.experimental_local_results(out[0])):
    part = slice(2 * replica, 2 * replica + 2)
    expected = augment.batch_strong_augment(images[part], masks[part],
                                            augment.seed_for(3, replica, 1))[0]
    print(replica, float(np.abs(got.numpy() - expected.numpy()).max()))
"""


def test_each_replica_under_mirrored_strategy_matches_the_eager_result_for_its_replica_id(tmp_path):
    # Logical CPU devices must be set before TF starts, so this runs in a fresh interpreter.
    import subprocess
    script = tmp_path / "distributed_augment.py"
    script.write_text(DISTRIBUTED_SCRIPT)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    differences = [float(line.split()[1]) for line in done.stdout.strip().splitlines()]
    assert len(differences) == 2 and max(differences) < 1e-5
