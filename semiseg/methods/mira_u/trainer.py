"""MIRA-U: a MIM-pretrained ViT teacher gives uncertainty-weighted pseudo labels to a hybrid
CNN-Transformer student (two stages; Algorithms 1 and 2 of the MIRA-U README; issue 6).

    python main.py train --method mira_u --preset smoke
    python main.py train --preset isic2016_10 --data data/ISIC2016 --out runs/mira10
    python main.py train --preset isic2016_30 --data data/ISIC2016 \
        --set mira_u.teacher_checkpoint=runs/mira10/teacher_mim.keras     # skips stage 1

Stage 1 (`pretrain` runs it on the shared controller before stage 2, unless `mira_u.teacher_checkpoint` is given):
masked image modelling on the training split's images only (labeled + unlabeled; never val/test),
80% of the 8x8 patches masked, loss = mean L1 over the masked patches; the teacher is saved to
RUN/teacher_mim.keras and per-epoch L_MIM to RUN/mim_history.csv. Stage 1 checkpoints as stage 2
does (every `train.checkpoint_every` steps, every stage-1 epoch, and on SIGTERM/SIGUSR1, then exit
75) into RUN/checkpoints/mim: the teacher, its optimizer (whose step count seeds the patch masks),
its dropout RNG and the epoch's running L_MIM sum; the data stream restarts at the saved step. A
requeued run (`--resume`) continues stage 1 at the chief's newest stage-1 checkpoint (broadcast,
so every worker runs the same collectives), or skips stage 1 if that checkpoint is its last step,
and ends with the teacher an uninterrupted run would have.

Stage 2 (`compute_loss`, run by the base loop), per step:
    L = L_sup + beta(t) * (lambda_U * L_ce + lambda_C * L_cons) + gamma * L_ent  (+ L_head)
  L_sup  = 0.5 Dice + 0.5 BCE of the student on strong-augmented labeled images.
  mu, sigma = mean / std (ddof 0) of M MC-dropout passes of the teacher on the weak view, as one
           batched forward (`mc_dropout_stats`), noise seeded per step and per replica.
  w = exp(-sigma / kappa); pixels with w < tau_u are dropped; y~ = w * mu (the seed's soft label).
  L_ce   = BCE(student(strong), y~), mean over kept pixels (global count, all-reduced).
  mira_u.pseudo_label=weight (not the seed): y~ = mu and L_ce = mean over kept pixels of w * BCE,
           so uncertainty lowers a pixel's weight instead of pulling its label to background.
  L_cons = (p_student(strong) - p_target(weak))^2, mean over kept pixels; p_target is stop-gradient.
  L_ent  = binary entropy of student(strong), mean over all unlabeled pixels.
  beta(t) = exp(-5 (1 - t/80)^2) for t < 80 epochs, then 1, with t the fractional epoch.
The strong unlabeled view is the weak view plus photometric noise (same geometry, so the pixels
of the two views line up for L_cons).

The EMA reading (`mira_u.ema_target`). The seed writes phi* <- alpha phi* + (1 - alpha) theta, the
student's weights into the teacher's, but the ViT teacher and the hybrid student have different
architectures, so that cannot hold literally. We keep what it is for: a slowly moving, stable
network. Both readings freeze the teacher's MIM encoder after stage 1 and train its segmentation
head (`seg_head`) on the labeled batch (L_head = L_sup of the head), since an untrained head gives
no pseudo labels at all:
  student_ema  (default): an EMA copy of the student (alpha = 0.999) is the consistency target
                p_target = EMA(weak) and the network validated first and exported (Mean Teacher's
                reading: theta -> phi with phi shaped like theta). Pseudo labels: the trained head.
                The EMA covers the weights, not BN's moving statistics: the EMA student's forward
                on the weak view runs BN on batch statistics and keeps its own moving statistics
                (Mean Teacher's teacher_bn=batch, for the reason measured there).
  teacher_head : the EMA lands in the teacher, as the seed writes, but from a trained copy of its
                own head ("teacher_head_fast"): the pseudo-labelling head is the EMA of that copy;
                p_target = student(weak) (stop-gradient); the student is exported.
The EMA decay is min(alpha, 1 - 1/(t + 1)), t = updates done (0.5 after the first; Tarvainen &
Valpola's warm-up), so early targets are not stuck at the random initialisation.

Per epoch history.csv (names shared by every method, docs/outputs.md) gets loss_sup, loss_unsup
(= lambda_U L_ce + lambda_C L_cons, before beta), its parts loss_unsup_ce and loss_unsup_cons,
loss_ent, loss_head, rampup and unsup_weight (both beta at the epoch's end), kept_fraction (pixels
with w >= tau_u), mean_confidence (mean w), and pseudo_dice: Dice of the binarised pseudo labels
(y~ >= 0.5, dropped pixels as background) against the hidden truth of up to `mira_u.probe_cases`
unlabeled cases.

Multi-class (data.classes with K >= 2 names; every head and the student end in C softmax logits):
mu, sigma are per class; the pseudo label is argmax_c mu; the pixel's uncertainty is the std of the
predicted class's probability; w = exp(-sigma/kappa) weighs the pixel's CE to its pseudo label
(dropped where w < tau_u); L_cons is the squared error mean over the C class probabilities; L_ent
the entropy over classes; L_sup and L_head multi-class Dice + CE; pseudo_dice the mean per-class
Dice of the kept pseudo labels (dropped pixels as background) plus `pseudo_dice_<class>`.
"""
from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import tensorflow as tf
import keras

from semiseg.runs import atomic_write
from semiseg.data import augment
from semiseg.runs import run_dir as rundir
from semiseg.training import probe
from semiseg.models.networks import model_variables
from semiseg.models.outputs import probabilities
from semiseg.models.transformer import mc_dropout_stats, mim_l1_loss, patchify, random_patch_mask
from semiseg.training.ema import ema_update, ema_weights
from semiseg.training.ramps import sigmoid_rampup
from semiseg.training.registry import register_method
from semiseg.training.controller import EpochLogSums, Stage
from semiseg.training.fused_optimizers import optimizer_classes
from semiseg.training.trainer import Trainer, augment_fn, save_model_atomic

TEACHER_FILE = "teacher_mim.keras"
# The teacher as it stood at the best epoch (MIM encoder + trained head): `predict --uncertainty`
# reads its MC-dropout standard deviation from here (a run-folder file: named in runs/run_dir.py).
TEACHER_BEST_FILE = rundir.TEACHER_BEST_FILE
MIM_HISTORY = "mim_history.csv"
MIM_CHECKPOINTS = "mim"         # RUN/checkpoints/mim: stage 1's own checkpoints
# replica_seed streams (distinct purposes draw independent noise)
_STREAM_STRONG, _STREAM_MC, _STREAM_MIM_MASK = 11, 12, 21


# ----------------------------------------------------------------------------- pure pieces
def confidence_targets(mu, sigma, kappa, tau_u, rule="shrink"):
    """(w, keep, y~): w = exp(-sigma/kappa), keep = 1 where w >= tau_u (Alg. 2, l. 19-28), and the
    target: y~ = w * mu (rule "shrink", the seed's soft label) or y~ = mu (rule "weight": the loss
    weighs each pixel's BCE by w instead, as the multi-class rule does).

    Why "weight" exists: w <= 1 shrinks an uncertain foreground pixel towards background and never an
    uncertain background pixel towards foreground, so with a noisy teacher the seed's labels lean
    to background (measured on the bench preset: pseudo-label Dice 0.00-0.12 at 30% labels while
    the teacher's own Dice was 0.3-0.55). It did not rescue MIRA-U there: its labels stayed ~0.3 Dice,
    worse than the student's own predictions (docs/mira_u.md), so the seed's rule stays the default.

    Note: sigma of a probability is at most 0.5, so with kappa = 0.5 every w >= exp(-1) = 0.37 and
    the seed's tau_u = 0.15 never drops a pixel; the filter acts only for kappa < 0.5/ln(1/tau_u)."""
    w = tf.exp(-sigma / kappa)
    keep = tf.cast(w >= tau_u, tf.float32)
    return w, keep, (w * mu if rule == "shrink" else mu)


def binary_pseudo_label_ce(logits, target, w, rule="shrink"):
    """Per-pixel BCE of the student's logits to the target `confidence_targets` gave: as it is for
    the seed's y~ = w * mu ("shrink"), weighted by w for y~ = mu ("weight")."""
    ce = tf.nn.sigmoid_cross_entropy_with_logits(labels=target, logits=logits)
    return w * ce if rule == "weight" else ce


def multiclass_confidence_targets(mu, sigma, kappa, tau_u):
    """(w, keep, target) for C classes: mu, sigma [B,H,W,C] are the MC mean and std of the softmax.
    The pseudo label is argmax_c mu (target: its one-hot); the pixel's uncertainty is the std of the
    *predicted class's* probability (the sigma the binary rule reads, for the class it labels: a
    pixel is uncertain when the passes disagree about the label given, not about unlikely classes);
    w = exp(-sigma/kappa) [B,H,W,1], keep = w >= tau_u. The CE to the label is weighted by w (the
    binary rule's soft label w*mu weighs its foreground the same way)."""
    label = tf.argmax(mu, axis=-1)
    target = tf.one_hot(label, tf.shape(mu)[-1], dtype=tf.float32)
    sigma_label = tf.reduce_sum(sigma * target, axis=-1, keepdims=True)
    w = tf.exp(-sigma_label / kappa)
    return w, tf.cast(w >= tau_u, tf.float32), target


def entropy_from_logits(logits):
    """Per-pixel entropy [B,H,W,1]: binary entropy for one channel, -sum_c p_c log p_c over C."""
    if int(logits.shape[-1]) == 1:
        return binary_entropy_from_logits(logits)
    log_p = tf.nn.log_softmax(logits, axis=-1)
    return -tf.reduce_sum(tf.exp(log_p) * log_p, axis=-1, keepdims=True)


def binary_entropy_from_logits(logits):
    """-p log p - (1-p) log(1-p) with p = sigmoid(z), from logits without log(0):
    log p = -softplus(-z), log(1-p) = -softplus(z)."""
    p = tf.sigmoid(logits)
    return p * tf.nn.softplus(-logits) + (1.0 - p) * tf.nn.softplus(logits)


def mim_batch_loss(teacher, images, mask_ratio, seed, training=True):
    """(L_MIM, mask): 80%-masked reconstruction, L1 over masked patches only (Algorithm 1).
    Exactly round(ratio * N) patches per image, so a per-replica mean is unbiased (see
    models_transformer.random_patch_mask; its ratio and visible-patch tests live in
    tests/test_models_transformer.py)."""
    mask = random_patch_mask(tf.shape(images)[0], teacher.num_patches, mask_ratio, seed)
    recon = teacher.reconstruct(images, mask, training=training)
    return mim_l1_loss(recon, patchify(tf.cast(images, tf.float32), teacher.patch_size), mask), mask


def float_weights(model):
    """Floating-point variables (weights and BN statistics), not integer RNG seed states."""
    return [v for v in model.weights if tf.as_dtype(v.dtype).is_floating]


def load_teacher_into(teacher, path):
    """Copy a saved stage-1 teacher's weights into `teacher` (built in the strategy scope)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"mira_u.teacher_checkpoint: {path} does not exist")
    loaded = keras.saving.load_model(path, compile=False)
    want, got = teacher.config_values, getattr(loaded, "config_values", None)
    if got is None:
        raise ValueError(f"mira_u.teacher_checkpoint: {path} is not a MIM teacher")
    def saved(key):     # a teacher saved before heads had out_channels had one channel (binary)
        return got.get(key, 1 if key == "out_channels" else None)
    diff = {k: (saved(k), v) for k, v in want.items() if saved(k) != v}
    if diff:
        raise ValueError(f"mira_u.teacher_checkpoint: {path} was built with other settings "
                         f"(saved, wanted): {diff}")
    for dst, src in zip(teacher.weights, loaded.weights):
        dst.assign(src)


# ----------------------------------------------------------------------------- the method
@register_method("mira_u")
class MiraU(Trainer):
    uses_unlabeled = True
    labeled_augment = "strong"
    unlabeled_augment = "weak"

    def trained_head(self):
        """The head L_head trains: the teacher's own (student_ema) or its fast copy (teacher_head)."""
        return self.models.get("teacher_head_fast", self.models["teacher"].seg_head)

    def trainable_variables(self):
        # The teacher's encoder and MIM decoder are frozen in stage 2: not in this list.
        return self.models["student"].trainable_variables + self.trained_head().trainable_variables

    # ------------------------------------------------------------------ stage 2
    def compute_loss(self, labeled, unlabeled, step):
        m, teacher, student = self.cfg.mira_u, self.models["teacher"], self.models["student"]
        images, masks = labeled
        weak = unlabeled
        strong = augment.batch_photometric(weak, self.replica_seed(step, _STREAM_STRONG))
        # The student's forward over [labeled; strong (; weak)]: the labelled images in a pass of their
        # own (train.labeled_forward=separate, the default), the unlabelled views together.
        own_weak = "student_ema" not in self.models
        parts = [images, strong] + ([weak] if own_weak else [])
        all_logits = tf.split(tf.cast(self.training_forward(student, tf.concat(parts, 0), tf.shape(images)[0]),
                                      tf.float32),
                              [tf.shape(p)[0] for p in parts], axis=0)
        loss_sup, dice, bce = self.supervised_loss(all_logits[0], masks)
        # Teacher head on labeled data, frozen encoder (no gradient, deterministic tokens).
        tokens = tf.stop_gradient(teacher.encode(images, training=False))
        grid = tf.reshape(tokens, [-1, teacher.grid, teacher.grid, teacher.embed_dim])
        loss_head, _, _ = self.supervised_loss(self.trained_head()(grid, training=True), masks)

        mu, sigma = mc_dropout_stats(teacher, weak, m.mc_samples, m.mc_chunk or None,
                                     seed=self.replica_seed(step, _STREAM_MC))
        mu, sigma = tf.stop_gradient(mu), tf.stop_gradient(sigma)
        if self.multiclass:
            w, keep, target = multiclass_confidence_targets(mu, sigma, m.kappa, m.tau_u)
        else:
            w, keep, target = confidence_targets(mu, sigma, m.kappa, m.tau_u, m.pseudo_label)

        logits = all_logits[1]
        prob = probabilities(logits)
        if own_weak:            # the seed's Student(x^_j), as trained (batch BN), stop-gradient
            weak_logits = all_logits[2]
        else:                   # the EMA student; BN on this batch's statistics, updating its own
            # moving statistics (as Mean Teacher's teacher_bn=batch: EMA'd statistics do not fit EMA'd weights)
            weak_logits = self.models["student_ema"](weak, training=True)
        p_weak = tf.stop_gradient(probabilities(weak_logits))

        n_pixels = tf.cast(tf.size(keep), tf.float32) * self.n_replicas
        if self.multiclass:     # CE to the argmax label, weighted by its confidence; L2 mean over classes
            ce = w * tf.nn.softmax_cross_entropy_with_logits(labels=target, logits=logits)[..., None]
            squared = tf.reduce_mean(tf.square(prob - p_weak), axis=-1, keepdims=True)
        else:
            ce = binary_pseudo_label_ce(logits, target, w, m.pseudo_label)
            squared = tf.square(prob - p_weak)
        # Means over the kept pixels of the whole global batch (the base's masked_mean: the kept
        # count all-reduced, so summing replica shares gives the global-batch mean). The count is a
        # whole number, so its floor (1e-8 there, 1 here before) changes nothing: 0/0 is 0 either way.
        loss_ce = self.masked_mean(ce, keep)
        loss_cons = self.masked_mean(squared, keep)
        loss_ent = tf.reduce_sum(entropy_from_logits(logits)) / n_pixels
        loss_unsup = m.lambda_u * loss_ce + m.lambda_c * loss_cons
        beta = sigmoid_rampup(self.epoch_float(step), m.rampup_epochs)
        loss = loss_sup + beta * loss_unsup + m.gamma * loss_ent + loss_head
        return loss, {"loss": loss, "loss_sup": loss_sup, "loss_dice": dice, self.ce_key: bce,
                      "loss_unsup": loss_unsup, "loss_unsup_ce": loss_ce, "loss_unsup_cons": loss_cons,
                      "loss_ent": loss_ent, "loss_head": loss_head,
                      "kept_fraction": tf.reduce_sum(keep) / n_pixels,
                      "mean_confidence": tf.reduce_sum(w) / n_pixels}

    def schedule_logs(self, epoch_float: float) -> dict:
        # beta weighs loss_unsup (the lambdas are inside it): rampup and unsup_weight coincide.
        beta = sigmoid_rampup(epoch_float, self.cfg.mira_u.rampup_epochs)
        return {"rampup": beta, "unsup_weight": beta}

    def ema_decay(self, step):
        # on_step_end gets the steps taken including this one: t.
        return tf.minimum(self.cfg.mira_u.ema_decay, 1.0 - 1.0 / (tf.cast(step, tf.float32) + 1.0))

    def on_step_end(self, step):
        decay = self.ema_decay(step)
        if "student_ema" in self.models:
            ema_update(ema_weights(self.models["student_ema"], "batch"), ema_weights(self.models["student"], "batch"),
                       decay)
        else:
            ema_update(float_weights(self.models["teacher"].seg_head),
                       float_weights(self.models["teacher_head_fast"]), decay)

    def save_best(self, run: Path) -> None:
        super().save_best(run)
        save_model_atomic(self.models["teacher"], Path(run) / TEACHER_BEST_FILE)

    def eval_models(self) -> dict:
        first = {"student_ema": self.models["student_ema"]} if "student_ema" in self.models else {}
        return {**first, "student": self.models["student"], "teacher": self.models["teacher"]}

    def probe_pseudo_label(self, images):
        """The pseudo label stage 2 trains on, as the probe scores it (dropped pixels as background;
        a multi-class all-zero row's argmax is 0): the teacher's MC passes with a fixed seed, so the
        probe changes only because the teacher's head changed. bench/mira_u_teacher.py scores it too."""
        m = self.cfg.mira_u
        mu, sigma = mc_dropout_stats(self.models["teacher"], images, m.mc_samples, m.mc_chunk or None,
                                     seed=[self.cfg.seed, 7])
        if self.multiclass:
            _, keep, target = multiclass_confidence_targets(mu, sigma, m.kappa, m.tau_u)
        else:
            _, keep, target = confidence_targets(mu, sigma, m.kappa, m.tau_u, m.pseudo_label)
        return target * keep

    def epoch_diagnostics(self, epoch: int) -> dict:
        # The same hidden-label gate as every method: synthetic data, or data.hide_labels=true.
        cases = probe.probe_case_ids(self.cfg, self.data, self.cfg.mira_u.probe_cases)
        if not cases:
            return {}
        if getattr(self, "_pseudo_label_fn", None) is None:
            self._pseudo_label_fn = tf.function(self.probe_pseudo_label, reduce_retracing=True)
        return probe.pseudo_dice_logs(self._pseudo_label_fn, self.cfg, self.data, cases,
                                      self.cfg.train.eval_batch_size)

    # ------------------------------------------------------------------ stage 1, then stage 2
    def pretrain(self, controller) -> str | None:
        """Stage 1 on the shared controller (MimStage), unless mira_u.teacher_checkpoint gives the
        teacher; then the controller runs stage 2, the shared training stage."""
        m, teacher, run = self.cfg.mira_u, self.models["teacher"], controller.run
        saved = run / TEACHER_FILE
        if m.teacher_checkpoint:
            load_teacher_into(teacher, m.teacher_checkpoint)
            self.log(f"stage 1 skipped: teacher loaded from {m.teacher_checkpoint}")
            return None
        # A resumed run whose stage 1 is done restores its last checkpoint and runs no step.
        if controller.run_stage(MimStage(self, controller)) == "preempted":
            return "preempted"
        if controller.is_chief and not saved.exists():
            save_model_atomic(teacher, saved)
            self.log(f"stage 1 done: teacher saved to {saved}")
        return None

    def mim_dataset_bundle(self):
        """The bundle with one more split, 'mim_train' = labeled + unlabeled training cases (never
        val or test: the seed's own code pretrains on them, issue 6 forbids it)."""
        splits = {**self.data.splits, "mim_train": sorted(self.data.splits["labeled"] + self.data.splits["unlabeled"])}
        return dataclasses.replace(self.data, splits=splits)

    def mim_variables(self) -> list:
        """What stage 1 trains: the teacher's encoder and MIM decoder (not its segmentation head)."""
        parts = self.models["teacher"].part_weights()
        return [v for v in parts["encoder"] + parts["mim_decoder"] if v.trainable]

    def mim_optimizer(self):
        m = self.cfg.mira_u
        with self.strategy.scope():
            opt = optimizer_classes(self.cfg.train.fused_update)["adam"](m.mim_lr)
            if self.cfg.train.precision == "mixed_float16":
                opt = keras.optimizers.LossScaleOptimizer(opt)
            opt.build(self.mim_variables())
        return opt

    def make_mim_loop(self, start_step: int = 0, opt=None):
        """(loop(n) -> mean L_MIM over n steps, steps per MIM epoch, optimizer); the data stream
        starts at stage-1 step `start_step` (a resumed stage 1 passes its restored optimizer)."""
        m, teacher, strategy = self.cfg.mira_u, self.models["teacher"], self.strategy
        if m.mim_batch_size % self.n_replicas:
            raise ValueError(f"mira_u.mim_batch_size={m.mim_batch_size} must be divisible by the "
                             f"{self.n_replicas} replicas")
        bundle, per_replica = self.mim_dataset_bundle(), m.mim_batch_size // self.n_replicas
        weak = augment_fn("weak")
        it = iter(strategy.distribute_datasets_from_function(
            lambda ctx: bundle.train_dataset("mim_train", per_replica, ctx, start_step, weak, stream_id=3,
                                             with_mask=False, log=self.log)))
        variables = self.mim_variables()
        opt = self.mim_optimizer() if opt is None else opt

        def replica_step(images):
            with tf.GradientTape() as tape:
                loss, _ = mim_batch_loss(teacher, images, m.mask_ratio,
                                         self.replica_seed(opt.iterations, _STREAM_MIM_MASK))
                share = loss / self.n_replicas      # equal masked counts per replica: unbiased
                scaled = opt.scale_loss(share) if hasattr(opt, "scale_loss") else share
            opt.apply_gradients(zip(tape.gradient(scaled, variables), variables))
            return share

        @tf.function
        def loop(n):
            total = tf.constant(0.0)
            for _ in tf.range(n):
                total += strategy.reduce(tf.distribute.ReduceOp.SUM,
                                         strategy.run(replica_step, args=(next(it),)), axis=None)
            return total / tf.cast(n, tf.float32)

        return loop, self.mim_steps_per_epoch(), opt

    def mim_steps_per_epoch(self) -> int:
        """Stage-1 steps per epoch: one pass over the training split's slices."""
        return max(1, -(-self.mim_dataset_bundle().n_slices("mim_train") // self.cfg.mira_u.mim_batch_size))



class MimStage(Stage):
    """Stage 1 (Algorithm 1) as a stage of the shared controller: `mim_epochs` epochs of masked
    image modelling, checkpointed as stage 2 is (same cadence, same preemption) into
    CKPT_DIR/mim (CKPT_DIR: RUN/checkpoints on the chief), per-epoch L_MIM in RUN/mim_history.csv.
    The checkpoint holds the teacher, its stage-1 optimizer, whose step count is the stage-1 step
    (it seeds the patch masks and says where the data stream resumes), the teacher's variables
    (its dropout RNG states) and the epoch's running L_MIM sum."""
    folder = MIM_CHECKPOINTS
    where = " in stage 1"
    loss_key = "loss_mim"
    # Rows of epochs not in the checkpoint (written before a kill) are dropped on resume and redone.
    row_before_checkpoint = True

    def __init__(self, trainer: MiraU, controller):
        self.trainer, self.controller = trainer, controller
        self.epochs = trainer.cfg.mira_u.mim_epochs
        self.opt, self.sums = trainer.mim_optimizer(), EpochLogSums()
        self.steps_per_epoch = trainer.mim_steps_per_epoch()
        self.history = controller.run / MIM_HISTORY

    def checkpoint(self):
        teacher = self.trainer.models["teacher"]
        return tf.train.Checkpoint(teacher=teacher, optimizer=self.opt,
                                   model_variables=model_variables({"teacher": teacher}),
                                   epoch_log_sums=self.sums.variable)

    def resume(self, restored: int) -> int:
        # Where stage 1 stands is the chief's newest checkpoint, broadcast (the controller restores
        # it): a worker that judged by its own view of the file system could run stage 1's
        # collectives while the others run stage 2's, and all would hang.
        return restored

    def make_loop(self, step: int):
        loop, _, _ = self.trainer.make_mim_loop(step, self.opt)
        return lambda n: {"loss_mim": loop(n)}

    def start(self, step: int) -> str | None:
        folder = self.controller.run / "checkpoints" / MIM_CHECKPOINTS
        if step:
            self.sums.load()
        epoch = self.current_epoch(step)
        if epoch is None:
            self.trainer.log(f"stage 1 skipped: done in {folder / f'ckpt-{step}'} (resumed run)")
            return "completed"
        if step:
            self.trainer.log(f"stage 1 resumed from {folder / f'ckpt-{step}'} (step {step})")
        if self.controller.is_chief:
            _keep_csv_rows(self.history, epoch)
        return None

    def current_epoch(self, step: int) -> int | None:
        # The epoch began `sums.steps` steps ago (they are reset once its row is written). Not
        # step // steps_per_epoch: a preemption at an epoch's last step saves that step before the
        # epoch's row, and the resumed stage must still write it (the epoch in progress, not the next).
        epoch = (step - self.sums.steps) // self.steps_per_epoch
        return epoch if epoch < self.epochs else None

    def nan_message(self, value: float, step: int, epoch: int) -> str:
        return f"stage 1: L_MIM became {value} in epoch {epoch + 1}; lower mira_u.mim_lr"

    def end_epoch(self, epoch: int, step: int, t0: float, first_step: int) -> dict:
        return {"epoch": epoch + 1, "step": step, "loss_mim": self.sums.means()["loss_mim"],
                "time_s": round(time.time() - t0, 2)}

    def write_row(self, row: dict) -> None:
        _append_csv(self.history, row)

    def report(self, row: dict, epoch: int, t0: float) -> str | None:
        self.trainer.log(f"stage 1 epoch {epoch + 1}/{self.epochs} L_MIM={row['loss_mim']:.4f} "
                         f"({time.time() - t0:.1f}s)")
        return None


def _keep_csv_rows(path: Path, epochs: int) -> None:
    """Drop the rows of epochs after `epochs` from a per-epoch CSV (atomic rewrite)."""
    if not path.exists():
        return
    lines = path.read_text().splitlines(keepends=True)
    kept = lines[:1] + [line for line in lines[1:] if int(line.split(",", 1)[0]) <= epochs]
    if len(kept) < len(lines):
        rundir.atomic_write_text(path, "".join(kept))


def _append_csv(path: Path, row: dict) -> None:
    atomic_write.append_csv_row(path, {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
