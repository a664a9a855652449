"""Mean Teacher (Tarvainen & Valpola, NeurIPS 2017) on the shared Trainer loop.

    python main.py train --method mean_teacher --preset cpu
    python main.py train --method mean_teacher --preset smoke --set mean_teacher.consistency=10

Per step:
    student sees  x + n_s  (Gaussian noise n_s, dropout on)          -> p_s = sigmoid(student logits)
    teacher sees  x + n_t  (an independent noise draw, inference mode) -> p_t = sigmoid(teacher logits)
    L = L_sup(student, labelled) + w(t) * mean_pixels (p_s - p_t)^2   over unlabelled (+ labelled) x
    w(t) = consistency * exp(-5 (1 - t/T)^2),  t = epoch as a float, T = rampup_epochs
    after the optimizer update: teacher <- a * teacher + (1 - a) * student        (every step)
Both views share the tf.data geometry (weak flips/rotation/scale), so their pixels line up and the
consistency compares like with like; the noise draws are seeded with `replica_seed`, so every
replica of a distribution strategy perturbs its own batch differently.

EMA over *all* weights: trainable ones and BatchNorm's moving mean/variance (the dropout RNG state
is skipped: it is an integer counter, and the teacher never drops out). The teacher always runs
BatchNorm in inference mode, so its statistics are the EMA of the student's moving statistics, never
batch statistics of its own: a teacher that never trains cannot update them any other way, and
inference-mode BN keeps its targets independent of what else is in the batch.
`ema_warmup` (the paper's code): a = min(1 - 1/(n + 1), ema_decay) after n updates, so the early
teacher is not dominated by the random initial weights.

Model selection and export: the teacher (the network the paper reports, and the steadier of the
two); set `train.export=student` or `mean_teacher.evaluate_teacher=false` to use the student.
history.csv gets `val_dice` (teacher), `val_dice_student`, `loss_cons`, `cons_weight` and, where
hidden truth exists, `pseudo_target_dice` (the teacher's thresholded prediction vs the truth).
"""
from __future__ import annotations

import tensorflow as tf

import augment
from methods import probe
from models_tf2 import build_model
from train_ssl_tf2 import Trainer, ema_update, register_method, sigmoid_rampup

STUDENT_NOISE_STREAM, TEACHER_NOISE_STREAM, STUDENT_STRONG_STREAM = 11, 12, 13


def ema_weights(model) -> list:
    """The weights the teacher averages: all of them (BN moving stats too) except RNG counters."""
    return [v for v in model.weights if "seed_generator_state" not in v.path]


def ema_decay_at(n_updates, ema_decay: float, warmup: bool):
    """a for the n-th update (n >= 1): min(1 - 1/(n+1), ema_decay) with warm-up, else ema_decay."""
    if not warmup:
        return tf.constant(ema_decay, tf.float32)
    n = tf.cast(n_updates, tf.float32)
    return tf.minimum(1.0 - 1.0 / (n + 1.0), ema_decay)


@register_method("mean_teacher")
class MeanTeacher(Trainer):
    """Student: L_sup + ramped MSE to an EMA teacher that sees a differently noised view."""
    uses_unlabeled = True

    @classmethod
    def build_networks(cls, cfg, image_size: int, channels: int) -> dict:
        return {"student": build_model(cfg.model, image_size, channels, "student"),
                "teacher": build_model(cfg.model, image_size, channels, "teacher")}

    def build_models(self) -> dict:
        models = super().build_models()
        # The teacher starts as an exact copy of the student (the paper's initialisation).
        for t, s in zip(ema_weights(models["teacher"]), ema_weights(models["student"])):
            t.assign(s)
        models["teacher"].trainable = False
        return models

    def consistency_weight(self, epoch):
        mt = self.cfg.mean_teacher
        return mt.consistency * sigmoid_rampup(epoch, mt.rampup_epochs)

    def compute_loss(self, labeled, unlabeled, step):
        mt = self.cfg.mean_teacher
        images, masks = labeled
        n_lab = tf.shape(images)[0]
        x = tf.concat([images, unlabeled], axis=0)
        x_student = augment.gaussian_noise(x, mt.noise_std, self.replica_seed(step, STUDENT_NOISE_STREAM))
        x_teacher = augment.gaussian_noise(x, mt.noise_std, self.replica_seed(step, TEACHER_NOISE_STREAM))
        if mt.student_view == "strong":
            # A harder view for the student than for the teacher (as in FixMatch-style consistency):
            # photometric only, so pixels still line up with the teacher's view.
            x_student = augment.batch_photometric(x_student, self.replica_seed(step, STUDENT_STRONG_STREAM))
        logits = tf.cast(self.models["student"](x_student, training=True), tf.float32)
        teacher_logits = tf.cast(self.models["teacher"](x_teacher, training=False), tf.float32)
        sup, dice, bce = self.supervised_loss(logits[:n_lab], masks)
        first = 0 if mt.consistency_on_labeled else n_lab
        # Squared error between probabilities (the paper's choice for its classifiers), mean over
        # pixels per image, then the global-batch mean; the teacher is a constant target.
        squared = tf.square(tf.sigmoid(logits[first:]) - tf.stop_gradient(tf.sigmoid(teacher_logits[first:])))
        cons = self.global_mean(tf.reduce_mean(squared, axis=[1, 2, 3]))
        weight = self.consistency_weight(self.epoch_float(step))
        loss = sup + weight * cons
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, "loss_bce": bce, "loss_cons": cons}

    def on_step_end(self, step):
        mt = self.cfg.mean_teacher
        decay = ema_decay_at(self.optimizer.iterations, mt.ema_decay, mt.ema_warmup)
        ema_update(ema_weights(self.models["teacher"]), ema_weights(self.models["student"]), decay)

    def eval_models(self) -> dict:
        if not self.cfg.mean_teacher.evaluate_teacher:
            return {"student": self.models["student"]}
        return {"teacher": self.models["teacher"], "student": self.models["student"]}

    def schedule_logs(self, epoch_float: float) -> dict:
        mt = self.cfg.mean_teacher
        return {"rampup": sigmoid_rampup(epoch_float, mt.rampup_epochs),
                "cons_weight": self.consistency_weight(epoch_float)}

    def pseudo_targets(self, images):
        """What the student is pulled towards: the teacher's probabilities (inference mode)."""
        return tf.sigmoid(tf.cast(self.models["teacher"](images, training=False), tf.float32))

    def epoch_diagnostics(self, epoch: int) -> dict:
        cases = probe.probe_case_ids(self.cfg, self.data, self.cfg.mean_teacher.probe_cases)
        if not cases:
            return {}
        fn = tf.function(self.pseudo_targets, reduce_retracing=True)
        return {"pseudo_target_dice": probe.pseudo_target_dice(fn, self.data, cases, self.cfg.train.eval_batch_size)}
