"""URPC: uncertainty rectified pyramid consistency (Luo et al., MICCAI 2021), on the shared Trainer loop.

    python main.py train --method urpc --preset cpu
    python main.py train --method urpc --preset smoke --set urpc.consistency=1

One network f with S = model.depth outputs (semiseg/methods/urpc/network.py): the U-Net's main
logits z_0 and auxiliary logits z_1..z_{S-1} from decoder stages at 1/2, 1/4, ... of the input size,
each behind its own perturbation (feature noise, feature dropout, dropout), up-sampled to the input.
Per step, a training-mode forward over concat(labelled x, unlabelled u): x in a pass of its own with
train.labeled_forward=separate (the default); joint runs one pass as SSL4MIS, whose batch mixes both:
    L_sup = 1/S sum_s [lambda_dice Dice(z_s(x), y) + lambda_bce CE(z_s(x), y)]    (the base's supervised
            loss at every scale; SSL4MIS: (CE + Dice) summed over its 4 outputs / 8 = 0.5/0.5 here)
    on u, per pixel v, with class probabilities p_s = softmax(z_s) (binary: the 2-class form
    (1 - sigmoid(z_s), sigmoid(z_s))) and their mean over scales p_c = 1/S sum_s p_s:
    D_s(v) = sum_c p_c,c(v) log(p_c,c(v) / p_s,c(v)) = KL(p_c || p_s)   (the direction of SSL4MIS's
             code: KLDivLoss(input log p_s, target p_c) summed over the classes)
    w_s(v) = exp(-D_s(v))
    L_s    = mean_{v,c}(w_s (p_s - p_c)^2) / (mean_v(w_s) + 1e-8) + mean_v(D_s)
           (means over every unlabelled pixel v of the global batch and over the C classes; binary:
            the 2-class squared error averaged over its 2 classes is (sigmoid(z_s) - mean_s sigmoid)^2)
    L_unsup = 1/S sum_s L_s
    L = L_sup + w(t) L_unsup,   w(t) = consistency * exp(-5 (1 - t/T)^2), t = epoch (float), T = rampup_epochs
Nothing is detached, as in the reference code: gradients flow through p_c, D_s and w_s too.
Under a distribution strategy the means are over the global batch: mean_v(w_s) is all-reduced
(tf.distribute's all-reduce passes gradients back through itself), so summed over replicas the loss
and its gradient equal one replica's on the whole batch (tests/test_urpc.py checks 1 vs 2 replicas).

Hyperparameters (SSL4MIS's train_uncertainty_rectified_pyramid_consistency_2D.py and UNet_URPC):
consistency 0.1, sigmoid ramp-up; perturbations feature noise U(-0.3, 0.3) at 1/2, feature dropout
U(0.7, 0.9) at 1/4, dropout 0.5 at 1/8; 3x3 auxiliary heads; nearest-neighbour up-sampling.
Deviations:
- the ramp runs on the epoch as a float; SSL4MIS steps it in units of 150 iterations (200 units, its
  whole 30k-iteration run); each preset's `urpc.rampup_epochs` is its run length (acdc_3/7: 150);
- the backbone is this project's configured U-Net (model.*: filters, BatchNorm, its own dropout), its
  main head 1x1 (SSL4MIS: 3x3 for every head, here for the auxiliary heads only), not SSL4MIS's
  16-256 U-Net with per-level encoder dropout;
- depth != 4 gives depth - 1 auxiliary heads (SSL4MIS: 3); heads beyond urpc.perturbations' list
  take its last kind.
- random draws: Keras SeedGenerators; every replica draws the same feature noise, feature-dropout
  threshold and dropout mask (a batch-shared draw, as SSL4MIS's noise and threshold, for the first two).

Validation, model selection, export and prediction use the main output alone (perturbations off).
history.csv (names shared by every method, docs/outputs.md) gets `loss_sup` (mean over scales; its
`loss_dice` and `loss_bce`/`loss_sup_ce` parts are scale means too), `loss_sup_main` (the main output's),
`loss_unsup` (L_unsup, unweighted) and its parts `loss_unsup_rect` (the rectified squared error) and
`loss_unsup_kl` (mean D_s), `rampup`, `unsup_weight` (= w(t)) and, where hidden truth exists,
`pseudo_dice`: p_c, the consistency's target, as the loss sees it (training mode: perturbations on,
BatchNorm on batch statistics, its moving statistics and the random draws of training left untouched),
thresholded at 0.5 (multi-class: argmax) and scored against the hidden truth.
"""
from __future__ import annotations

import tensorflow as tf

from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.training.ramps import sigmoid_rampup
from semiseg.training.registry import register_method
from semiseg.training.trainer import Trainer

EPS = 1e-8          # SSL4MIS's guard on the weights' mean


def class_log_probabilities(logits):
    """log p over the classes, [B,H,W,K]: log-softmax for C channels, the 2-class form
    (log(1 - sigmoid), log sigmoid) for one binary channel; log-space for the KL's sake."""
    logits = tf.cast(logits, tf.float32)
    if int(logits.shape[-1]) > 1:
        return tf.nn.log_softmax(logits, axis=-1)
    return tf.concat([tf.math.log_sigmoid(-logits), tf.math.log_sigmoid(logits)], axis=-1)


@register_method("urpc")
class URPC(Trainer):
    """One pyramid network: supervision at every scale, each scale pulled to the scales' mean,
    rectified by its KL divergence from that mean."""
    uses_unlabeled = True

    def consistency_weight(self, epoch):
        u = self.section
        return u.consistency * sigmoid_rampup(epoch, u.rampup_epochs)

    def compute_loss(self, labeled, unlabeled, step):
        images, masks = labeled
        n_lab = tf.shape(images)[0]
        outputs = self.training_forward(self.models["student"], tf.concat([images, unlabeled], axis=0), n_lab)
        outputs = [tf.cast(z, tf.float32) for z in outputs]
        sup_terms = [self.supervised_loss(z[:n_lab], masks) for z in outputs]
        sup, dice, ce = (tf.add_n(list(parts)) / len(outputs) for parts in zip(*sup_terms))
        rect, kl = self.rectified_consistency([z[n_lab:] for z in outputs])
        unsup = rect + kl
        loss = sup + self.consistency_weight(self.epoch_float(step)) * unsup
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, self.ce_key: ce,
                      "loss_sup_main": sup_terms[0][0], "loss_unsup": unsup,
                      "loss_unsup_rect": rect, "loss_unsup_kl": kl}

    def rectified_consistency(self, logits_per_scale):
        """(1/S sum_s rectified squared error, 1/S sum_s mean D_s), this replica's shares."""
        log_p = [class_log_probabilities(z) for z in logits_per_scale]
        p = [tf.exp(lp) for lp in log_p]
        p_mean = tf.add_n(p) / len(p)
        rect, kl = [], []
        for p_s, log_p_s in zip(p, log_p):
            # KL(p_mean || p_s) per pixel; xlogy keeps 0 log 0 = 0 (and its gradient finite).
            d = tf.reduce_sum(tf.math.xlogy(p_mean, p_mean) - p_mean * log_p_s, axis=-1, keepdims=True)
            w = tf.exp(-d)
            # mean(w) over the global batch's pixels: every replica's shares summed.
            mean_w = self.all_reduce_sum(self.pixel_mean(w))
            rect.append(self.pixel_mean(w * tf.square(p_s - p_mean)) / (mean_w + EPS))
            kl.append(self.pixel_mean(d))
        return tf.add_n(rect) / len(rect), tf.add_n(kl) / len(kl)

    def schedule_logs(self, epoch_float: float) -> dict:
        return {"rampup": sigmoid_rampup(epoch_float, self.section.rampup_epochs),
                "unsup_weight": self.consistency_weight(epoch_float)}

    def pseudo_targets(self, images):
        """p_c, the mean over scales the consistency pulls each scale to, as the loss sees it:
        training mode (perturbations on, BN on batch statistics) with the BN moving statistics and
        the perturbations' random-generator states restored afterwards, so probing changes nothing
        of training. Binary: the foreground probability [B,H,W,1]; multi-class: [B,H,W,C]."""
        model = self.models["student"]
        states = [v for v in model.variables if v.path.endswith("seed_generator_state")]
        saved = [tf.identity(v.value) for v in states]
        with frozen_bn_statistics(model):
            outputs = model(images, training=True)
        p_mean = tf.add_n([tf.exp(class_log_probabilities(z)) for z in outputs]) / len(outputs)
        with tf.control_dependencies([p_mean]):      # restored after the draws (a tf.function runs every
            for v, value in zip(states, saved):         # stateful op, in program order per variable)
                v.assign(value)
        return p_mean if self.multiclass else p_mean[..., 1:]
