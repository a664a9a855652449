"""SemSim (semantic similarity; the seed article) on FixMatch, for binary and multi-class segmentation.

    python main.py train --method semsim --preset cpu
    python main.py train --method semsim --preset smoke --set semsim.cross_weight=0

The student returns (logits, features F) (`semsim.feature_layer`, a decoder map). Per step, with labelled
(x, y) and unlabelled u:
 1. FixMatch (semiseg.methods.fixmatch.trainer): weak view u -> hard pseudo labels y_hat and confidence
    mask m (>= tau); strong view s1 = CutMix(photometric(u)), y_hat and m mixed alike; L_u as FixMatch.
    A second strong view s2 (its own photometric draw and CutMix boxes) feeds the cross-image term.
    Training-mode forward of concat(x, s1, s2) (weak_mode=train: concat(x, u, s1, s2)), x in a pass of its
    own unless train.labeled_forward=joint (one pass, the paper's code).
 2. Intra-image consistency (Eqs. 4-5): F and the probabilities P are average-pooled to S x S
    (S = semsim.affinity_size, 16 by default, or the feature map's side if smaller; N = S^2 positions), f = F / |F| per position,
    M = softmax_row(f f^T / t_a) [N x N] per image, refined P_in = (P + M P) / 2 (the article's
    P + P M, halved so that it stays a probability: M's rows sum to 1). Computed for s1 (with gradient)
    and for the weak view (without; then CutMix-ed with s1's boxes at S x S), and
    L_intra = Dice(P_in(s1) * w, P_in(weak)' * w), w = the pooled confidence mask of s1 (the fraction of
    confident pixels in each cell).
 3. Cross-image consistency (Eqs. 7-13): the labelled features (pooled, normalised, no gradient) on a
    g x g grid (g = semsim.grid, 2): per labelled image l, region r and class c the prototype
    G_lrc = sum_k y_c(k) f(k) / sum_k y_c(k) over the region's positions (y pooled to class fractions),
    kept where class c is present. Prototypes are ALL-GATHERED across replicas (ReplicaContext.all_gather),
    so every replica queries the whole global labelled batch, as one replica does. For each position k of
    s2 in region r: q_l(k) = softmax_c(cos(f(k), G_lrc) / t_p) over the classes present in (l, r);
    P_cr = mean_l q_l, uncertainty U = sum_c Var_l q_l,c (the spread over the labelled batch), and
    L_cross = Dice(P_cr * w, y_hat2 * w), w = exp(-U) * pooled confidence mask of s2 (y_hat2: s2's mixed
    pseudo labels, pooled): low-certainty positions count less.
 4. L = L_sup + lambda_u L_u + 0.25 L_intra + 0.25 L_cross (semsim.intra_weight, semsim.cross_weight).
Dice everywhere: 1 - 2 sum(P T) / (sum P + sum T) over the global batch (all-reduced sums), foreground
channels (binary: the one sigmoid channel; multi-class: classes 1..C-1).

Deviations from the article (stated in the README too):
 - No Spatial-aware Fusion Module (its transformer over matched multi-scale patches): the features are one
   decoder map of the configured U-Net, so the parameter count is the U-Net's (`describe`).
 - Affinity and prototypes on an S x S pooled map (16 x 16: 256 positions, a 256 x 256 affinity per
   image) instead of full resolution; refined predictions halved (above).
 - Prototypes come from the labelled images' features of the same training forward (stop-gradient), not
   a second no-grad pass; q_l uses a temperature t_p = 0.1 (the article's code takes a plain softmax of
   cosines, which cannot become confident); U is the variance of the per-labelled-image predictions,
   its weight exp(-U).
 - The intra/cross targets are the weak view's (FixMatch's) own pseudo labels and predictions; the
   article's 300 epochs, SGD lr 0.01 are not taken over (train.* applies as for every method).
history.csv adds `loss_intra`, `loss_cross`, `cross_uncertainty` (mean U) to FixMatch's columns.
"""
from __future__ import annotations

import tensorflow as tf

from semiseg.methods.fixmatch.trainer import FixMatch, hard_pseudo_labels
from semiseg.models.outputs import one_hot_masks, probabilities
from semiseg.training.registry import register_method

SECOND_VIEW_OFFSET = 10     # s2's streams: FixMatch's photometric/box/partner streams + 10 (70-72)


def pool_to(x, size: int):
    """Average-pool [B,h,w,C] to [B,size,size,C] (h a multiple of size)."""
    x = tf.cast(x, tf.float32)
    factor = int(x.shape[1]) // size
    if factor * size != int(x.shape[1]):
        raise ValueError(f"semsim.affinity_size={size} must divide the map's side {int(x.shape[1])}")
    return tf.nn.avg_pool2d(x, factor, factor, "VALID") if factor > 1 else x


def l2_normalise(f):
    return tf.math.l2_normalize(tf.cast(f, tf.float32), axis=-1, epsilon=1e-12)


def affinity_refine(probs, features, temperature: float):
    """(P + M P) / 2 with M = softmax_row(f f^T / t), f the normalised features: probs [B,S,S,K],
    features [B,S,S,C] (the same S). Returns [B,S,S,K]."""
    shape = tf.shape(probs)
    p = tf.reshape(probs, [shape[0], -1, probs.shape[-1]])
    f = l2_normalise(tf.reshape(features, [shape[0], -1, features.shape[-1]]))
    m = tf.nn.softmax(tf.matmul(f, f, transpose_b=True) / temperature, axis=-1)
    return tf.reshape((p + tf.matmul(m, p)) / 2.0, tf.shape(probs))


def to_regions(x, grid: int):
    """[B,S,S,C] -> [B, grid*grid, (S/grid)^2, C]: region r = row-major cell of the grid."""
    b, s, c = tf.shape(x)[0], int(x.shape[1]), x.shape[-1]
    cell = s // grid
    x = tf.reshape(x, [b, grid, cell, grid, cell, c])
    return tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [b, grid * grid, cell * cell, c])


def from_regions(x, grid: int, size: int):
    """Inverse of to_regions."""
    b, c, cell = tf.shape(x)[0], x.shape[-1], size // grid
    x = tf.reshape(x, [b, grid, grid, cell, cell, c])
    return tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [b, size, size, c])


def local_prototypes(features, class_fractions, grid: int):
    """Per labelled image, region and class: (normalised prototype [L,R,K,C], present [L,R,K] float).
    features [L,S,S,C] (normalised per position), class_fractions [L,S,S,K]."""
    f, y = to_regions(features, grid), to_regions(class_fractions, grid)
    sums = tf.einsum("lrpk,lrpc->lrkc", y, f)
    counts = tf.reduce_sum(y, axis=2)                                   # [L,R,K]
    present = tf.cast(counts > 1e-6, tf.float32)
    return l2_normalise(sums / tf.maximum(counts, 1e-6)[..., None]), present


def prototype_predictions(features, prototypes, present, grid: int, temperature: float):
    """(P_cr [B,S,S,K], U [B,S,S,1]): per labelled image l, q_l = softmax over the classes present in
    (l, region) of cos / t; P_cr = mean_l q_l, U = sum_c Var_l q_l. features [B,S,S,C] normalised."""
    size = int(features.shape[1])
    f = to_regions(features, grid)                                       # [B,R,P,C]
    cos = tf.einsum("brpc,lrkc->blrpk", f, prototypes)                   # [B,L,R,P,K]
    allowed = present[None, :, :, None, :] > 0
    q = tf.nn.softmax(tf.where(allowed, cos / temperature, -1e9), axis=-1)
    mean = tf.reduce_mean(q, axis=1)                                     # [B,R,P,K]
    var = tf.reduce_sum(tf.reduce_mean(tf.square(q - mean[:, None]), axis=1), axis=-1, keepdims=True)
    return from_regions(mean, grid, size), from_regions(var, grid, size)


@register_method("semsim")
class SemSim(FixMatch):
    """FixMatch + 0.25 affinity-refined intra-image + 0.25 uncertainty-weighted local-prototype cross-image terms."""
    uses_unlabeled = True

    def all_gather(self, value):
        """The global batch's rows of `value` (every replica's, in replica order), static shape kept."""
        ctx = tf.distribute.get_replica_context()
        if ctx is None or self.n_replicas == 1:
            return value
        # all_gather loses the static trailing dimensions, which the region reshapes need.
        return tf.reshape(ctx.all_gather(value, axis=0), [-1, *value.shape[1:]])

    def class_fractions(self, masks, size: int):
        """Labels (binary {0,1} [B,H,W,1] or class indices) -> pooled class fractions [B,S,S,K], K >= 2."""
        onehot = (one_hot_masks(masks, self.n_classes) if self.multiclass
                  else tf.concat([1.0 - tf.cast(masks, tf.float32), tf.cast(masks, tf.float32)], -1))
        return pool_to(onehot, size)

    def foreground(self, two_class):
        """The channels Dice scores: binary: the foreground column of a [.., 2] distribution."""
        return two_class if self.multiclass else two_class[..., 1:]

    def dice(self, p, t, w):
        return (self.multiclass_dice_loss(p * w, t * w) if self.multiclass else self.soft_dice_loss(p * w, t * w))

    def compute_loss(self, labeled, unlabeled, step):
        s = self.section
        images, masks = labeled
        model = self.models["student"]
        n_lab, n_u = tf.shape(images)[0], tf.shape(unlabeled)[0]
        s1, mix1 = self.strong_view(unlabeled, step)
        s2, mix2 = self.strong_view(unlabeled, step, SECOND_VIEW_OFFSET)
        if s.weak_mode == "train":
            logits, feats = self.training_forward(model, tf.concat([images, unlabeled, s1, s2], 0), n_lab)
            logits, feats = tf.cast(logits, tf.float32), tf.cast(feats, tf.float32)
            weak_logits, weak_feats = tf.stop_gradient(logits[n_lab:n_lab + n_u]), tf.stop_gradient(feats[n_lab:n_lab + n_u])
            logits, feats = tf.concat([logits[:n_lab], logits[n_lab + n_u:]], 0), tf.concat([feats[:n_lab], feats[n_lab + n_u:]], 0)
        else:
            weak_logits, weak_feats = (tf.stop_gradient(tf.cast(v, tf.float32)) for v in model(unlabeled, training=False))
            logits, feats = (tf.cast(v, tf.float32)
                             for v in self.training_forward(model, tf.concat([images, s1, s2], 0), n_lab))
        # s2's logits are not used: the cross-image term trains s2 through its features only.
        logits_lab, logits_s1 = logits[:n_lab], logits[n_lab:n_lab + n_u]
        feats_lab, feats_s1, feats_s2 = feats[:n_lab], feats[n_lab:n_lab + n_u], feats[n_lab + n_u:]

        # FixMatch on s1.
        weak_probs = probabilities(weak_logits)
        targets, confident = hard_pseudo_labels(weak_probs, s.threshold)
        targets1, confident1 = mix1([targets, confident])
        sup, dice, ce = self.supervised_loss(logits_lab, masks)
        loss_u, u_ce, u_dice = self.unsupervised_loss(logits_s1, targets1, confident1)

        # S: the configured size, or the feature map's side where that is smaller (tiny test images).
        size = min(s.affinity_size, int(feats.shape[1]))
        # Intra-image: affinity-refined predictions of s1 vs the refined weak view, mixed with s1's boxes.
        refined_s1 = affinity_refine(pool_to(probabilities(logits_s1), size), pool_to(feats_s1, size),
                                     s.affinity_temperature)
        refined_weak = affinity_refine(pool_to(weak_probs, size), pool_to(weak_feats, size), s.affinity_temperature)
        (refined_weak,) = mix1([tf.stop_gradient(refined_weak)])
        loss_intra = self.dice(refined_s1, refined_weak, pool_to(confident1, size))

        # Cross-image: local prototypes of the (global) labelled batch queried by s2's features.
        f_lab = tf.stop_gradient(l2_normalise(pool_to(feats_lab, size)))
        prototypes, present = local_prototypes(f_lab, self.class_fractions(masks, size), s.grid)
        prototypes, present = self.all_gather(prototypes), self.all_gather(present)
        p_cr, uncertainty = prototype_predictions(l2_normalise(pool_to(feats_s2, size)), prototypes, present,
                                                  s.grid, s.prototype_temperature)
        targets2, confident2 = mix2([targets, confident])
        if not self.multiclass:
            targets2 = tf.concat([1.0 - targets2, targets2], -1)
        weight = tf.exp(-tf.stop_gradient(uncertainty)) * pool_to(confident2, size)
        loss_cross = self.dice(self.foreground(p_cr), self.foreground(pool_to(targets2, size)), weight)

        loss = sup + s.lambda_u * loss_u + s.intra_weight * loss_intra + s.cross_weight * loss_cross
        return loss, {"loss": loss, "loss_sup": sup, "loss_dice": dice, self.ce_key: ce, "loss_unsup": loss_u,
                      "loss_unsup_ce": u_ce, "loss_unsup_dice": u_dice, "mask_ratio": self.pixel_mean(confident1),
                      "loss_intra": loss_intra, "loss_cross": loss_cross, "cross_uncertainty": self.pixel_mean(uncertainty)}
