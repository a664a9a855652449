"""Bayesian pseudo labels, SegPL-VI (Xu et al., MICCAI 2022), for binary and multi-class 2D slices.

    python main.py train --method bayesian_pl --preset cpu
    python main.py train --method bayesian_pl --preset smoke --set bayesian_pl.threshold_temperature=0.05

Pseudo labelling read as EM: the network labels its own unlabelled images (E-step) and trains on
those labels (M-step); the confidence threshold T is a latent variable with a Gaussian prior
p(T) = N(mu0, sigma0^2) and a variational posterior q(T) = N(mu, sigma^2), learned by maximising
E_q[log p(Y_u | X_u, T)] - KL(q || p). Per step, with labelled (x, y) and unlabelled u:
 1. Training-mode forward of concat(x, u): x in a pass of its own (train.labeled_forward=separate, the
    default), or the reference code's single pass, BN over both (joint).
 2. T = mu + sigma * eps, eps ~ N(0, 1): one reparameterised draw per step, the same on every replica
    (a stateless seed of the step, not of the replica: T is one global latent variable).
 3. Pseudo labels from the network's own prediction on u (no gradient through them):
      binary:      p = sigmoid(z), c = max(p, 1 - p), yhat = 1(p > 0.5)
      multi-class: p = softmax(z), c = max_k p_k,     yhat = onehot(argmax_k p_k)
    mask m = 1(c > T)   (threshold_temperature tau > 0: m = sigmoid((c - T) / tau), c without gradient)
 4. L_u = lambda_dice * Dice(p * m, yhat * m) + lambda_bce * sum(m * CE(z, yhat)) / sum(m)
    (train.lambda_dice / lambda_bce: 0.5 / 0.5 as the reference code's pseudo-label loss; sums over the
    global batch; Dice over the foreground classes for multi-class; 0 where m keeps nothing).
 5. KL(q || p) = log(sigma0 / sigma) + (sigma^2 + (mu - mu0)^2) / (2 sigma0^2) - 1/2   (closed form)
 6. L = L_sup(x, y) + r(t) * (lambda_u * L_u + kl_weight * KL),
    r(t) = clip((t / E - rampup_start) / rampup_length, 0, 1), t = epoch (float), E = train.epochs:
    EMSSL's linear ramp, 0 for the first 40% of the run, 1 after 50%; lambda_u = 1 (alpha * beta),
    kl_weight = 0.1 (its `0.1 * alpha(t) * KL`).
The ramp is in fractions of the run (the reference's), so raising train.epochs on --resume (allowed
with the constant LR schedule) stretches the ramp of the steps to come as it would the run's.
mu and log(sigma) are two learned scalars (`self.state`, checkpointed, trained by the same optimizer
as the network: `trainable_variables`), initialised at the prior.

How T gets a gradient. In the reference code (github.com/moucheng2017/EMSSL, libs/Train3D.py and
libs/Loss.py kld_loss) the pseudo label is the hard comparison `(p > T).float()`: the likelihood term
gives T no gradient, and q(T) is trained by the KL term alone. `threshold_temperature = 0` (default)
does exactly that: q relaxes towards the prior and what the method adds over fixed-threshold pseudo
labelling is a threshold drawn afresh each step. `threshold_temperature > 0` is this project's
option (not in the paper or code): a sigmoid relaxation of the mask, through which the masked mean of
L_u moves T towards the pixels whose loss is below the kept pixels' mean, against the KL's pull.

Deviations from the paper and its code, all stated:
- 2D slices, not 3D volumes (the reference code is 3D: 32x128x128 crops of BraTS whole tumour).
- The posterior is two global scalars (mu, log sigma), as this project's issue asks; the reference
  amortises it: a linear head on pooled decoder features gives mu (through ReLU) and log-variance,
  256 draws per image averaged into one threshold. Here mu has no ReLU and T is one draw.
- The threshold masks pixels by confidence (largest class probability; binary max(p, 1-p)) and the
  label is the argmax, so one rule covers C classes (`label_rule=confidence`, the default). The
  reference code (binary) labels every voxel 1(p > T), i.e. it moves the foreground cut instead of
  dropping uncertain pixels: `label_rule=cut` (binary only) does that, and `pseudo_kept` is then 1.
- No gates: the reference drops L_u where pseudo labels have < 0.05% foreground and drops L_u and KL
  for a step whose T falls outside (0, 1). Here a T >= 1 keeps no pixel (L_u = 0), a T below the
  smallest confidence keeps all, and the KL term always applies.
- Optimizer, schedule and augmentation are the project's (train.*), not EMSSL's AdamW with lr 1e-3;
  train.weight_decay > 0 decays mu and log sigma too (as EMSSL's AdamW decays its threshold head).

history.csv (names shared by every method, docs/outputs.md): `loss_unsup` (L_u unweighted), `loss_kl`
(KL unweighted), `threshold_sample` (the epoch's mean of the drawn T), `pseudo_kept` (fraction of
unlabelled pixels with c > T, the drawn T), `threshold_mu`, `threshold_sigma` (the posterior at the
epoch's end), `rampup`, `unsup_weight` (= lambda_u * r) and, where hidden truth exists,
`pseudo_dice`: the masked pseudo labels at T = mu (dropped pixels count as background) vs the truth.
"""
from __future__ import annotations

import math

import tensorflow as tf

from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.outputs import probabilities
from semiseg.training.registry import register_method
from semiseg.training.trainer import Trainer

THRESHOLD_STREAM = 30       # the seed stream of the threshold's draw (one per step, every replica alike)


def gaussian_kl(mu, log_sigma, mu0: float, sigma0: float):
    """KL(N(mu, sigma^2) || N(mu0, sigma0^2)) in closed form, from log(sigma) (the learned parameter)."""
    return (math.log(sigma0) - log_sigma + (tf.exp(2.0 * log_sigma) + tf.square(mu - mu0)) / (2.0 * sigma0 ** 2)
            - 0.5)


def ramp(epoch, epochs: int, start: float, length: float):
    """EMSSL's ramp: 0 until `start` of the run, then linear to 1 over `length` of it (fractions)."""
    if tf.is_tensor(epoch):
        t = tf.cast(epoch, tf.float32) / float(epochs)
        if length <= 0:
            return tf.cast(t >= start, tf.float32)
        return tf.clip_by_value((t - start) / length, 0.0, 1.0)
    t = float(epoch) / epochs
    if length <= 0:
        return float(t >= start)
    return min(max((t - start) / length, 0.0), 1.0)


@register_method("bayesian_pl")
class BayesianPseudoLabels(Trainer):
    """L_sup + ramped (pseudo-label loss above a sampled threshold + KL of the threshold's posterior)."""
    uses_unlabeled = True

    def build_state(self) -> dict:
        s = self.section
        # Initialised at the prior: KL = 0 at the start (the reference's head starts at random).
        return {"threshold_mu": tf.Variable(s.prior_mu, dtype=tf.float32, name="threshold_mu"),
                "threshold_log_sigma": tf.Variable(math.log(s.prior_sigma), dtype=tf.float32,
                                                   name="threshold_log_sigma")}

    def trainable_variables(self):
        return list(self.models["student"].trainable_variables) + [self.state["threshold_mu"],
                                                                   self.state["threshold_log_sigma"]]

    def weight(self, epoch):
        s = self.section
        return ramp(epoch, self.cfg.train.epochs, s.rampup_start, s.rampup_length)

    def sample_threshold(self, step):
        """T = mu + sigma * eps; eps from a seed of the step alone, so every replica draws the same T."""
        seed = tf.stack([tf.constant(self.cfg.seed * 1000 + THRESHOLD_STREAM, tf.int64), tf.cast(step, tf.int64)])
        eps = tf.random.stateless_normal([], seed)
        return self.state["threshold_mu"] + tf.exp(self.state["threshold_log_sigma"]) * eps

    def pseudo_labels(self, logits):
        """(probabilities, confidence [B,H,W,1], hard labels as targets), labels and confidence constant."""
        probs = probabilities(logits)
        if self.multiclass:
            confidence = tf.reduce_max(probs, axis=-1, keepdims=True)
            labels = tf.one_hot(tf.argmax(probs, axis=-1), self.n_classes, dtype=tf.float32)
        else:
            confidence = tf.maximum(probs, 1.0 - probs)
            labels = tf.cast(probs > 0.5, tf.float32)
        return probs, tf.stop_gradient(confidence), tf.stop_gradient(labels)

    @staticmethod
    def cut_labels(probs, threshold):
        """label_rule=cut (EMSSL's binary rule): every pixel labelled 1(p > T), constant."""
        return tf.stop_gradient(tf.cast(probs > threshold, tf.float32))

    def keep_mask(self, confidence, threshold):
        tau = self.section.threshold_temperature
        if tau > 0:
            return tf.sigmoid((confidence - threshold) / tau)
        return tf.cast(confidence > threshold, tf.float32)

    def unlabeled_loss(self, logits, mask, probs, labels):
        """lambda_dice * Dice over the kept pixels + lambda_bce * CE averaged over the kept pixels."""
        t = self.cfg.train
        if self.multiclass:
            ce = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)[..., None]
            dice = self.multiclass_dice_loss(probs * mask, labels * mask)
        else:
            ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)
            dice = self.soft_dice_loss(probs * mask, labels * mask)
        return t.lambda_dice * dice + t.lambda_bce * self.masked_mean(ce, mask)

    def kl(self):
        s = self.section
        return gaussian_kl(self.state["threshold_mu"], self.state["threshold_log_sigma"], s.prior_mu, s.prior_sigma)

    def compute_loss(self, labeled, unlabeled, step):
        s = self.section
        images, masks = labeled
        n_lab = tf.shape(images)[0]
        logits = tf.cast(self.training_forward(self.models["student"], tf.concat([images, unlabeled], axis=0), n_lab),
                         tf.float32)
        sup, dice, bce = self.supervised_loss(logits[:n_lab], masks)
        u_logits = logits[n_lab:]
        probs, confidence, labels = self.pseudo_labels(u_logits)
        threshold = self.sample_threshold(step)
        if s.label_rule == "cut":
            labels = self.cut_labels(probs, threshold)
            mask = kept = tf.ones_like(labels)
        else:
            mask = self.keep_mask(confidence, threshold)
            kept = tf.cast(confidence > threshold, tf.float32)
        loss_u = self.unlabeled_loss(u_logits, mask, probs, labels)
        kl = self.kl() / self.n_replicas        # a global scalar: this replica's share
        weight = self.weight(self.epoch_float(step))
        loss = sup + weight * (s.lambda_u * loss_u + s.kl_weight * kl)
        share = 1.0 / self.n_replicas           # replica-independent values: sums over replicas = the value
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, self.ce_key: bce, "loss_unsup": loss_u,
                      "loss_kl": kl, "threshold_sample": threshold * share,
                      "pseudo_kept": self.pixel_mean(kept)}

    def schedule_logs(self, epoch_float: float) -> dict:
        s = self.section
        return {"rampup": self.weight(epoch_float), "unsup_weight": s.lambda_u * self.weight(epoch_float),
                "threshold_mu": float(self.state["threshold_mu"].numpy()),
                "threshold_sigma": float(math.exp(float(self.state["threshold_log_sigma"].numpy())))}

    def pseudo_targets(self, images):
        """The pseudo labels the loss trains on, kept at T = mu (the posterior mean; masked pixels are
        background for the probe; label_rule=cut: 1(p > mu)), from the network in training mode with
        its BN statistics untouched."""
        model = self.models["student"]
        with frozen_bn_statistics(model):
            logits = tf.cast(model(images, training=True), tf.float32)
        probs, confidence, labels = self.pseudo_labels(logits)
        if self.section.label_rule == "cut":
            return self.cut_labels(probs, self.state["threshold_mu"])
        return labels * tf.cast(confidence > self.state["threshold_mu"], tf.float32)
