"""Cross pseudo supervision (Chen et al., CVPR 2021) for binary and multi-class segmentation, on the shared Trainer loop.

    python main.py train --method cps --preset cpu
    python main.py train --method cps --preset smoke --set cps.cutmix=true

Two networks f1 ('student') and f2 ('student2') of the configured architecture, initialised
differently (network 2's random weights drawn again from seeds derived from `seed`:
initialise.py), trained together by the one optimizer. Per step, with labelled (x, y) and
unlabelled u (both weakly augmented in tf.data), X = concat(x, u), a forward per network (x in a pass
of its own with train.labeled_forward=separate, the default; one pass with joint, the paper's code):
    P1 = f1(X), P2 = f2(X)                       (training mode: BN batch statistics, dropout on)
    Y1 = hard(P1), Y2 = hard(P2)                 hard: argmax over the classes; binary: p >= 0.5;
                                                 no gradient flows through a pseudo label
    L_sup  = L_sup(P1[x], y) + L_sup(P2[x], y)   each the project's supervised loss (0.5 Dice + 0.5 CE)
    L_cps  = CE(P1, Y2) + CE(P2, Y1)             per-pixel CE (binary: BCE with the 0/1 label),
                                                 mean over every pixel of the labelled and unlabelled
                                                 images (cps.on_labeled=true, the paper; false: u only)
    L      = L_sup + w(t) * L_cps,   w(t) = cps.weight * exp(-5 (1 - t/T)^2), T = cps.rampup_epochs
                                     (T = 0: w = cps.weight throughout, the paper's constant lambda)
CutMix variant (cps.cutmix=true, the paper's CPS+CutMix): M = box masks (cutmix.py), partner
u' = u rolled by one image in the batch, u_mix = u (1 - M) + u' M. Pseudo labels come from the
UNMIXED images, mixed alike: Yk_mix = hard(fk(u)) (1 - M) + hard(fk(u')) M (fk in training mode, its
BN moving statistics untouched by these extra passes); the CPS term compares f1(u_mix) with Y2_mix
and f2(u_mix) with Y1_mix (plus the labelled images' term with cps.on_labeled=true).

Hyperparameters (cps.*): weight 1.5 (the paper's lambda for VOC; 6 for Cityscapes), rampup_epochs 0,
on_labeled true, cutmix false (3 boxes, total area 0.25-0.5 as the paper's code), probe_cases 32.
Deviations from the paper, and why:
- Supervised loss: the project's 0.5 Dice + 0.5 CE (SSL4MIS's choice for medical images) instead of
  the paper's CE alone, so that CPS compares fairly with the other methods.
- Labelled and unlabelled images pass through a network in ONE batch (SSL4MIS), so BatchNorm
  normalises them together; the paper's code runs them as two batches.
- Weight 1.5 constant by default (the paper, and the issue); SSL4MIS ramps 0.1 over the run
  (`--set cps.weight=0.1 cps.rampup_epochs=E` reproduces that). The paper starts from ImageNet-
  pretrained backbones; here both networks start from scratch, so early pseudo labels are noise:
  set rampup_epochs if that hurts.
- CutMix partners: the paper mixes two independently loaded unlabelled batches; here each image is
  mixed with its neighbour in the same batch (no second stream; every replica mixes its own share).
  Its CPS+CutMix code leaves the labelled images out of the CPS term: cps.on_labeled=false does so.
- One optimizer over both networks' variables (the paper: one SGD per network, same settings:
  equivalent for SGD, and for Adam too since its moments are per variable).

Validation and export: both networks are validated every epoch (history.csv: `val_dice` of network 1,
the exported one, and `val_dice_student2`); network 1 selects the best epoch and is exported, as the
paper reports one network (`train.export=student2` exports network 2).
history.csv also gets `loss_sup` (network 1's supervised loss), `loss_sup2` (network 2's),
`loss_unsup` (L_cps, both directions, unweighted), `rampup`, `unsup_weight` (= w(t)) and, where hidden
truth exists, `pseudo_dice`: network 2's hard pseudo labels for network 1, as the loss sees them
(network 2 in training mode, its moving statistics untouched), scored against the hidden truth.
Measured (--preset cpu: 64x64, 10% labels, 480 steps; seed 0, one run each, on a loaded 2-core CPU):
supervised test Dice 0.609 (best val 0.615); CPS 0.581 (best val 0.591; network 2 val 0.597 at the
end), 370 ms/step against supervised's 80; with cps.rampup_epochs=6, 0.575 (best val 0.644). One seed
of a short run: no gain shown here; compare over seeds at convergence (bench) before concluding.
Randomness: the CutMix boxes are stateless draws seeded with `replica_seed`, so every replica and
step draws its own and a resumed run draws the same.
"""
from __future__ import annotations

import tensorflow as tf

from semiseg.methods.cps.cutmix import box_masks, mix
from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.outputs import probabilities
from semiseg.training.ramps import sigmoid_rampup
from semiseg.training.registry import register_method
from semiseg.training.trainer import Trainer

CUTMIX_STREAM = 51      # replica_seed stream of the CutMix boxes (MixMatch uses 20, 40, 41; Mean Teacher 11-13)


@register_method("cps")
class CrossPseudoSupervision(Trainer):
    """L_sup of both networks + w * CE of each network against the other's hard pseudo labels."""
    uses_unlabeled = True

    def trainable_variables(self):
        # One optimizer trains both networks.
        return self.models["student"].trainable_variables + self.models["student2"].trainable_variables

    def cps_weight(self, epoch):
        c = self.section
        return c.weight * sigmoid_rampup(epoch, c.rampup_epochs)

    def hard_labels(self, logits):
        """A network's hard pseudo labels as CE targets, without gradient: binary 0/1 (p >= 0.5)
        [B,H,W,1]; multi-class one-hot of the argmax [B,H,W,C]."""
        probs = probabilities(logits)
        if self.multiclass:
            labels = tf.one_hot(tf.argmax(probs, axis=-1), self.n_classes, dtype=tf.float32)
        else:
            labels = tf.cast(probs >= 0.5, tf.float32)
        return tf.stop_gradient(labels)

    def pseudo_ce(self, logits, labels):
        """CE of `logits` against hard `labels`, the mean over every pixel of the global batch
        (this replica's share)."""
        logits = tf.cast(logits, tf.float32)
        if self.multiclass:
            ce = tf.nn.softmax_cross_entropy_with_logits(labels=labels, logits=logits)     # [B,H,W]
        else:
            ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=labels, logits=logits)    # [B,H,W,1]
        return self.pixel_mean(ce)

    def compute_loss(self, labeled, unlabeled, step):
        c = self.section
        net1, net2 = self.models["student"], self.models["student2"]
        images, masks = labeled
        n_lab = tf.shape(images)[0]
        if c.cutmix:
            boxes = box_masks(tf.shape(unlabeled)[0], int(unlabeled.shape[1]), int(unlabeled.shape[2]),
                              self.replica_seed(step, CUTMIX_STREAM), c.cutmix_boxes, c.cutmix_min_area,
                              c.cutmix_max_area)
            x_u = mix(unlabeled, tf.roll(unlabeled, 1, axis=0), boxes)
        else:
            x_u = unlabeled
        x = tf.concat([images, x_u], axis=0)
        logits1 = tf.cast(self.training_forward(net1, x, n_lab), tf.float32)
        logits2 = tf.cast(self.training_forward(net2, x, n_lab), tf.float32)
        sup1, dice1, ce1 = self.supervised_loss(logits1[:n_lab], masks)
        sup2, _, _ = self.supervised_loss(logits2[:n_lab], masks)
        labels1, labels2 = self.hard_labels(logits1), self.hard_labels(logits2)
        if c.cutmix:
            # The paper's CutMix variant: pseudo labels of the unmixed images, mixed like the images.
            # Extra training-mode passes: they must not count as BN batches.
            with frozen_bn_statistics(net1), frozen_bn_statistics(net2):
                plain1 = self.hard_labels(net1(unlabeled, training=True))
                plain2 = self.hard_labels(net2(unlabeled, training=True))
            mixed1 = mix(plain1, tf.roll(plain1, 1, axis=0), boxes)
            mixed2 = mix(plain2, tf.roll(plain2, 1, axis=0), boxes)
            labels1 = tf.concat([labels1[:n_lab], mixed1], axis=0)
            labels2 = tf.concat([labels2[:n_lab], mixed2], axis=0)
        first = 0 if c.on_labeled else n_lab
        cps1 = self.pseudo_ce(logits1[first:], labels2[first:])     # network 1 learns network 2's labels
        cps2 = self.pseudo_ce(logits2[first:], labels1[first:])     # and the other way round
        cps = cps1 + cps2
        loss = sup1 + sup2 + self.cps_weight(self.epoch_float(step)) * cps
        return loss, {"loss": loss, "loss_sup": sup1, "loss_dice": dice1, self.ce_key: ce1, "loss_sup2": sup2,
                      "loss_unsup": cps}

    def eval_models(self) -> dict:
        # Network 1 first: it selects the best epoch and is exported (the paper reports one network).
        return {"student": self.inference_network("student"), "student2": self.inference_network("student2")}

    def schedule_logs(self, epoch_float: float) -> dict:
        c = self.section
        return {"rampup": sigmoid_rampup(epoch_float, c.rampup_epochs), "unsup_weight": self.cps_weight(epoch_float)}

    def pseudo_targets(self, images):
        """Network 2's hard pseudo labels for network 1, as the loss sees them: network 2 in training
        mode (batch statistics, dropout), its moving statistics untouched; 0/1 (binary) or one-hot."""
        net2 = self.models["student2"]
        with frozen_bn_statistics(net2):
            logits = net2(images, training=True)
        return self.hard_labels(logits)
