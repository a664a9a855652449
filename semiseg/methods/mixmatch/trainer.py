"""MixMatch (Berthelot et al., NeurIPS 2019) for binary and multi-class segmentation, on the shared Trainer loop.

    python main.py train --method mixmatch --preset cpu
    python main.py train --method mixmatch --preset smoke --set mixmatch.lambda_u=10

Per step, with labelled (x, y) and unlabelled u (both already weakly augmented in tf.data):
 1. K views of u: random flips (the paper's weak views; `mixmatch.photometric_views=true` adds the
    strong photometric jitter of `batch_photometric`), each its own seed.
 2. Guess: q = mean_k undo_flips_k(sigmoid(f(view_k))), pixel by pixel (undoing the flips lines
    the K predictions up). As in the paper's code, f runs in training mode (batch statistics,
    dropout) but the guessing passes leave the BN moving statistics alone (`mixmatch.guess_mode`;
    `inference` = moving statistics, no dropout, this project's first choice).
 3. Sharpen: q^(1/T) / (q^(1/T) + (1-q)^(1/T)), the two-class form of the paper's Sharpen.
 4. U' = the K views, each with the guess flipped back onto it; X' = (x, y).
    W = shuffle(concat(X', U')); lambda ~ Beta(alpha, alpha) per example, lambda' = max(lambda, 1-lambda)
    (so each mixed example stays closer to its own first input); X'' = MixUp(X', W[:|X'|]),
    U'' = MixUp(U', W[|X'|:]), images and targets mixed with the same lambda'.
 5. L = L_sup(f(X''), soft targets) + lambda_u * ramp(t) * mean_pixels (sigmoid(f(U'')) - q'')^2,
    training-mode forward of concat(X'', U'') (X'' in a pass of its own with train.labeled_forward=separate,
    the default; one pass with joint, the paper's code); ramp(t) linear over rampup_epochs (the
    paper's; `mixmatch.ramp=sigmoid` for Mean Teacher's ramp).
 6. An EMA of the weights (decay 0.999 as in the paper, with Mean Teacher's warm-up so that short
    runs are not dominated by the initial weights) is the network validated, selected and exported
    (`ema`; mixmatch.ema_decay=0 keeps the student only). Its BN statistics are averaged too.
Every random draw (views, flips, shuffle, Beta) is stateless and seeded with `replica_seed`, so each
replica of a distribution strategy draws its own; Beta is drawn as G1/(G1+G2) from two stateless
Gamma(alpha) draws (TF has no stateless Beta).

history.csv (names shared by every method, docs/outputs.md) gets `loss_unsup` (the unweighted L2),
`rampup`, `unsup_weight` (= lambda_u * ramp) and, where hidden truth exists, `pseudo_dice`: the
sharpened guess (>= 0.5) on a fixed probe vs the hidden truth.

Multi-class (data.classes with K >= 2 names): guesses are the mean softmax over the K views,
sharpened over the classes (p_c^(1/T) / sum_k p_k^(1/T), the paper's Sharpen); labels enter MixUp
one-hot, so mixed targets are class distributions; the L2 runs over every class's probability and
the supervised term is multi-class Dice + CE on the mixed soft targets; pseudo_dice is the mean
per-class Dice of the guess's argmax (plus `pseudo_dice_<class>`).
"""
from __future__ import annotations

import tensorflow as tf

from semiseg.data import augment
from semiseg.training.registry import register_method
from semiseg.training.ema import copy_weights, ema_decay_at, ema_update, ema_weights
from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.outputs import probabilities
from semiseg.training.ramps import linear_rampup, sigmoid_rampup
from semiseg.training.trainer import Trainer

VIEW_STREAM, SHUFFLE_STREAM, BETA_STREAM = 20, 40, 41
PROBE_SEED = (12345, 0)     # the probe's K views: fixed, so epochs are scored on the same views


def sharpen(probs, temperature: float, over_classes: bool = False):
    """Per-pixel two-class sharpening of foreground probabilities: p^(1/T) / (p^(1/T) + (1-p)^(1/T));
    T -> 0 gives a step. over_classes: `probs` hold class distributions on the last axis (multi-class
    softmax), sharpened in the paper's own form p_c^(1/T) / sum_k p_k^(1/T)."""
    if over_classes:
        p = tf.clip_by_value(tf.cast(probs, tf.float32), 1e-7, 1.0)
        # softmax(log p / T) = p^(1/T) / sum p^(1/T), in log space for the same underflow reason.
        return tf.nn.softmax(tf.math.log(p) / temperature, axis=-1)
    p = tf.clip_by_value(tf.cast(probs, tf.float32), 1e-7, 1.0 - 1e-7)
    # In log space: p^(1/T) underflows for small p and T.
    a, b = tf.math.log(p) / temperature, tf.math.log(1.0 - p) / temperature
    return tf.sigmoid(a - b)


def sample_mixup_lambda(batch, alpha: float, seed):
    """lambda' = max(lambda, 1 - lambda), lambda ~ Beta(alpha, alpha), one per example, stateless."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 2)
    g1 = tf.random.stateless_gamma([batch], seeds[0], alpha=alpha)
    g2 = tf.random.stateless_gamma([batch], seeds[1], alpha=alpha)
    lam = g1 / tf.maximum(g1 + g2, 1e-12)
    return tf.maximum(lam, 1.0 - lam)


def mixup(images, targets, other_images, other_targets, lam):
    """lam * first + (1 - lam) * second, the same per-example lam for images and targets."""
    lam = tf.reshape(lam, [-1, 1, 1, 1])
    return lam * images + (1.0 - lam) * other_images, lam * targets + (1.0 - lam) * other_targets


def guess_labels(model, images, seed, k: int, temperature: float, photometric: bool = True, training: bool = False):
    """Sharpened mean of the model's probabilities over K flipped (+ jittered) views of `images`;
    `training`: the network in training mode, its BN moving statistics untouched.

    Returns (guess [B,H,W,1] (multi-class: [B,H,W,C]) aligned with `images`, views: list of (view images, flips)).
    """
    views, total = [], 0.0
    for i, view_seed in enumerate(tf.unstack(tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), k))):
        flip_seed, jitter_seed = tf.unstack(tf.random.experimental.stateless_split(view_seed, 2))
        view, flips = augment.random_flips(images, flip_seed)
        if photometric:
            view = augment.batch_photometric(view, jitter_seed)
        views.append((view, flips))
        if training:
            with frozen_bn_statistics(model):
                logits = model(view, training=True)
        else:
            logits = model(view, training=False)
        total += augment.undo_flips(probabilities(logits), flips)
    return tf.stop_gradient(sharpen(total / k, temperature, over_classes=int(total.shape[-1]) > 1)), views


@register_method("mixmatch")
class MixMatch(Trainer):
    """L_sup on mixed labelled images + ramped L2 to sharpened, mixed guesses on unlabelled ones."""
    uses_unlabeled = True

    def build_models(self) -> dict:
        models = super().build_models()
        copy_weights(models["ema"], models["student"])      # starts as a copy
        models["ema"].trainable = False
        return models

    def on_step_end(self, step):
        decay = ema_decay_at(step, self.cfg.mixmatch.ema_decay, True)
        ema_update(ema_weights(self.models["ema"]), ema_weights(self.models["student"]), decay)

    def eval_models(self) -> dict:
        if self.cfg.mixmatch.ema_decay > 0:
            return {"ema": self.models["ema"], "student": self.models["student"]}
        return {"student": self.models["student"]}

    def ramp(self, epoch):
        mm = self.cfg.mixmatch
        return (linear_rampup if mm.ramp == "linear" else sigmoid_rampup)(epoch, mm.rampup_epochs)

    def unlabeled_weight(self, epoch):
        return self.cfg.mixmatch.lambda_u * self.ramp(epoch)

    def compute_loss(self, labeled, unlabeled, step):
        mm = self.cfg.mixmatch
        model = self.models["student"]
        images, masks = labeled
        guess, views = guess_labels(model, unlabeled, self.replica_seed(step, VIEW_STREAM), mm.k,
                                    mm.temperature, mm.photometric_views, training=mm.guess_mode == "train")
        u_images = tf.concat([v for v, _ in views], axis=0)
        u_targets = tf.concat([augment.apply_flips(guess, flips) for _, flips in views], axis=0)
        all_images = tf.concat([images, u_images], axis=0)
        # Multi-class: one-hot labels, so MixUp mixes class distributions like the guesses.
        all_targets = tf.concat([self.targets(masks), u_targets], axis=0)
        n_all, n_lab = tf.shape(all_images)[0], tf.shape(images)[0]
        order = tf.random.experimental.stateless_shuffle(tf.range(n_all), self.replica_seed(step, SHUFFLE_STREAM))
        lam = sample_mixup_lambda(n_all, mm.alpha, self.replica_seed(step, BETA_STREAM))
        mixed_images, mixed_targets = mixup(all_images, all_targets, tf.gather(all_images, order),
                                            tf.gather(all_targets, order), lam)
        if not mm.mix_labeled:
            # "MixUp on unlabeled only": X' = X. Measured on the bench at 30% labels (seed 0), mixing the
            # labelled batch alone (lambda_u = 0) cost 4 points against supervised (docs/benchmarks.md).
            mixed_images = tf.concat([images, mixed_images[n_lab:]], axis=0)
            mixed_targets = tf.concat([self.targets(masks), mixed_targets[n_lab:]], axis=0)
        logits = tf.cast(self.training_forward(model, mixed_images, n_lab), tf.float32)
        sup, dice, bce = self.supervised_loss(logits[:n_lab], mixed_targets[:n_lab])
        squared = tf.square(probabilities(logits[n_lab:]) - mixed_targets[n_lab:])
        loss_u = self.global_mean(tf.reduce_mean(squared, axis=[1, 2, 3]))
        loss = sup + self.unlabeled_weight(self.epoch_float(step)) * loss_u
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, self.ce_key: bce, "loss_unsup": loss_u}

    def schedule_logs(self, epoch_float: float) -> dict:
        return {"rampup": self.ramp(epoch_float),
                "unsup_weight": self.unlabeled_weight(epoch_float)}

    def pseudo_targets(self, images):
        """The sharpened guess the unlabelled loss trains on (fixed views, so epochs compare)."""
        mm = self.cfg.mixmatch
        guess, _ = guess_labels(self.models["student"], images, tf.constant(PROBE_SEED, tf.int64), mm.k,
                                mm.temperature, mm.photometric_views, training=mm.guess_mode == "train")
        return guess
