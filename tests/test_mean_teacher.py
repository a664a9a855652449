"""Mean Teacher: the EMA rule, the ramp-up, one exact training step, and the smoke run end to end."""
import json
import math

import numpy as np
import pytest
import tensorflow as tf

from semiseg import config
from semiseg.data import loader as data_loader_tf2
from semiseg import cli as main
from semiseg.runs import run_dir
from semiseg.training import trainer as train_ssl_tf2
from semiseg.methods.mean_teacher import trainer as mean_teacher
from semiseg.training import ema, ramps


def test_ema_update_is_exact():
    teacher = [tf.Variable([1.0, 2.0, -4.0]), tf.Variable([[0.5]])]
    student = [tf.Variable([3.0, 5.0, 0.0]), tf.Variable([[1.5]])]
    ema.ema_update(teacher, student, 0.9)
    np.testing.assert_allclose(teacher[0].numpy(), [0.9 * 1 + 0.1 * 3, 0.9 * 2 + 0.1 * 5, 0.9 * -4], rtol=1e-7)
    np.testing.assert_allclose(teacher[1].numpy(), [[0.9 * 0.5 + 0.1 * 1.5]], rtol=1e-7)
    np.testing.assert_array_equal(student[0].numpy(), [3.0, 5.0, 0.0])     # the student is untouched


def test_ema_decay_warmup_follows_the_paper():
    assert float(ema.ema_decay_at(1, 0.99, True)) == pytest.approx(0.5)
    assert float(ema.ema_decay_at(9, 0.99, True)) == pytest.approx(0.9)
    assert float(ema.ema_decay_at(10_000, 0.99, True)) == pytest.approx(0.99)
    assert float(ema.ema_decay_at(1, 0.99, False)) == pytest.approx(0.99)


@pytest.mark.parametrize("as_tensor", [False, True])
def test_sigmoid_rampup_values(as_tensor):
    ramp = ramps.sigmoid_rampup
    value = (lambda t: float(ramp(tf.constant(t), 8.0))) if as_tensor else (lambda t: ramp(t, 8.0))
    assert value(0.0) == pytest.approx(math.exp(-5.0), rel=1e-6)
    assert value(4.0) == pytest.approx(math.exp(-1.25), rel=1e-6)
    assert value(8.0) == pytest.approx(1.0)
    assert value(20.0) == pytest.approx(1.0)
    assert value(2.0) < value(4.0) < value(6.0)


def test_consistency_weight_and_schedule_logs():
    trainer = mean_teacher.MeanTeacher.__new__(mean_teacher.MeanTeacher)
    trainer.cfg = config.resolve(overrides=["mean_teacher.consistency=50", "mean_teacher.rampup_epochs=4"])
    logs = trainer.schedule_logs(2.0)
    assert logs["rampup"] == pytest.approx(math.exp(-1.25))
    assert logs["unsup_weight"] == pytest.approx(50 * math.exp(-1.25))


def _trainer(*overrides):
    cfg = config.resolve("smoke", overrides=overrides, method="mean_teacher")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    return mean_teacher.MeanTeacher(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)


@pytest.mark.parametrize("warmup, decay", [(True, 0.5), (False, 0.9)])
def test_one_step_moves_student_and_teacher_by_the_ema_rule(warmup, decay):
    # teacher_bn=moving: every weight, BN moving statistics included, follows the EMA rule.
    trainer = _trainer(f"mean_teacher.ema_warmup={warmup}", "mean_teacher.ema_decay=0.9", "mean_teacher.teacher_bn=moving")
    student, teacher = (ema.ema_weights(trainer.models[k]) for k in ("student", "teacher"))
    s0 = [v.numpy().copy() for v in student]
    t0 = [v.numpy().copy() for v in teacher]
    for a, b in zip(s0, t0):            # the teacher starts as a copy of the student
        np.testing.assert_array_equal(a, b)
    logs = trainer._make_loop(*trainer._iterators(0))(tf.constant(1))
    assert all(np.isfinite(float(v)) for v in logs.values())
    assert float(logs["loss_unsup"]) > 0
    trainable = {v.path for v in trainer.models["student"].trainable_variables}
    changed = [not np.allclose(a, v.numpy()) for a, v in zip(s0, student) if v.path in trainable]
    assert all(changed)
    for before, s, t in zip(t0, student, teacher):
        np.testing.assert_allclose(t.numpy(), decay * before + (1 - decay) * s.numpy(), rtol=1e-5, atol=1e-7)


def test_batch_statistics_teacher_keeps_its_own_bn_statistics():
    """teacher_bn=batch (the paper's code): weights by the EMA rule, BN moving statistics from the
    teacher's own forward pass on its batch, not averaged from the student's."""
    trainer = _trainer("mean_teacher.teacher_bn=batch", "mean_teacher.ema_decay=0.9", "mean_teacher.ema_warmup=false")
    teacher, student = trainer.models["teacher"], trainer.models["student"]
    averaged = ema.ema_weights(teacher, "batch")
    stats = [v for v in teacher.weights if v.path.endswith(("moving_mean", "moving_variance"))]
    assert stats and not {v.path for v in stats} & {v.path for v in averaged}
    s0 = [v.numpy().copy() for v in ema.ema_weights(student, "batch")]
    t0 = [v.numpy().copy() for v in averaged]
    stats0 = [v.numpy().copy() for v in stats]
    student_stats = [v for v in student.weights if v.path.endswith(("moving_mean", "moving_variance"))]
    trainer._make_loop(*trainer._iterators(0))(tf.constant(1))
    for before, s, t in zip(t0, ema.ema_weights(student, "batch"), averaged):
        np.testing.assert_allclose(t.numpy(), 0.9 * before + 0.1 * s.numpy(), rtol=1e-5, atol=1e-7)
    moved = [not np.allclose(a, v.numpy()) for a, v in zip(stats0, stats)]
    assert all(moved)                                   # updated by the teacher's own forward
    for before, t, s in zip(stats0, stats, student_stats):  # ... and not the EMA of the student's
        assert not np.allclose(t.numpy(), 0.9 * before + 0.1 * s.numpy(), rtol=1e-5, atol=1e-7)


def test_only_the_teacher_view_is_noised_and_the_noise_is_clamped():
    trainer = _trainer("mean_teacher.noise_std=1.0", "mean_teacher.noise_clip=0.2")
    # Two images of intensity std 0.5 and 2: the noise is clamped at 0.2 of each one's std.
    x = tf.constant(np.stack([np.resize([0.0, 1.0], (8, 8, 1)), np.resize([0.0, 4.0], (8, 8, 1))]), tf.float32)
    noise = trainer.noised(x, tf.constant([1, 2], tf.int64)).numpy() - x.numpy()
    for image, std in zip(noise, (0.5, 2.0)):
        assert np.abs(image).max() == pytest.approx(0.2 * std, rel=1e-5)
        assert np.isclose(np.abs(image), 0.2 * std, rtol=1e-5).mean() > 0.5
    # noise_on=teacher (SSL4MIS): the loss noises one view, the teacher's; noise_on=both: two.
    for noise_on, views in (("teacher", 1), ("both", 2)):
        trainer = _trainer(f"mean_teacher.noise_on={noise_on}")
        calls = []
        original = trainer.noised
        trainer.noised = lambda images, seed: calls.append(seed) or original(images, seed)
        images, masks = tf.zeros([2, 32, 32, 1]), tf.zeros([2, 32, 32, 1])
        trainer.compute_loss((images, masks), tf.zeros([2, 32, 32, 1]), tf.constant(0, tf.int64))
        assert len(calls) == views, noise_on


@pytest.mark.parametrize("on_labeled", [False, True])
def test_the_teacher_sees_only_the_images_the_consistency_is_on(on_labeled):
    """consistency_on_labeled=false (SSL4MIS): the teacher's forward, and so its BN batch
    statistics, cover the unlabelled images only; true (the paper): every image."""
    trainer = _trainer(f"mean_teacher.consistency_on_labeled={str(on_labeled).lower()}", "mean_teacher.teacher_bn=batch",
                       "model.dropout=0")
    teacher, student = trainer.models["teacher"], trainer.models["student"]
    images = tf.random.stateless_uniform([2, 32, 32, 1], [3, 4])
    unlabeled = tf.random.stateless_uniform([2, 32, 32, 1], [5, 6]) * 2.0
    masks = tf.cast(images > 0.5, tf.float32)
    step = tf.constant(3, tf.int64)
    x = tf.concat([images, unlabeled], 0)
    view = trainer.noised(x, trainer.replica_seed(step, mean_teacher.TEACHER_NOISE_STREAM))
    start = 0 if on_labeled else 2
    with mean_teacher.frozen_bn_statistics(teacher), mean_teacher.frozen_bn_statistics(student):
        p_t = tf.sigmoid(teacher(view[start:], training=True)).numpy()
        p_s = tf.sigmoid(trainer.training_forward(student, x, 2)).numpy()[start:]
    # Dropout off, so the expected value is exact.
    expected = np.mean((p_s - p_t) ** 2)
    _, logs = trainer.compute_loss((images, masks), unlabeled, step)
    np.testing.assert_allclose(logs["loss_unsup"].numpy(), expected, rtol=1e-5)


def test_teacher_forward_as_student_splits_the_teachers_batch_like_the_students():
    """teacher_forward=as_student with train.labeled_forward=separate: the teacher's BN normalises the
    labelled and the unlabelled images apart (two passes), as the student's does; joint: one pass."""
    images = tf.random.stateless_uniform([2, 32, 32, 1], [3, 4])
    unlabeled = tf.random.stateless_uniform([2, 32, 32, 1], [5, 6]) * 2.0    # other statistics
    masks = tf.cast(images > 0.5, tf.float32)
    step = tf.constant(3, tf.int64)
    x = tf.concat([images, unlabeled], 0)
    losses = {}
    for forward in ("joint", "as_student"):
        trainer = _trainer(f"mean_teacher.teacher_forward={forward}", "train.labeled_forward=separate",
                           "mean_teacher.teacher_bn=batch", "model.dropout=0")
        teacher, student = trainer.models["teacher"], trainer.models["student"]
        view = trainer.noised(x, trainer.replica_seed(step, mean_teacher.TEACHER_NOISE_STREAM))
        with mean_teacher.frozen_bn_statistics(teacher), mean_teacher.frozen_bn_statistics(student):
            p_s = tf.sigmoid(trainer.training_forward(student, x, 2)).numpy()
            p_t = tf.sigmoid(tf.concat([teacher(view[:2], training=True), teacher(view[2:], training=True)], 0)
                             if forward == "as_student" else teacher(view, training=True)).numpy()
        _, logs = trainer.compute_loss((images, masks), unlabeled, step)
        losses[forward] = logs["loss_unsup"].numpy()
        np.testing.assert_allclose(losses[forward], np.mean((p_s - p_t) ** 2), rtol=1e-5)
    # The teacher starts as a copy of the student: split like it, its targets equal the student's
    # predictions up to the noise; one joint pass normalises with other statistics.
    assert losses["as_student"] < 0.5 * losses["joint"]


def test_the_probe_scores_the_training_mode_teacher_without_moving_its_statistics():
    trainer = _trainer("mean_teacher.teacher_bn=batch")
    teacher = trainer.models["teacher"]
    stats = [v for v in teacher.weights if v.path.endswith(("moving_mean", "moving_variance"))]
    before = [v.numpy().copy() for v in stats]
    images = tf.random.stateless_uniform([4, 32, 32, 1], [1, 2])
    probe = tf.function(trainer.pseudo_targets)(images)
    for b, v in zip(before, stats):
        np.testing.assert_array_equal(b, v.numpy())
    # Batch statistics (training mode), not the fresh moving ones the evaluation would use.
    inference = tf.sigmoid(teacher(images, training=False))
    assert not np.allclose(probe.numpy(), inference.numpy(), atol=1e-3)


def test_smoke_training_end_to_end(tmp_path):
    out = tmp_path / "mt"
    assert main.main(["train", "--method", "mean_teacher", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    history = run_dir.read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for row in history:
        assert np.isfinite(float(row["loss_unsup"])) and float(row["loss_unsup"]) >= 0
        assert 0.0 <= float(row["pseudo_dice"]) <= 1.0
        assert 0.0 <= float(row["val_dice_student"]) <= 1.0
        assert "val_dice_teacher" not in row      # val_dice is the exported teacher's
    assert (out / "best_model.keras").exists() and (out / "metrics.json").exists()


def test_val_dice_is_the_exported_networks(tmp_path):
    """train.export=student: val_dice is the student's, the teacher (still selecting) gets its own column."""
    out = tmp_path / "mt_student"
    assert main.main(["train", "--method", "mean_teacher", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", "train.export=student", "train.epochs=1", "train.steps_per_epoch=2"]) == 0
    (row,) = run_dir.read_history(out)
    assert "val_dice_student" not in row and 0.0 <= float(row["val_dice_teacher"]) <= 1.0
    assert json.loads((out / "metrics.json").read_text())["network"] == "student"


def test_pancreas_presets_are_one_fair_family_with_the_seeds_method_settings():
    """Every pancreas_* preset trains the seed's supervised network, batch and budget; they differ
    only in the labelled fraction and the method's own section (the seed's values)."""
    sup, mt, mm = (config.resolve(f"pancreas_{m}") for m in ("supervised", "mean_teacher", "mixmatch"))
    for cfg in (sup, mt, mm):
        assert (cfg.data.image_size, cfg.train.batch_size, cfg.model.base_filters, cfg.train.epochs,
                cfg.train.patience, cfg.train.lr, cfg.train.schedule) == (256, 8, 32, 100, 15, sup.train.lr, sup.train.schedule)
    assert (mt.mean_teacher.ema_decay, mt.mean_teacher.consistency) == (0.99, 50.0)
    assert (mm.mixmatch.temperature, mm.mixmatch.alpha, mm.mixmatch.k) == (0.5, 0.75, 2)
    assert mt.data.labeled_fraction == mm.data.labeled_fraction == 30 / 197 and sup.data.labeled_fraction == 1.0
    # 281 labelled volumes: 28 test, 56 validation, 197 training, of which the seed's 30 keep labels.
    n_train = 281 - round(0.1 * 281) - round(0.2 * 281)
    assert (n_train, round(mt.data.labeled_fraction * n_train), round(sup.data.labeled_fraction * n_train)) == (197, 30, 197)


def test_the_probe_is_traced_once_per_run():
    trainer = _trainer()
    first = trainer.epoch_diagnostics(1)
    fn = trainer._probe_fn
    traces = fn.experimental_get_tracing_count()        # one per batch shape of the probe
    second = trainer.epoch_diagnostics(2)
    assert trainer._probe_fn is fn and 0 <= first["pseudo_dice"] <= 1 and 0 <= second["pseudo_dice"] <= 1
    assert fn.experimental_get_tracing_count() == traces <= 2
