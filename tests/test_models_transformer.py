"""Tests of the MIRA-U networks (models_transformer.py) on tiny sizes.

    TF_CPP_MIN_LOG_LEVEL=3 python -m pytest -q tests/test_models_transformer.py
"""
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np
import pytest
import tensorflow as tf
import keras

from semiseg.models import transformer as mt


def tiny_teacher(dropout=0.1, image_size=32):
    return mt.build_mim_teacher(image_size=image_size, channels=3, patch_size=8, embed_dim=32,
                                depth=2, num_heads=2, head_channels=16, dropout=dropout)


def images(batch=2, size=32, seed=0):
    return tf.random.stateless_uniform([batch, size, size, 3], [seed, 7])


@pytest.fixture(scope="module")
def small_student():
    # Window 2 on the 8x8 and 4x4 grids of a 32x32 input: shifted windows are exercised.
    return mt.build_hybrid_student(32, base_channels=8, window_size=2, num_heads=(2, 2, 4))


def bn_statistics(model):
    return [v.numpy().copy() for v in model.non_trainable_weights if "moving" in v.path]


def test_random_patch_mask_keeps_exact_ratio_and_depends_on_seed():
    mask = mt.random_patch_mask(5, 64, 0.8, seed=3).numpy()
    assert mask.shape == (5, 64) and set(np.unique(mask)) == {0.0, 1.0}
    np.testing.assert_array_equal(mask.sum(axis=1), [51] * 5)        # round(0.8 * 64)
    assert not np.array_equal(mask[0], mask[1])                         # per-image draws
    np.testing.assert_array_equal(mask, mt.random_patch_mask(5, 64, 0.8, seed=3).numpy())
    assert not np.array_equal(mask, mt.random_patch_mask(5, 64, 0.8, seed=4).numpy())
    np.testing.assert_array_equal(mt.random_patch_mask(3, 16, 0.75, [1, 2]).numpy().sum(1), 12)
    graph = tf.function(lambda s: mt.random_patch_mask(5, 64, 0.8, s))(tf.constant([3, 0]))
    np.testing.assert_array_equal(graph.numpy(), mask)                  # same inside tf.function


def test_patchify_order_and_inverse():
    x = images(2, 16)
    patches = mt.patchify(x, 8)
    assert patches.shape == (2, 4, 192)
    np.testing.assert_array_equal(patches[:, 1].numpy(), x[:, :8, 8:16, :].numpy().reshape(2, -1))
    np.testing.assert_array_equal(mt.unpatchify(patches, 16, 8, 3).numpy(), x.numpy())
    with pytest.raises(ValueError, match="multiple of patch"):
        mt.patchify(images(1, 20), 8)


def test_mim_loss_ignores_visible_patches():
    rng = np.random.default_rng(0)
    recon = rng.normal(size=(2, 16, 12)).astype(np.float32)
    target = rng.normal(size=(2, 16, 12)).astype(np.float32)
    mask = mt.random_patch_mask(2, 16, 0.75, seed=1).numpy()
    loss = float(mt.mim_l1_loss(recon, target, mask))
    expected = np.abs(recon - target).mean(-1)[mask == 1].mean()
    assert loss == pytest.approx(expected, rel=1e-6)
    visible_changed = np.where(mask[..., None] == 0, recon + 100.0, recon)
    assert float(mt.mim_l1_loss(visible_changed, target, mask)) == pytest.approx(loss, rel=1e-6)
    masked_changed = np.where(mask[..., None] == 1, recon + 1.0, recon)
    assert float(mt.mim_l1_loss(masked_changed, target, mask)) != pytest.approx(loss, rel=1e-3)
    per_image = mt.mim_l1_per_image(recon, target, mask).numpy()
    assert per_image.mean() == pytest.approx(loss, rel=1e-6)          # equal masked counts


def test_teacher_shapes_and_determinism_without_mc():
    teacher, x = tiny_teacher(), images()
    logits = teacher.segment(x)
    assert logits.shape == (2, 32, 32, 1) and logits.dtype == tf.float32
    np.testing.assert_array_equal(logits.numpy(), teacher.segment(x).numpy())
    np.testing.assert_array_equal(logits.numpy(), teacher(x).numpy())
    mask = mt.random_patch_mask(2, teacher.num_patches, 0.8, seed=0)
    recon = teacher.reconstruct(x, mask)
    assert recon.shape == (2, 16, 8 * 8 * 3) and recon.dtype == tf.float32
    np.testing.assert_array_equal(recon.numpy(), teacher.reconstruct(x, mask).numpy())
    one = teacher.segment(x, mc_dropout=True, seed=5).numpy()
    np.testing.assert_array_equal(one, teacher.segment(x, mc_dropout=True, seed=5).numpy())
    assert np.abs(one - teacher.segment(x, mc_dropout=True, seed=6).numpy()).max() > 1e-4
    assert np.abs(one - logits.numpy()).max() > 1e-4
    with pytest.raises(ValueError, match="needs a seed"):
        teacher.segment(x, mc_dropout=True)


def test_mc_stats_batched_equal_loop_and_direct_computation():
    teacher, x = tiny_teacher(), images()
    passes, seed = 4, [11, 3]
    pass_seeds = mt.mc_pass_seeds(seed, passes)
    probs = np.stack([tf.sigmoid(teacher.segment(x, mc_dropout=True, seed=pass_seeds[m])).numpy()
                      for m in range(passes)])
    assert np.abs(probs[0] - probs[1]).max() > 1e-4                    # noise differs per pass
    direct_mean, direct_std = probs.mean(0), probs.std(0)
    graph = tf.function(lambda im: mt.mc_dropout_stats(teacher, im, passes, chunk=3, seed=seed))
    for mean, std in (mt.mc_dropout_stats(teacher, x, passes, seed=seed),
                      mt.mc_dropout_stats(teacher, x, passes, chunk=1, seed=seed),
                      graph(x),
                      mt.mc_dropout_stats_loop(teacher, x, passes, seed=seed)):
        assert mean.shape == (2, 32, 32, 1) and std.dtype == tf.float32
        np.testing.assert_allclose(mean.numpy(), direct_mean, atol=1e-6)
        np.testing.assert_allclose(std.numpy(), direct_std, atol=1e-6)
    assert direct_std.max() > 1e-3
    other = mt.mc_dropout_stats(teacher, x, passes, seed=[12, 3])[1].numpy()
    assert np.abs(other - direct_std).max() > 1e-4


def test_forced_mc_dropout_keeps_normalisation_in_inference_mode():
    teacher, x = tiny_teacher(dropout=0.0), images()
    # Give BatchNorm statistics far from a batch's own, so batch mode would change the output.
    for v in teacher.non_trainable_weights:
        if "moving_mean" in v.path:
            v.assign(tf.fill(v.shape, 0.5))
        elif "moving_variance" in v.path:
            v.assign(tf.fill(v.shape, 3.0))
    before = bn_statistics(teacher)
    inference = teacher.segment(x).numpy()
    np.testing.assert_allclose(teacher.segment(x, mc_dropout=True, seed=1).numpy(), inference,
                               atol=1e-6)
    np.testing.assert_allclose(mt.mc_dropout_stats(teacher, x, 3, seed=0)[0].numpy(),
                               tf.sigmoid(inference).numpy(), atol=1e-6)
    for a, b in zip(before, bn_statistics(teacher)):
        np.testing.assert_array_equal(a, b)
    dropping = tiny_teacher(dropout=0.5)
    stats = bn_statistics(dropping)
    mt.mc_dropout_stats(dropping, x, passes=4, seed=2)
    for a, b in zip(stats, bn_statistics(dropping)):
        np.testing.assert_array_equal(a, b)
    # The contrast that makes the test able to fail: training mode does move the statistics.
    train_out = teacher.segment(x, training=True).numpy()
    assert np.abs(train_out - inference).max() > 1e-3
    assert any(np.abs(a - b).max() > 0 for a, b in zip(before, bn_statistics(teacher)))


def test_parameter_counts_of_seed_configuration():
    teacher = mt.build_mim_teacher()
    counts = teacher.param_counts()
    assert counts["total"] == teacher.count_params()
    assert abs(counts["total"] - 2.1e6) / 2.1e6 < 0.10
    assert counts["encoder"] > 10 * counts["seg_head"]                  # the head stays light
    student = mt.build_hybrid_student()
    assert abs(student.count_params() - 21.3e6) / 21.3e6 < 0.10


def test_student_small_size_and_bad_size(small_student):
    out = small_student(images(2, 32), training=False)
    assert out.shape == (2, 32, 32, 1) and out.dtype == tf.float32
    assert np.all(np.isfinite(out.numpy()))
    shifts = [l.shift for l in small_student.layers if isinstance(l, mt.SwinBlock)]
    assert shifts == [0, 1, 0, 1, 0, 0]          # no shift where the window covers the grid
    assert [mt.fit_window(g, 8) for g in (64, 12, 4, 7)] == [8, 6, 4, 7]
    with pytest.raises(ValueError, match="multiple of 16"):
        mt.build_hybrid_student(40)


def test_save_load_round_trip_gives_identical_outputs(tmp_path, small_student):
    teacher, x = tiny_teacher(), images()
    teacher.save(tmp_path / "teacher.keras")
    loaded = keras.models.load_model(tmp_path / "teacher.keras")
    assert isinstance(loaded, mt.MIMTeacher)
    np.testing.assert_array_equal(loaded.segment(x).numpy(), teacher.segment(x).numpy())
    mask = mt.random_patch_mask(2, teacher.num_patches, 0.8, seed=0)
    np.testing.assert_array_equal(loaded.reconstruct(x, mask).numpy(),
                                  teacher.reconstruct(x, mask).numpy())
    np.testing.assert_array_equal(mt.mc_dropout_stats(loaded, x, 3, seed=4)[1].numpy(),
                                  mt.mc_dropout_stats(teacher, x, 3, seed=4)[1].numpy())
    small_student.save(tmp_path / "student.keras")
    loaded_student = keras.models.load_model(tmp_path / "student.keras")
    y = images(2, 32)
    np.testing.assert_array_equal(loaded_student(y).numpy(), small_student(y).numpy())


def test_one_mim_step_changes_encoder_and_decoder_only():
    teacher, x = tiny_teacher(), images()
    parts = teacher.part_weights()
    before = {p: [v.numpy().copy() for v in vs] for p, vs in parts.items()}
    optimizer = keras.optimizers.Adam(1e-3)
    optimizer.build(teacher.trainable_variables)
    mask = mt.random_patch_mask(2, teacher.num_patches, 0.8, seed=9)
    with tf.GradientTape() as tape:
        loss = mt.mim_l1_loss(teacher.reconstruct(x, mask, training=True), mt.patchify(x, 8), mask)
    grads = tape.gradient(loss, teacher.trainable_variables)
    optimizer.apply([g if g is not None else tf.zeros_like(v)
                     for g, v in zip(grads, teacher.trainable_variables)],
                    teacher.trainable_variables)
    assert np.isfinite(float(loss)) and float(loss) > 0
    for part in ("encoder", "mim_decoder"):
        changed = [np.abs(a - v.numpy()).max() > 0 for a, v in zip(before[part], parts[part])]
        assert all(changed), part
    for a, v in zip(before["seg_head"], parts["seg_head"]):
        np.testing.assert_array_equal(a, v.numpy())


def test_hybrid_student_is_a_registered_model_for_any_method():
    from semiseg import config
    from semiseg.models import unet as models_tf2
    model = models_tf2.build_model(config.ModelConfig(name="hybrid", base_filters=4), 32, 3)
    twin = mt.build_hybrid_student(32, 3, 4)
    assert model.count_params() == twin.count_params() and model.name == "hybrid"
    assert model(images(1, 32), training=False).shape == (1, 32, 32, 1)
