"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) on the shared Trainer loop.

    python main.py train --method mean_teacher --preset cpu
    python main.py train --method mean_teacher --preset smoke --set mean_teacher.consistency=10

Per step (noise_on=teacher, the default, as SSL4MIS's segmentation code; noise_on=both as the paper):
    student sees  x        (x + n_s with noise_on=both; dropout on)  -> p_s = sigmoid(student logits)
    teacher sees  x + s n_t (n ~ N(0, noise_std) clamped to +-noise_clip, s = the image's std;
                             BN on batch statistics, dropout on)
                                                                     -> p_t = sigmoid(teacher logits)
    L = L_sup(student, labelled) + w(t) * mean_pixels (p_s - p_t)^2   over unlabelled (+ labelled) x
    w(t) = consistency * exp(-5 (1 - t/T)^2),  t = epoch as a float, T = rampup_epochs
    after the optimizer update: teacher <- a * teacher + (1 - a) * student        (every step)
Both views share the tf.data geometry (weak flips/rotation/scale), so their pixels line up and the
consistency compares like with like; the noise draws are seeded with `replica_seed`, so every
replica of a distribution strategy perturbs its own batch differently.

BatchNorm (`mean_teacher.teacher_bn`):
  batch (default; the paper's code): the teacher's forward during training runs in training mode,
        so BN normalises with the batch's statistics and updates the teacher's *own* moving
        statistics, which evaluation then uses; the EMA covers the other weights only.
  moving: the teacher runs BN in inference mode and the EMA covers every weight, BN moving
        statistics included (the student's, averaged). Measured on the label-efficiency benchmark
        (seed 0): the teacher then trailed the student all run long (val Dice 0.14 vs 0.29 at epoch
        4, 0.355 vs 0.388 at the end, 30% labels): averaged statistics do not fit averaged weights.
        With `batch` the teacher caught up by epoch 4 and then tracked the student within 0.03
        (30%: val 0.439 vs 0.441 at the end; 10%: 0.416 test Dice instead of 0.392 with `moving`).
The dropout RNG state is never averaged: it is an integer counter.
`train.labeled_forward`: separate (the default, ours) runs the student on the labelled images and on
the unlabelled ones in two passes; joint (the papers' code) runs it once on both, so BN normalises the
supervised loss's images with statistics of both. On the label-efficiency benchmark (10% labels, 3
seeds, docs/benchmarks.md) joint cost about 4 test Dice points, already with the consistency at 0.
`teacher_forward` (with teacher_bn=batch and the consistency on labelled images too): joint (the
default; the papers' code) runs the teacher once over labelled and unlabelled images together;
as_student splits its forward as train.labeled_forward splits the student's, so with separate passes
teacher and student normalise the same groups of images (its moving statistics then average both
groups' passes, like the student's). With the unlabelled images alone, or teacher_bn=moving, both are one pass.
`ema_warmup` (the paper's code): a = min(1 - 1/(n + 1), ema_decay) after n updates, so the early
teacher is not dominated by the random initial weights.

Model selection and export: the teacher (the network the paper reports, and the steadier of the
two); set `train.export=student` or `mean_teacher.evaluate_teacher=false` to use the student.
The noise is in units of each image's intensity standard deviation (SSL4MIS's inputs are z-scored).
Measured on the embedded benchmark (64x64, 10% labels, seed 0), with noise of std 0.1 in absolute
units on [0, 1] pictures (about the lesions' contrast): noising both views kept the student at
validation Dice 0.43-0.56 for 11 epochs while supervised training reached 0.62-0.67; noising the
teacher's view only left the teacher at validation Dice 0.03-0.20 (its BN statistics and its EMA of a
student that never saw such noise), with the consistency weight at 0. Scaled to the image, the noise
perturbs without changing what is visible.

history.csv (names shared by every method, docs/outputs.md) gets `val_dice` (the exported network,
the teacher by default), `val_dice_student`, `loss_unsup` (the unweighted consistency MSE),
`rampup`, `unsup_weight` (= w(t)) and, where hidden truth exists, `pseudo_dice`: the target as the
loss sees it - the teacher in the mode it trains in (training mode with teacher_bn=batch, its moving
statistics untouched) on a noised view (a fixed draw) - thresholded at 0.5 and scored against the truth.
Multi-class (data.classes with K >= 2 names): p_s, p_t are softmax probabilities over the C classes and
the MSE runs over every class's probability; pseudo_dice is the mean per-class Dice of the teacher's
argmax (plus `pseudo_dice_<class>` columns).
"""
from __future__ import annotations

import tensorflow as tf

from semiseg.data import augment
from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.outputs import probabilities
from semiseg.training.registry import register_method
from semiseg.training.ema import copy_weights, ema_decay_at, ema_update, ema_weights
from semiseg.training.ramps import sigmoid_rampup
from semiseg.training.trainer import Trainer

STUDENT_NOISE_STREAM, TEACHER_NOISE_STREAM, STUDENT_STRONG_STREAM = 11, 12, 13
PROBE_NOISE_SEED = (12345, 1)     # the probe's noise draw: fixed, so epochs are scored on the same view


def noised_view(images, mt, seed):
    """images + s * clip(N(0, noise_std), +-noise_clip), s = each image's (per channel) intensity
    standard deviation: SSL4MIS adds N(0, 0.1) clamped to +-0.2 to z-scored images (s = 1), so
    the noise is 10% of the image's contrast whatever its value range ([0, 1] pictures here).
    `mt`: the mean_teacher config section."""
    noise = augment.gaussian_noise(tf.zeros_like(images), mt.noise_std, seed)
    if mt.noise_clip > 0:
        noise = tf.clip_by_value(noise, -mt.noise_clip, mt.noise_clip)
    scale = tf.math.reduce_std(tf.cast(images, tf.float32), axis=[1, 2], keepdims=True)
    return images + noise * tf.cast(scale, noise.dtype)


@register_method("mean_teacher")
class MeanTeacher(Trainer):
    """Student: L_sup + ramped MSE to an EMA teacher that sees a differently noised view."""
    uses_unlabeled = True

    def build_models(self) -> dict:
        models = super().build_models()
        # The teacher starts as an exact copy of the student (the paper's initialisation).
        copy_weights(models["teacher"], models["student"])
        # Keras runs the BN of a non-trainable model in inference mode even when called with
        # training=True, so a batch-statistics teacher stays "trainable" (the optimizer only ever
        # gets the student's variables either way).
        models["teacher"].trainable = self.cfg.mean_teacher.teacher_bn == "batch"
        return models

    def consistency_weight(self, epoch):
        mt = self.cfg.mean_teacher
        return mt.consistency * sigmoid_rampup(epoch, mt.rampup_epochs)

    def compute_loss(self, labeled, unlabeled, step):
        mt = self.cfg.mean_teacher
        images, masks = labeled
        n_lab = tf.shape(images)[0]
        x = tf.concat([images, unlabeled], axis=0)
        x_student = (self.noised(x, self.replica_seed(step, STUDENT_NOISE_STREAM)) if mt.noise_on == "both" else x)
        x_teacher = self.noised(x, self.replica_seed(step, TEACHER_NOISE_STREAM))
        if mt.student_view == "strong":
            # A harder view for the student than for the teacher (as in FixMatch-style consistency):
            # photometric only, so pixels still line up with the teacher's view.
            x_student = augment.batch_photometric(x_student, self.replica_seed(step, STUDENT_STRONG_STREAM))
        student = self.models["student"]
        logits = tf.cast(self.training_forward(student, x_student, n_lab), tf.float32)
        first = 0 if mt.consistency_on_labeled else n_lab
        # The teacher sees only the images the consistency is computed on: with
        # consistency_on_labeled=false the unlabelled ones (SSL4MIS's code), which also saves the
        # forward pass of the labelled half. teacher_bn=batch: training mode normalises with this
        # batch's statistics and updates the teacher's own moving statistics (its dropout is on
        # too, as in the paper's code).
        teacher = self.models["teacher"]
        if mt.teacher_forward == "as_student" and first == 0 and mt.teacher_bn == "batch":
            # The teacher's BN statistics come from the same image groups as the student's, so the
            # target on a labelled image is computed the way the student's prediction on it is.
            teacher_logits = self.training_forward(teacher, x_teacher, n_lab)
        else:
            teacher_logits = teacher(x_teacher[first:], training=mt.teacher_bn == "batch")
        teacher_logits = tf.cast(teacher_logits, tf.float32)
        sup, dice, bce = self.supervised_loss(logits[:n_lab], masks)
        # Squared error between probabilities (the paper's choice for its classifiers), mean over
        # pixels per image, then the global-batch mean; the teacher is a constant target.
        # Multi-class: the squared error of every class's softmax probability (SSL4MIS's MSE).
        squared = tf.square(probabilities(logits[first:]) - tf.stop_gradient(probabilities(teacher_logits)))
        cons = self.global_mean(tf.reduce_mean(squared, axis=[1, 2, 3]))
        weight = self.consistency_weight(self.epoch_float(step))
        loss = sup + weight * cons
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, self.ce_key: bce, "loss_unsup": cons}

    def noised(self, images, seed):
        return noised_view(images, self.cfg.mean_teacher, seed)

    def on_step_end(self, step):
        mt = self.cfg.mean_teacher
        decay = ema_decay_at(step, mt.ema_decay, mt.ema_warmup)
        ema_update(ema_weights(self.models["teacher"], mt.teacher_bn), ema_weights(self.models["student"], mt.teacher_bn),
                   decay)

    def eval_models(self) -> dict:
        if not self.cfg.mean_teacher.evaluate_teacher:
            return {"student": self.models["student"]}
        return {"teacher": self.models["teacher"], "student": self.models["student"]}

    def schedule_logs(self, epoch_float: float) -> dict:
        mt = self.cfg.mean_teacher
        return {"rampup": sigmoid_rampup(epoch_float, mt.rampup_epochs),
                "unsup_weight": self.consistency_weight(epoch_float)}

    def pseudo_targets(self, images):
        """What the student is pulled towards, as the loss sees it: the teacher in its training
        mode on a noised view (a fixed draw, so epochs compare), moving statistics untouched."""
        mt = self.cfg.mean_teacher
        teacher = self.models["teacher"]
        view = self.noised(images, tf.constant(PROBE_NOISE_SEED, tf.int64))
        if mt.teacher_bn == "batch":
            with frozen_bn_statistics(teacher):
                logits = teacher(view, training=True)
        else:
            logits = teacher(view, training=False)
        return probabilities(logits)
