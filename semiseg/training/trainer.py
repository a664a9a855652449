"""Training: the `Trainer` base (one distributed loop for every method) and the method registry.

    python main.py train --method supervised --preset cpu

The Trainer owns the strategy scope, the networks, optimizer and LR schedule, the distributed step
(`strategy.run` inside a `tf.function` that runs `steps_per_loop` steps per call, as in Orbit) and
the method hooks. The cadence around the step (epochs, checkpoints, resume, preemption, the NaN
guard, validation, early stopping, export, history.csv, TensorBoard) is semiseg.training.controller's,
as Orbit's Controller: `fit` hands the run to it. A method is a registered subclass in
semiseg/methods/<name>/trainer.py that overrides `compute_loss` (and maybe `build_models`,
`build_state`, `on_step_end`, `pseudo_targets`, `eval_models`, `schedule_logs`, `save_best`,
`pretrain` for stages before training); the base never asks
which method it is running. What every method needs is public here or beside it: losses whose
normalisation is all-reduced (`global_mean`, `masked_mean`, `pixel_mean`, the supervised loss),
ramps (semiseg.training.ramps), EMA with warm-up (semiseg.training.ema), the pseudo-target probe
(`pseudo_targets`, scored once per epoch by semiseg.training.probe) and checkpointed scalars
(`self.state`, from `build_state`).

Loss scaling under tf.distribute: every loss a method returns is this replica's share of the
global-batch mean, so the all-reduced (summed) gradient equals one replica's gradient on the whole
global batch. Per-example terms use `global_mean`; batch-level Dice all-reduces its sums first.
"""
from __future__ import annotations

from pathlib import Path

import tensorflow as tf
import keras

from semiseg.runs import atomic_write
from semiseg.training import distribute, fused_optimizers
from semiseg.training.checkpoints import restore_latest, save_checkpoint  # noqa: F401  (save_checkpoint: re-exported)
from semiseg.training.controller import Controller, EpochLogSums  # noqa: F401  (EpochLogSums: re-exported)
from semiseg.training.preemption import Preemption  # noqa: F401  (re-exported)
from semiseg.data.loader import steps_per_epoch
from semiseg.config import is_multiclass, num_classes
from semiseg.models.networks import method_networks, model_variables  # noqa: F401  (model_variables: the trainer's API)
from semiseg.models.outputs import main_output, one_hot_masks, probabilities
from semiseg.training import probe

from semiseg.training.registry import METHODS, register_method  # noqa: F401  (re-exported; a leaf)

EXIT_PREEMPTED = distribute.PREEMPTED_EXIT_CODE   # 75, EX_TEMPFAIL: the sbatch scripts requeue on it


class Trainer:
    """Base trainer: supervised loss on labelled batches. Subclasses add unlabelled terms."""
    method_name = "base"
    uses_unlabeled = False
    labeled_augment = "weak"        # weak | strong | none, applied in tf.data per element (the paper's;
                                    # train.labeled_augment overrides it: labeled_augmentation())
    unlabeled_augment = "weak"

    def __init__(self, cfg, data, strategy, strategy_info: dict | None = None, log=print):
        self.cfg, self.data, self.strategy, self.log = cfg, data, strategy, log
        self.strategy_info = strategy_info or {}
        self.n_replicas = strategy.num_replicas_in_sync
        t = cfg.train
        if t.batch_size % self.n_replicas:
            raise ValueError(f"train.batch_size={t.batch_size} (global) must be divisible by the "
                             f"{self.n_replicas} replicas")
        self.global_batch = t.batch_size
        self.per_replica_batch = t.batch_size // self.n_replicas
        self.global_unlabeled_batch = t.batch_size * t.unlabeled_ratio
        self.steps_per_epoch = steps_per_epoch(cfg, data)
        # C classes with background; binary (C = 2) keeps one sigmoid channel and its loss names.
        self.n_classes, self.multiclass = num_classes(cfg.data), is_multiclass(cfg.data)
        # history.csv: the cross-entropy term is `loss_bce` for binary (as before) and `loss_sup_ce`
        # for multi-class (categorical; not `loss_ce`, which older MIRA-U histories used for their
        # unlabelled CE and analysis/ renames to loss_unsup_ce), so a column never changes its meaning.
        self.ce_key = "loss_sup_ce" if self.multiclass else "loss_bce"
        self.total_steps = self.steps_per_epoch * t.epochs
        with strategy.scope():
            self.models = self.build_models()
            # Learned or running scalars a method keeps besides its networks (e.g. a threshold's
            # posterior): checkpointed with the networks, so a resumed run continues them.
            self.state = dict(self.build_state())
            # Steps taken, in the checkpoint: the stream position, resume point, epoch and LR schedule
            # derive from it. Not optimizer.iterations: a float16 loss-scale step skipped for
            # overflowing gradients does not advance that, and the stream would repeat batches.
            self.steps_taken = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
            self.optimizer = self._build_optimizer()
            # Built explicitly: a lazily built Adam fails in a custom loop (keras-team/keras#23085).
            self.optimizer.build(self.trainable_variables())
            self.epoch = tf.Variable(0, dtype=tf.int64, trainable=False, name="epoch")
            self.best_score = tf.Variable(-1.0, dtype=tf.float64, trainable=False, name="best_score")
            self.bad_epochs = tf.Variable(0, dtype=tf.int64, trainable=False, name="bad_epochs")
        self.epoch_log_sums = EpochLogSums()
        self._loop_fn = None
        self._preemption = None

    # ------------------------------------------------------------------ hooks for methods
    @classmethod
    def build_networks(cls, cfg, image_size: int, channels: int) -> dict:
        """Networks by role; 'student' is the one the optimizer trains. A classmethod so that
        `describe` can count parameters without data. The builder is the method spec's
        (semiseg/methods/NAME/__init__.py), which loading a finished run uses too."""
        return method_networks(cls.method_name, cfg, image_size, channels)

    def build_models(self) -> dict:
        return self.build_networks(self.cfg, self.data.image_size, self.data.channels)

    def trainable_variables(self):
        return self.models["student"].trainable_variables

    def build_state(self) -> dict:
        """{name: tf.Variable} of the method's own state (called in the strategy scope); checkpointed."""
        return {}

    @property
    def section(self):
        """The method's own config section (cfg.<method name>), or None where it has none."""
        return getattr(self.cfg, self.method_name, None)

    def compute_loss(self, labeled, unlabeled, step):
        """(loss, logs): loss is this replica's share; each log value sums over replicas to its global value."""
        images, masks = labeled
        logits = self.models["student"](images, training=True)
        loss, dice, bce = self.supervised_loss(logits, masks)
        return loss, {"loss": loss, "loss_sup": loss, "loss_dice": dice, self.ce_key: bce}

    def on_step_end(self, step):
        """Called in the replica context after the optimizer update (EMA teachers go here)."""
        return None

    def eval_models(self) -> dict:
        """Networks scored on validation each epoch; the first one drives model selection."""
        return {"student": self.inference_network("student")}

    def inference_network(self, role: str):
        """The network of `role` as validation, export and prediction see it: its main (first) output
        only, where its training view returns several (deep supervision, features)."""
        return main_output(self.models[role])

    def export_model(self):
        choice = self.cfg.train.export
        if choice == "auto":
            return next(iter(self.eval_models().items()))
        return choice, self.inference_network(choice)

    def export_record(self) -> dict:
        """What RUN/export.json records: the network `export_model` picks, the checkpoint attribute
        it is restored from, and why; built from the same calls training uses, so they agree."""
        name, model = self.export_model()
        key = next((k for k, m in self.models.items() if m is model or main_output(m) is model), name)
        validated = list(self.eval_models())
        choice = self.cfg.train.export
        reason = (f"train.export=auto: the first network {self.method_name} validates ({', '.join(validated)}), "
                  f"which also selects the best epoch" if choice == "auto"
                  else f"train.export={choice}; the best epoch is selected by {validated[0]}")
        return {"network": name, "checkpoint_key": key, "method": self.method_name, "validated": validated,
                "selected_by": validated[0], "reason": reason}

    def save_best(self, run: Path) -> None:
        """RUN/best_model.keras = the exported network; a method may write companions beside it."""
        save_model_atomic(self.export_model()[1], run / "best_model.keras")

    def pseudo_targets(self, images):
        """What the method trains its unlabelled images towards, as its loss sees them: probabilities
        [B,H,W,1] (binary) or class scores [B,H,W,C]. A method that defines it gets `pseudo_dice`
        (and per class) in history.csv, scored against hidden truth by one traced probe."""
        raise NotImplementedError

    def epoch_diagnostics(self, epoch: int) -> dict:
        """Extra history.csv columns per epoch: by default the probe of `pseudo_targets` on the
        section's `probe_cases` hidden-truth cases (where the method defines both)."""
        cases = getattr(self.section, "probe_cases", 0)
        if type(self).pseudo_targets is Trainer.pseudo_targets or not cases:
            return {}
        return probe.epoch_pseudo_dice(self, cases)

    def schedule_logs(self, epoch_float: float) -> dict:
        """Replica-independent values to log (ramp weights), computed in Python per epoch."""
        return {}

    # ------------------------------------------------------------------ loss helpers
    def global_mean(self, per_example):
        """Mean over the global batch of per-example values (this replica's share)."""
        return tf.nn.compute_average_loss(per_example, global_batch_size=tf.shape(per_example)[0] * self.n_replicas)

    def masked_mean(self, values, mask):
        """sum(values * mask) / sum(mask) over the whole global batch (the mask's sum all-reduced),
        this replica's share: the mean over the pixels a mask keeps (e.g. confident pseudo labels).
        Broadcasts mask against values; 0 where the mask keeps nothing anywhere."""
        values, mask = tf.cast(values, tf.float32), tf.cast(mask, tf.float32)
        weighted = values * mask
        count = self.all_reduce_sum(tf.reduce_sum(mask * tf.ones_like(values)))
        return tf.reduce_sum(weighted) / tf.maximum(count, 1e-8)

    def pixel_mean(self, values):
        """The mean over every pixel (and channel) of the global batch, this replica's share."""
        values = tf.cast(values, tf.float32)
        return self.global_mean(tf.reduce_mean(values, axis=list(range(1, len(values.shape)))))

    def all_reduce_sum(self, value):
        ctx = tf.distribute.get_replica_context()
        return ctx.all_reduce(tf.distribute.ReduceOp.SUM, value) if ctx is not None else value

    def soft_dice_loss(self, probs, targets, eps=1e-5):
        """1 - 2|P.T| / (|P| + |T|) over the whole global batch (sums all-reduced), divided by the
        replica count so the summed gradients equal the single-replica gradient."""
        sums = tf.stack([tf.reduce_sum(probs * targets), tf.reduce_sum(probs), tf.reduce_sum(targets)])
        inter, p, t = tf.unstack(self.all_reduce_sum(sums))
        return (1.0 - (2.0 * inter + eps) / (p + t + eps)) / self.n_replicas

    def multiclass_dice_loss(self, probs, targets, eps=1e-5):
        """Mean over the foreground classes 1..C-1 of 1 - 2|P_c.T_c| / (|P_c| + |T_c|), each class's
        sums over the whole global batch (all-reduced), divided by the replica count (as above).
        Background is left out: it covers most pixels and would flatter the loss (nnU-Net and the
        ACDC literature score foreground structures only)."""
        sums = tf.stack([tf.reduce_sum(probs * targets, [0, 1, 2]), tf.reduce_sum(probs, [0, 1, 2]),
                         tf.reduce_sum(targets, [0, 1, 2])])                    # [3, C]
        inter, p, t = tf.unstack(self.all_reduce_sum(sums)[:, 1:])
        return tf.reduce_mean(1.0 - (2.0 * inter + eps) / (p + t + eps)) / self.n_replicas

    def targets(self, masks):
        """Masks as per-channel targets: binary masks as they are; class-index masks [B,H,W,1] ->
        one-hot [B,H,W,C] for multi-class (soft targets, e.g. MixMatch's mixed ones, pass through)."""
        if not self.multiclass or masks.shape[-1] == self.n_classes:
            return masks
        return one_hot_masks(masks, self.n_classes)

    def supervised_loss(self, logits, masks):
        """L_sup = lambda_dice * Dice + lambda_bce * BCE on float32 logits (the seed's 0.5 / 0.5).
        Multi-class (C logit channels): Dice mean over the foreground classes of the softmax
        probabilities vs one-hot targets + categorical cross-entropy, the same two weights; `masks`
        may be class indices [B,H,W,1] or (soft) targets [B,H,W,C]."""
        logits = tf.cast(logits, tf.float32)
        if self.multiclass:
            targets = self.targets(masks)
            ce_map = tf.nn.softmax_cross_entropy_with_logits(labels=targets, logits=logits)     # [B,H,W]
            ce = self.global_mean(tf.reduce_mean(ce_map, axis=[1, 2]))
            dice = self.multiclass_dice_loss(probabilities(logits), targets)
            t = self.cfg.train
            return t.lambda_dice * dice + t.lambda_bce * ce, dice, ce
        bce_map = tf.nn.sigmoid_cross_entropy_with_logits(labels=masks, logits=logits)
        bce = self.global_mean(tf.reduce_mean(bce_map, axis=[1, 2, 3]))
        dice = self.soft_dice_loss(tf.sigmoid(logits), masks)
        t = self.cfg.train
        return t.lambda_dice * dice + t.lambda_bce * bce, dice, bce

    def training_forward(self, model, images, n_labeled):
        """`model`'s training-mode outputs (a tensor, or a structure of them) on `images`, whose first
        `n_labeled` are labelled. train.labeled_forward=joint: one forward, BN normalises every image
        with the statistics of the whole batch (the papers' code); separate: the labelled images get
        a forward of their own, the rest another, so the supervised loss never sees statistics of
        unlabelled (or strongly augmented) images; BN's moving statistics are updated by both."""
        if self.cfg.train.labeled_forward == "joint":
            return model(images, training=True)
        return tf.nest.map_structure(lambda a, b: tf.concat([a, b], axis=0),
                                     model(images[:n_labeled], training=True),
                                     model(images[n_labeled:], training=True))

    def replica_seed(self, step, stream: int):
        """A stateless seed that differs per step, per replica and per purpose (`stream`)."""
        ctx = tf.distribute.get_replica_context()
        replica = ctx.replica_id_in_sync_group if ctx is not None else 0
        return tf.stack([tf.cast(self.cfg.seed * 1000 + stream, tf.int64),
                         tf.cast(step, tf.int64) * 1024 + tf.cast(replica, tf.int64)])

    def epoch_float(self, step):
        return tf.cast(step, tf.float32) / float(self.steps_per_epoch)

    # ------------------------------------------------------------------ optimizer
    def _lr_schedule(self):
        t = self.cfg.train
        lr = effective_lr(t)
        warmup = int(t.warmup_epochs * self.steps_per_epoch)
        decay_steps = max(1, self.total_steps - warmup)
        if t.schedule == "cosine":
            return keras.optimizers.schedules.CosineDecay(
                lr if not warmup else 0.0, decay_steps, alpha=0.01,
                warmup_target=lr if warmup else None, warmup_steps=warmup)
        if t.schedule == "poly":
            return keras.optimizers.schedules.PolynomialDecay(lr, self.total_steps, lr * 0.01, power=0.9)
        return lr

    def _build_optimizer(self):
        t = self.cfg.train
        schedule = self._lr_schedule()
        # A schedule reads the steps taken, not optimizer.iterations (which skipped steps leave behind).
        kwargs = {"learning_rate": (lambda: schedule(self.steps_taken)) if callable(schedule) else schedule}
        # With float16 loss scaling the gradients must be unscaled before clipping, which only the
        # LossScaleOptimizer does: there Keras clips (each replica's share, at clip_norm / R).
        self._keras_clips = t.precision == "mixed_float16"
        if t.clip_norm > 0 and self._keras_clips:
            kwargs["global_clipnorm"] = t.clip_norm / self.n_replicas
        classes = fused_optimizers.optimizer_classes(t.fused_update)
        if t.optimizer == "sgd":
            opt = classes["sgd"](momentum=t.momentum, weight_decay=t.weight_decay or None, **kwargs)
        elif t.weight_decay > 0:
            opt = classes["adamw"](weight_decay=t.weight_decay, **kwargs)
        else:
            opt = classes["adam"](**kwargs)
        if t.precision == "mixed_float16":
            # float16 gradients underflow without loss scaling; bfloat16 has float32's range.
            opt = keras.optimizers.LossScaleOptimizer(opt)
        elif t.clip_norm > 0:
            _apply_gradients_as_given(opt)
        return opt

    def current_lr(self) -> float:
        opt = getattr(self.optimizer, "inner_optimizer", self.optimizer)
        # The rate at the current step (the optimizer evaluates its schedule callable). Under a
        # tf.distribute strategy a constant rate is a MirroredVariable, which float() rejects;
        # convert_to_numpy reads its value.
        return float(keras.ops.convert_to_numpy(opt.learning_rate))

    # ------------------------------------------------------------------ the distributed step
    def _replica_step(self, labeled, unlabeled):
        step = tf.identity(self.steps_taken)     # 0-based index of this step (one_step increments it after)
        with tf.GradientTape() as tape:
            loss, logs = self.compute_loss(labeled, unlabeled, step)
            scaled = self.optimizer.scale_loss(loss) if hasattr(self.optimizer, "scale_loss") else loss
        variables = self.trainable_variables()
        # Gathered tables (e.g. Swin relative-position biases) give IndexedSlices: densify them so
        # the all-reduce and clipping below treat every gradient alike.
        grads = [tf.convert_to_tensor(g) if isinstance(g, tf.IndexedSlices) else g
                 for g in tape.gradient(scaled, variables)]
        clip = self.cfg.train.clip_norm
        if clip > 0 and not self._keras_clips:
            # Keras clips each replica's share before its all-reduce; clipping must see the global
            # gradient. So: all-reduce here, clip, and apply the result as it is (the optimizer was
            # told not to all-reduce again: one all-reduce of the gradient per step, not two).
            grads = self.all_reduce_sum(grads)
            grads, _ = tf.clip_by_global_norm(grads, clip)
        if self._keras_clips:       # mixed_float16: a LossScaleOptimizer, which may skip the step
            grads = self._skip_together(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        self.on_step_end(step + 1)      # the steps taken once this one is applied
        return logs

    def _skip_together(self, grads):
        """Make every replica's gradients non-finite when any replica's are.

        The LossScaleOptimizer skips a step whose gradients overflow, but it checks this replica's
        un-reduced share (on one replica for merge-call strategies, on each for collective ones):
        replicas could then disagree, one applying NaN-summed gradients, or some entering the
        gradient all-reduce while others skip it (a hang). One all-reduced count decides for all."""
        bad = tf.add_n([tf.reduce_sum(tf.cast(~tf.math.is_finite(g), tf.float32)) for g in grads if g is not None])
        any_bad = self.all_reduce_sum(tf.minimum(bad, 1.0)) > 0
        first = next(i for i, g in enumerate(grads) if g is not None)
        poison = tf.where(any_bad, tf.constant(float("nan"), grads[first].dtype), tf.zeros([], grads[first].dtype))
        return grads[:first] + [grads[first] + poison] + grads[first + 1:]

    def _make_loop(self, labeled_it, unlabeled_it):
        strategy = self.strategy
        # XLA compiles the replica step only: the iterator's next() and strategy.run's dispatch are
        # not XLA ops, so a compiled loop around them could not be built.
        replica_step = (tf.function(self._replica_step, jit_compile=True) if self.cfg.train.jit_compile
                        else self._replica_step)

        # A tf.function of its own, called twice below but traced once: inlined as two calls of
        # one graph, the step (the costly part of tracing a hybrid student) is not traced twice.
        @tf.function
        def one_step():
            unlabeled = next(unlabeled_it) if unlabeled_it is not None else None
            per_replica = strategy.run(replica_step, args=(next(labeled_it), unlabeled))
            self.steps_taken.assign_add(1)      # taken even when a loss-scale overflow skipped the update
            return {k: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None) for k, v in per_replica.items()}

        def loop(n_steps):
            # Orbit-style: n optimizer steps per call cut Python overhead per step. The first
            # step sits outside tf.range so `totals` has the logs' structure to carry.
            totals = one_step()
            for _ in tf.range(n_steps - 1):
                logs = one_step()
                totals = {k: totals[k] + logs[k] for k in totals}
            return {k: v / tf.cast(n_steps, v.dtype) for k, v in totals.items()}

        return tf.function(loop)

    def labeled_augmentation(self) -> str:
        """What the labelled stream applies: train.labeled_augment, or the method's own choice."""
        kind = self.cfg.train.labeled_augment
        return self.labeled_augment if kind == "method" else kind

    def _iterators(self, start_step: int):
        augment = augment_fn(self.labeled_augmentation())
        b, ub = self.per_replica_batch, self.per_replica_batch * self.cfg.train.unlabeled_ratio
        lab = self.strategy.distribute_datasets_from_function(
            lambda ctx: self.data.train_dataset("labeled", b, ctx, start_step, augment, stream_id=1, log=self.log))
        unl = None
        if self.uses_unlabeled:
            uaug = augment_fn(self.unlabeled_augment)
            unl = iter(self.strategy.distribute_datasets_from_function(
                lambda ctx: self.data.train_dataset("unlabeled", ub, ctx, start_step, uaug, stream_id=2,
                                                    with_mask=False, log=self.log)))
        return iter(lab), unl

    # ------------------------------------------------------------------ checkpoints
    def checkpoint(self) -> tf.train.Checkpoint:
        self._check_state_is_checkpointed()
        return tf.train.Checkpoint(optimizer=self.optimizer, step=self.steps_taken, epoch=self.epoch,
                                   best_score=self.best_score,
                                   bad_epochs=self.bad_epochs, model_variables=model_variables(self.models),
                                   epoch_log_sums=self.epoch_log_sums.variable, state=dict(self.state), **self.models)

    def _check_state_is_checkpointed(self) -> None:
        """A tf.Variable a method keeps as an attribute would silently restart from its initial
        value on resume: such state belongs in `build_state`."""
        known = {id(v) for v in (self.steps_taken, self.epoch, self.best_score, self.bad_epochs,
                                 self.epoch_log_sums.variable, *self.state.values())}
        stray = [name for name, value in vars(self).items() if isinstance(value, tf.Variable) and id(value) not in known]
        if stray:
            raise TypeError(f"{type(self).__name__} keeps tf.Variable attribute(s) {', '.join(sorted(stray))} outside "
                            f"the checkpoint: return them from build_state() (self.state[...]) instead")

    def restore_latest(self, ckpt: tf.train.Checkpoint, folder: Path) -> int:
        """Restore the chief's newest checkpoint in `folder` on every worker (checkpoints.restore_latest)."""
        return restore_latest(self.strategy, ckpt, folder)

    def images_per_step(self) -> int:
        """Input images of one optimizer step, all replicas: labelled plus unlabelled."""
        return self.global_batch + (self.global_unlabeled_batch if self.uses_unlabeled else 0)

    # ------------------------------------------------------------------ the outer loop
    def train_loop(self, start_step: int):
        """loop(n) -> {log: mean over n steps}: the traced multi-step loop, its data streams starting
        at `start_step` (what the Controller calls per chunk of train.steps_per_loop steps)."""
        return self._make_loop(*self._iterators(start_step))

    def pretrain(self, controller) -> str | None:
        """Stages a method runs before training, on the same controller (`controller.run_stage`);
        "preempted" stops the run there. MIRA-U's masked-image-modelling stage 1 is one."""
        return None

    def fit(self, run: Path, is_chief: bool = True, ckpt_dir: Path | None = None, progress: bool = True) -> str:
        """Train until epochs are done, early stopping, or preemption. Returns the stop reason.
        The cadence (checkpoints, resume, preemption, validation, early stopping, export, logs) is
        semiseg.training.controller's; the signal handlers it installs are removed however it ends."""
        return Controller(self, run, is_chief, ckpt_dir, progress).fit()


def _apply_gradients_as_given(optimizer) -> None:
    """Make `optimizer` apply gradients that are already all-reduced, without summing them again.

    Keras 3 (3.15) always all-reduces in `apply_gradients` under tf.distribute
    (`_backend_update_step` -> `_all_reduce_sum_gradients`) and has no public switch such as
    TF 2's `experimental_aggregate_gradients=False`; a second all-reduce of every gradient would
    double the step's communication. Replacing that one method on this instance keeps the rest
    (the update under `merge_call`, weight decay, the iteration count) as Keras does it."""
    if not callable(getattr(optimizer, "_all_reduce_sum_gradients", None)):
        raise RuntimeError(f"{type(optimizer).__name__} has no _all_reduce_sum_gradients: this Keras "
                           f"version aggregates gradients differently; check Trainer._replica_step")
    optimizer._all_reduce_sum_gradients = lambda grads_and_vars: list(grads_and_vars)


def effective_lr(train_cfg) -> float:
    """train.lr, or with lr_scaling=linear lr * batch_size / lr_reference_batch (Goyal et al.'s
    rule). batch_size is global, so the replica count does not enter: the same global batch on 1 or
    16 GPUs is the same optimisation problem and keeps its learning rate."""
    t = train_cfg
    return t.lr * (t.batch_size / t.lr_reference_batch if t.lr_scaling == "linear" else 1.0)


def augment_fn(kind: str):
    from semiseg.data import augment
    return {"weak": augment.weak_augment, "strong": augment.strong_augment, "none": None}[kind]


def save_model_atomic(model, path: Path) -> None:
    atomic_write.write_with(path, model.save)      # the temporary name keeps `.keras` for Keras
