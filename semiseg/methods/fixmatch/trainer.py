"""FixMatch (Sohn et al., NeurIPS 2020) for binary and multi-class segmentation, on the shared Trainer loop.

    python main.py train --method fixmatch --preset cpu
    python main.py train --method fixmatch --preset smoke --set fixmatch.weak_mode=train fixmatch.dice_weight=0

Per step, with labelled (x, y) and unlabelled u (both weakly augmented in tf.data: flips, rotation, scale):
 1. Weak view = u itself. p_w = f(u) without gradient; binary p = sigmoid, multi-class softmax.
    Pseudo label y_hat = [p >= 0.5] (binary) / argmax_c p_c (one-hot); confidence
    c = max(p, 1 - p) (binary) / max_c p_c; mask m = [c >= tau], tau = fixmatch.threshold = 0.95.
 2. Strong view: s = batch_photometric(u) (gamma/contrast/brightness, blur, noise, cutout; photometric
    only, so pixels stay aligned with y_hat), then CutMix across the unlabelled batch: image i gets one
    box B_i (area ~ U(0.02, 0.4), aspect ~ U(0.3, 3.3)) from image j = partner(i); y_hat and m are mixed
    with the same boxes (y_hat'_i = B_i y_hat_j + (1 - B_i) y_hat_i, likewise m').
 3. Training-mode forward of concat(x, s') (weak_mode=train: concat(x, u, s')): x in a pass of its own
    (train.labeled_forward=separate, the default), or one pass, BN statistics over all (joint, the paper's).
    L_u = (1 / (N H W)) sum_{n,h,w} m' CE(f(s'), y_hat')           normalised by ALL pixels of the
          + dice_weight * Dice(f(s') * m', y_hat' * m')            global unlabelled batch (the paper
                                                                    divides by the full batch size mu B)
    Dice: 1 - 2 sum(P T) / (sum P + sum T) over the confident pixels of the global batch (foreground
    classes for multi-class, as the supervised Dice). L = L_sup(x, y) + lambda_u L_u, lambda_u = 1.
Hyperparameters (fixmatch.*): threshold 0.95 and lambda_u 1 (the paper), CutMix on, dice_weight 1.

Deviations and choices:
 - Weak view (fixmatch.weak_mode): `eval` (default) labels with the student in inference mode (moving
   BN statistics, no dropout), as the common segmentation re-implementations do with model.eval();
   the paper's classifier code forwards x, u_weak and u_strong as one training-mode batch and stops the
   gradient of the weak logits (`train`: the same, the step's training-mode forward of concat(x, u, s'): batch
   statistics and dropout; the probe runs the weak view alone in training mode, BN moving statistics
   kept). Not a separate training-mode weak pass with frozen statistics inside the step: under
   MirroredStrategy that left the moving statistics at their initial values (see `forward`).
 - The unlabelled loss adds a masked Dice term (dice_weight = 1): SemSim, whose base this is, trains its
   FixMatch term with a (masked) Dice; dice_weight=0 gives the paper's CE alone. The CE term is
   normalised by all pixels (unconfident ones count as 0), as the paper's mean over the whole batch.
 - Strong augmentation is the project's photometric strong view plus CutMix, not RandAugment's
   geometric operations (which would have to be inverted on the pseudo labels); cutout is part of it.
 - No EMA network: FixMatch evaluates its student here (the paper's EMA of weights is for evaluation
   only and is left out; the shared loop's model selection validates the student each epoch).
Every draw (photometric, boxes, partners) is stateless and seeded with `replica_seed`, so each replica
draws its own; CutMix pairs images within a replica's share of the unlabelled batch.

history.csv: `loss_unsup` (the unweighted L_u), `loss_unsup_ce`, `loss_unsup_dice`, `mask_ratio` (fraction
of the strong view's pixels whose pseudo label is confident, after CutMix) and, where hidden truth
exists, `pseudo_dice`: the hard weak-view pseudo labels (all pixels, as y_hat above) vs the truth.
"""
from __future__ import annotations

import tensorflow as tf

from semiseg.data import augment
from semiseg.methods.fixmatch.cutmix import cutmix, cutmix_boxes, cutmix_partners
from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.outputs import probabilities
from semiseg.training.registry import register_method
from semiseg.training.trainer import Trainer

PHOTOMETRIC_STREAM, BOX_STREAM, PARTNER_STREAM = 60, 61, 62


def first_output(outputs):
    """The main output of a network that may return several (SemSim's student returns features too)."""
    return outputs[0] if isinstance(outputs, (list, tuple)) else outputs


def hard_pseudo_labels(probs, threshold: float):
    """(targets, mask) from probabilities: binary [B,H,W,1] -> targets [p >= 0.5] and confidence
    max(p, 1-p); multi-class [B,H,W,C] -> one-hot argmax and max_c p_c. mask = [confidence >= threshold]
    [B,H,W,1]. Both float32, without gradient."""
    probs = tf.stop_gradient(tf.cast(probs, tf.float32))
    if int(probs.shape[-1]) > 1:
        targets = tf.one_hot(tf.argmax(probs, axis=-1), int(probs.shape[-1]), dtype=tf.float32)
        confidence = tf.reduce_max(probs, axis=-1, keepdims=True)
    else:
        targets = tf.cast(probs >= 0.5, tf.float32)
        confidence = tf.maximum(probs, 1.0 - probs)
    return targets, tf.cast(confidence >= threshold, tf.float32)


@register_method("fixmatch")
class FixMatch(Trainer):
    """L_sup + lambda_u * confidence-masked CE (+ Dice) of the strong view against weak-view hard labels."""
    uses_unlabeled = True

    def weak_logits(self, images):
        """The student's logits on the weak view, without gradient, outside the training forward:
        inference mode (weak_mode=eval), or training mode with BN moving statistics kept (weak_mode=train;
        used by the probe only: the step folds the train-mode weak view into its one forward instead)."""
        model = self.models["student"]
        if self.section.weak_mode == "train":
            with frozen_bn_statistics(model):
                logits = first_output(model(images, training=True))
        else:
            logits = first_output(model(images, training=False))
        return tf.stop_gradient(tf.cast(logits, tf.float32))

    def strong_view(self, images, step, stream_offset: int = 0):
        """(strong images, mix): photometric strong augmentation then CutMix across the batch; `mix`
        applies the same boxes and partners to a list of aligned tensors [B,H,W,*] (pseudo labels,
        masks), or returns them as they are when CutMix is off."""
        fm = self.section
        x = images
        if fm.photometric:
            x = augment.batch_photometric(x, self.replica_seed(step, PHOTOMETRIC_STREAM + stream_offset))
        if not fm.cutmix:
            return x, list
        boxes = cutmix_boxes(tf.shape(x), self.replica_seed(step, BOX_STREAM + stream_offset),
                             (fm.cutmix_area_min, fm.cutmix_area_max))
        partner = cutmix_partners(tf.shape(x)[0], self.replica_seed(step, PARTNER_STREAM + stream_offset))
        return cutmix([x], boxes, partner)[0], lambda tensors: cutmix(tensors, boxes, partner)

    def forward(self, labeled_images, unlabeled, strong):
        """(logits of the labelled images, of the strong views, weak-view logits without gradient).
        weak_mode=train: the step's training-mode forward of concat(x, u, s) (train.labeled_forward=joint:
        one pass as the paper's code, BN statistics over the whole batch); a separate training-mode weak
        pass with frozen statistics is not used in the step: it changes BN momentum while MirroredStrategy
        traces replicas in parallel threads, and the other replica's forward then kept its moving
        statistics frozen."""
        model = self.models["student"]
        n_lab, n_u = tf.shape(labeled_images)[0], tf.shape(unlabeled)[0]
        if self.section.weak_mode == "train":
            logits = tf.cast(first_output(self.training_forward(model, tf.concat([labeled_images, unlabeled, strong], 0),
                                                                n_lab)), tf.float32)
            return logits[:n_lab], logits[n_lab + n_u:], tf.stop_gradient(logits[n_lab:n_lab + n_u])
        weak = self.weak_logits(unlabeled)
        logits = tf.cast(first_output(self.training_forward(model, tf.concat([labeled_images, strong], 0), n_lab)),
                         tf.float32)
        return logits[:n_lab], logits[n_lab:], weak

    def unsupervised_loss(self, logits, targets, mask):
        """(L_u, CE term, Dice term): masked CE normalised by every pixel of the global batch, plus
        dice_weight * Dice over the confident pixels (sums all-reduced)."""
        logits = tf.cast(logits, tf.float32)
        if self.multiclass:
            ce_map = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)[..., None]
            dice = self.multiclass_dice_loss(probabilities(logits) * mask, targets * mask)
        else:
            ce_map = tf.nn.sigmoid_cross_entropy_with_logits(labels=targets, logits=logits)
            dice = self.soft_dice_loss(tf.sigmoid(logits) * mask, targets * mask)
        ce = self.pixel_mean(ce_map * mask)
        return ce + self.section.dice_weight * dice, ce, dice

    def compute_loss(self, labeled, unlabeled, step):
        fm = self.section
        images, masks = labeled
        strong, mix = self.strong_view(unlabeled, step)
        logits_lab, logits_strong, weak = self.forward(images, unlabeled, strong)
        targets, confident = mix(list(hard_pseudo_labels(probabilities(weak), fm.threshold)))
        sup, dice, ce = self.supervised_loss(logits_lab, masks)
        loss_u, u_ce, u_dice = self.unsupervised_loss(logits_strong, targets, confident)
        loss = sup + fm.lambda_u * loss_u
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, self.ce_key: ce, "loss_unsup": loss_u,
                      "loss_unsup_ce": u_ce, "loss_unsup_dice": u_dice, "mask_ratio": self.pixel_mean(confident)}

    def schedule_logs(self, epoch_float: float) -> dict:
        return {"unsup_weight": self.section.lambda_u}

    def pseudo_targets(self, images):
        """The hard weak-view pseudo labels as the loss sees them (every pixel; the confidence mask is
        logged as mask_ratio): binary {0, 1} [B,H,W,1], multi-class one-hot [B,H,W,C]."""
        targets, _ = hard_pseudo_labels(probabilities(self.weak_logits(images)), self.section.threshold)
        return targets
