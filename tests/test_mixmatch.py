"""MixMatch: sharpening, MixUp's lambda', flip-invariant guesses, one step, the smoke run."""
import json

import numpy as np
import pytest
import tensorflow as tf
import keras

from semiseg import config
from semiseg.data import loader as data_loader_tf2
from semiseg import cli as main
from semiseg.runs import run_dir
from semiseg.methods.mixmatch import trainer as mixmatch


def test_sharpen_known_probabilities():
    p = tf.constant([0.5, 0.8, 0.2, 0.99])
    np.testing.assert_allclose(mixmatch.sharpen(p, 0.5).numpy(),
                               [0.5, 0.64 / 0.68, 0.04 / 0.68, 0.99 ** 2 / (0.99 ** 2 + 0.01 ** 2)], rtol=1e-5)
    np.testing.assert_allclose(mixmatch.sharpen(p, 1.0).numpy(), p.numpy(), rtol=1e-5)
    assert np.all(np.isfinite(mixmatch.sharpen(tf.constant([0.0, 1.0, 1e-9]), 0.05).numpy()))


def test_mixup_lambda_at_least_half_and_beta_distributed():
    lam = mixmatch.sample_mixup_lambda(4000, 0.75, tf.constant([3, 4], tf.int64)).numpy()
    assert lam.min() >= 0.5 and lam.max() <= 1.0
    # Beta(0.75, 0.75) folded at 0.5: E[max(l, 1-l)] = 0.5 + E|l - 0.5| ~= 0.70 (numerically)
    reference = np.random.default_rng(0).beta(0.75, 0.75, 200_000)
    assert lam.mean() == pytest.approx(np.maximum(reference, 1 - reference).mean(), abs=0.01)
    other = mixmatch.sample_mixup_lambda(4000, 0.75, tf.constant([3, 5], tf.int64)).numpy()
    assert not np.allclose(lam, other)              # another seed (step or replica): other draws


def test_mixup_uses_one_lambda_for_images_and_targets():
    rng = np.random.default_rng(1)
    a, b = rng.random((3, 4, 4, 1)).astype("float32"), rng.random((3, 4, 4, 1)).astype("float32")
    lam = tf.constant([0.5, 0.7, 1.0])
    images, targets = mixmatch.mixup(a, a, b, b, lam)
    np.testing.assert_array_equal(images.numpy(), targets.numpy())
    np.testing.assert_allclose(images.numpy()[1], 0.7 * a[1] + 0.3 * b[1], rtol=1e-6)
    np.testing.assert_allclose(images.numpy()[2], a[2], rtol=1e-6)


def test_guessed_labels_are_invariant_to_the_flips_used():
    # A per-pixel model commutes with flips, so after undoing each view's flips the guess must equal
    # the sharpened prediction on the unflipped images, whatever flips were drawn.
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(1, 1)])
    images = tf.constant(np.random.default_rng(2).random((6, 8, 8, 1)), tf.float32)
    guess, views = mixmatch.guess_labels(model, images, tf.constant([7, 1], tf.int64), 2, 0.5, photometric=False)
    expected = mixmatch.sharpen(tf.sigmoid(model(images)), 0.5)
    np.testing.assert_allclose(guess.numpy(), expected.numpy(), rtol=1e-5, atol=1e-6)
    flips = np.concatenate([f.numpy() for _, f in views])
    assert flips.any() and not flips.all()          # the views really were flipped (some of them)
    probs = tf.sigmoid(model(views[0][0]))
    assert not np.allclose(probs.numpy(), tf.sigmoid(model(images)).numpy())   # without the undo: misaligned


def test_one_step_gives_finite_losses_and_changes_the_student():
    cfg = config.resolve("smoke", method="mixmatch")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = mixmatch.MixMatch(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    before = [v.numpy().copy() for v in trainer.trainable_variables()]
    logs = trainer._make_loop(*trainer._iterators(0))(tf.constant(1))
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert float(logs["loss_unsup"]) > 0 and float(logs["loss_sup"]) > 0
    assert all(not np.allclose(b, v.numpy()) for b, v in zip(before, trainer.trainable_variables()))


@pytest.mark.parametrize("mix_labeled", [True, False])
def test_mix_labeled_false_trains_the_supervised_loss_on_the_labelled_images_as_they_are(mix_labeled):
    cfg = config.resolve("smoke", method="mixmatch", overrides=["model.dropout=0", f"mixmatch.mix_labeled={mix_labeled}"])
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = mixmatch.MixMatch(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    labeled, unlabeled = trainer._iterators(0)
    images, masks = next(labeled)
    _, logs = trainer.compute_loss((images, masks), next(unlabeled), tf.constant(3, tf.int64))
    plain = trainer.supervised_loss(trainer.models["student"](images, training=True), masks)[0]
    # BN in training mode normalises with the batch's own statistics: the same batch, the same logits.
    assert np.isclose(float(logs["loss_sup"]), float(plain), rtol=1e-5) == (not mix_labeled)
    assert float(logs["loss_unsup"]) > 0


def test_smoke_training_end_to_end(tmp_path):
    out = tmp_path / "mm"
    assert main.main(["train", "--method", "mixmatch", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    history = run_dir.read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for row in history:
        assert np.isfinite(float(row["loss_unsup"]))
        assert 0.0 <= float(row["pseudo_dice"]) <= 1.0
        assert float(row["unsup_weight"]) == pytest.approx(75.0)    # the paper's lambda_u, ramped in 1 epoch
    # The paper evaluates an EMA of the weights: it is validated first, selects and is exported.
    assert json.loads((out / "export.json").read_text())["network"] == "ema"
    assert {"val_dice", "val_dice_student"} <= set(history[0])      # val_dice: the exported (EMA) network


def test_guesses_in_training_mode_leave_bn_moving_statistics_alone():
    keras.utils.set_random_seed(0)
    model = keras.Sequential([keras.Input((8, 8, 1)), keras.layers.Conv2D(2, 3, padding="same"),
                              keras.layers.BatchNormalization(), keras.layers.Conv2D(1, 1)])
    images = tf.constant(np.random.default_rng(3).normal(2.0, 3.0, (4, 8, 8, 1)), tf.float32)
    bn = model.layers[1]
    before = [v.numpy().copy() for v in (bn.moving_mean, bn.moving_variance)]
    guess, _ = tf.function(lambda x: mixmatch.guess_labels(model, x, tf.constant([1, 2], tf.int64), 2, 1.0,
                                                           photometric=False, training=True))(images)
    for b, v in zip(before, (bn.moving_mean, bn.moving_variance)):
        np.testing.assert_array_equal(b, v.numpy())
    assert bn.momentum == pytest.approx(0.99)                   # restored after the guess
    # Batch statistics, not the (initial) moving ones: differs from the inference-mode guess.
    inference, _ = mixmatch.guess_labels(model, images, tf.constant([1, 2], tf.int64), 2, 1.0, photometric=False)
    assert not np.allclose(guess.numpy(), inference.numpy(), atol=1e-3)
    model(images, training=True)                                # outside the block it trains BN as usual
    assert not np.allclose(before[0], bn.moving_mean.numpy())


def test_linear_ramp_reaches_lambda_u_at_rampup_epochs():
    from semiseg.training.ramps import linear_rampup
    assert [linear_rampup(e, 4.0) for e in (0, 1, 4, 9)] == [0.0, 0.25, 1.0, 1.0]
    assert float(linear_rampup(tf.constant(2.0), 4.0)) == pytest.approx(0.5)
