"""Training: the `Trainer` base (one distributed loop for every method) and the method registry.

    python main.py train --method supervised --preset cpu

The Trainer owns the strategy scope, the networks, optimizer and LR schedule, the distributed step
(`strategy.run` inside a `tf.function` that runs `steps_per_loop` steps per call, as in Orbit),
checkpoints, early stopping, preemption and logging. A method is a registered subclass in
semiseg/methods/<name>/trainer.py that overrides `compute_loss` (and maybe `build_models`,
`build_state`, `on_step_end`, `pseudo_targets`, `eval_models`, `schedule_logs`); the base never asks
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

import json
import re
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import tensorflow as tf
import keras

from semiseg.runs import atomic_write
from semiseg.training import distribute
from semiseg.evaluation import evaluate as evaluation
from semiseg.runs import run_dir as rundir
from semiseg.data.loader import steps_per_epoch
from semiseg.config import is_multiclass, num_classes
from semiseg.models.networks import method_networks, model_variables  # noqa: F401  (model_variables: the trainer's API)
from semiseg.models.outputs import main_output, one_hot_masks, probabilities
from semiseg.training import probe

from semiseg.training.registry import METHODS, register_method  # noqa: F401  (re-exported; a leaf)

EXIT_PREEMPTED = distribute.PREEMPTED_EXIT_CODE   # 75, EX_TEMPFAIL: the sbatch scripts requeue on it


class Preemption:
    """SIGTERM / SIGUSR1 set a flag; the loop checkpoints at the next loop boundary and exits 75.
    `restore()` puts back the handlers found at install time: after training, a SIGTERM must end
    the process again (test evaluation, a notebook, a caller's own handler)."""

    def __init__(self):
        self.signal = distribute.early_signal()      # one that arrived during start-up
        self._previous = {}
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            try:
                self._previous[sig] = distribute.handler_to_restore(sig, signal.signal(sig, self._handle))
            except ValueError:          # not the main thread (e.g. inside some test runners)
                pass

    def _handle(self, signum, _frame):
        self.signal = signal.Signals(signum).name

    def restore(self):
        for sig, handler in self._previous.items():
            # None: installed from C, not Python; the default action is the closest we can restore.
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)
        self._previous = {}


class EpochLogSums:
    """An epoch's running log sums (per key, weighted by steps) and its step count, mirrored into a
    string variable that checkpoints carry: a run resumed mid-epoch, from a periodic checkpoint
    after kill -9 or from a preemption one, then reports the whole epoch, not only its own steps.

    JSON in one tf.string variable because the keys are whatever a method's `compute_loss` returns,
    known only once its step has run, while a checkpoint's variables must exist before its restore.
    """

    def __init__(self):
        with tf.device("/cpu:0"):       # a string variable cannot live on an accelerator
            self.variable = tf.Variable("", dtype=tf.string, trainable=False, name="epoch_log_sums")
        self.reset()

    def reset(self):
        self.sums, self.steps = {}, 0

    def add(self, logs: dict, n: int):
        """`logs` are means over `n` steps."""
        for k, v in logs.items():
            self.sums[k] = self.sums.get(k, 0.0) + v * n
        self.steps += n

    def means(self) -> dict:
        return {k: v / max(self.steps, 1) for k, v in self.sums.items()}

    def store(self):
        """Before every save. Python floats round-trip exactly through JSON."""
        self.variable.assign(json.dumps({"sums": self.sums, "steps": self.steps}))

    def load(self):
        """After a restore."""
        text = self.variable.numpy().decode()
        saved = json.loads(text) if text else {"sums": {}, "steps": 0}
        self.sums, self.steps = saved["sums"], saved["steps"]


class Trainer:
    """Base trainer: supervised loss on labelled batches. Subclasses add unlabelled terms."""
    method_name = "base"
    uses_unlabeled = False
    labeled_augment = "weak"        # weak | strong | none, applied in tf.data per element
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
        `describe` can count parameters without data. The table of each method's networks is
        semiseg.models.networks.NETWORKS, which loading a finished run uses too."""
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
        if t.optimizer == "sgd":
            opt = keras.optimizers.SGD(momentum=t.momentum, weight_decay=t.weight_decay or None, **kwargs)
        elif t.weight_decay > 0:
            opt = keras.optimizers.AdamW(weight_decay=t.weight_decay, **kwargs)
        else:
            opt = keras.optimizers.Adam(**kwargs)
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

    def _iterators(self, start_step: int):
        augment = augment_fn(self.labeled_augment)
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
        """Restore the chief's newest checkpoint in `folder` on every worker; returns its number (its
        step; 0: none). The chief's choice is broadcast: workers that see the file system
        differently (a lagging network file system) would otherwise resume at different steps and
        run different collectives, a hang."""
        latest = tf.train.latest_checkpoint(str(folder))
        number = distribute.chief_int(self.strategy, int(latest.rsplit("-", 1)[1]) if latest else 0)
        if number:
            ckpt.restore(str(folder / f"ckpt-{number}")).assert_existing_objects_matched()
        return number

    def preemption(self) -> Preemption:
        """One signal watcher per trainer, shared with a method's own stage before the loop (MIRA-U's
        stage 1): a second one would take over the handlers and miss what the first had caught."""
        if self._preemption is None:
            self._preemption = Preemption()
        return self._preemption

    def stop_requested(self) -> bool:
        """Whether to save and exit now. Call it at the same steps on every worker: a signal reaches
        workers at different times, so they agree (all-reduce) and all save the same step together."""
        watcher = self.preemption()
        if watcher.signal is None and near_job_end(self.cfg.train.end_time_margin_s):
            watcher.signal = "SLURM_JOB_END_TIME (within train.end_time_margin_s)"
        caught = watcher.signal is not None
        if self.strategy_info.get("num_workers", 1) > 1:
            return distribute.any_worker_true(self.strategy, caught)
        return caught

    def images_per_step(self) -> int:
        """Input images of one optimizer step, all replicas: labelled plus unlabelled."""
        return self.global_batch + (self.global_unlabeled_batch if self.uses_unlabeled else 0)

    def _throughput(self, steps: int, seconds: float) -> dict:
        """history.csv columns of an epoch's training part (validation excluded; the first epoch
        includes tracing the step). GPU peak memory where TensorFlow reports it (GPUs only)."""
        seconds = max(seconds, 1e-9)
        speed = {"images_per_s": round(steps * self.images_per_step() / seconds, 2),
                 "step_ms": round(1000.0 * seconds / max(steps, 1), 1)}
        peak = _gpu_peak_mb()
        if peak is not None:
            speed["gpu_mem_peak_mb"] = peak
        return speed

    def _summary_writer(self, run: Path):
        if getattr(self, "_writer", None) is None:
            self._writer = tf.summary.create_file_writer(str(run / "tensorboard"))
        return self._writer

    # ------------------------------------------------------------------ the outer loop
    def fit(self, run: Path, is_chief: bool = True, ckpt_dir: Path | None = None, progress: bool = True) -> str:
        """Train until epochs are done, early stopping, or preemption. Returns the stop reason.
        The signal handlers `_fit` installs are removed however it ends (methods override `_fit`)."""
        try:
            return self._fit(run, is_chief, ckpt_dir, progress)
        finally:
            if self._preemption is not None:
                self._preemption.restore()
                self._preemption = None

    def _fit(self, run: Path, is_chief: bool = True, ckpt_dir: Path | None = None, progress: bool = True) -> str:
        from semiseg.progress import progress_bar
        t = self.cfg.train
        ckpt = self.checkpoint()
        # Every worker saves (tf.distribute gathers variables collectively), the chief into the run
        # folder and the others into private folders; all restore from the chief's.
        manager = tf.train.CheckpointManager(ckpt, str(ckpt_dir or run / "checkpoints"), max_to_keep=t.keep_checkpoints)
        sums = self.epoch_log_sums      # of the epoch in progress; every checkpoint carries them

        def save(at_step):
            sums.store()
            save_checkpoint(manager, at_step)

        restored = self.restore_latest(ckpt, run / "checkpoints")
        if restored and int(self.steps_taken.numpy()) == 0:
            # Saved before the step counter existed: a training checkpoint's number is its step. Only
            # here: other checkpoints restored by restore_latest (MIRA-U's stage 1) do not hold this
            # counter, and taking their number for it shifted the stage-2 step, its ramps and stream.
            self.steps_taken.assign(restored)
        if restored:
            sums.load()
            self.log(f"resumed from {run / 'checkpoints' / f'ckpt-{restored}'} (epoch {int(self.epoch.numpy())}, "
                     f"step {int(self.steps_taken.numpy())})")
        step = int(self.steps_taken.numpy())
        labeled_it, unlabeled_it = self._iterators(step)
        loop = self._make_loop(labeled_it, unlabeled_it)
        self.preemption()
        ckpt_every = t.checkpoint_every or self.steps_per_epoch
        last_ckpt_step = step
        validated = dict(self.eval_models())
        select_name = next(iter(validated))
        # history.csv's val_dice is always the exported network's (train.export may name one the
        # method does not validate, or not the one that selects the best epoch).
        export_name, export_net = self.export_model()
        validated.setdefault(export_name, export_net)
        # Validation runs on every replica of every worker, each on its share of the slices.
        validators = {name: evaluation.ShardedCaseDice(self.strategy, m, self.data, "val", t.eval_batch_size)
                      for name, m in validated.items()}
        if t.patience and int(self.bad_epochs.numpy()) >= t.patience:
            return "early_stopped"      # a resumed run that had already stopped early
        while int(self.epoch.numpy()) < t.epochs:
            epoch = int(self.epoch.numpy())
            epoch_end = (epoch + 1) * self.steps_per_epoch
            t0, first_step = time.time(), step
            _reset_gpu_peak()
            bar = progress_bar(total=self.steps_per_epoch, initial=step - epoch * self.steps_per_epoch, unit="step",
                               desc=f"epoch {epoch + 1}/{t.epochs}", enabled=progress and is_chief, leave=False)
            while step < epoch_end:
                n = min(t.steps_per_loop, epoch_end - step)
                logs = {k: float(v) for k, v in loop(tf.constant(n)).items()}
                sums.add(logs, n)
                step += n
                bar.update(n)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
                if not np.isfinite(logs.get("loss", 0.0)):
                    raise FloatingPointError(f"loss became {logs['loss']} at step {step}; lower train.lr "
                                             f"or check the data (run folder kept: {run})")
                if self.stop_requested():
                    bar.close()
                    save(step)
                    self.log(f"{self.preemption().signal or 'a peer worker'} received: checkpoint saved at "
                             f"step {step}; exiting for requeue")
                    return "preempted"
                if step - last_ckpt_step >= ckpt_every and step < epoch_end:
                    save(step)
                    last_ckpt_step = step
            bar.close()
            speed = self._throughput(step - first_step, time.time() - t0)
            scores = {name: validator.score() for name, validator in validators.items()}
            score = scores[select_name]
            if self.strategy_info.get("num_workers", 1) > 1:
                # Every worker must take the same improve/stop decision: one worker stopping while
                # the others enter the next step's all-reduce hangs the job. Sharded validation
                # already gathers its counts, so the scores agree; the chief's value is still what
                # decides, so the decision cannot depend on a worker's own arithmetic (e.g. a
                # validator that scores a worker's networks alone, as before sharding). With
                # unsynchronised BatchNorm each shard is scored by its own replica's statistics.
                score = distribute.chief_float(self.strategy, score)
            row = {"epoch": epoch + 1, "step": step, "lr": self.current_lr(),
                   **sums.means(),
                   **self.schedule_logs((epoch + 1)), **self.epoch_diagnostics(epoch + 1),
                   "val_dice": scores[export_name],
                   **{f"val_dice_{k}": v for k, v in scores.items() if k != export_name},
                   **speed, "time_s": round(time.time() - t0, 2)}
            improved = score > float(self.best_score.numpy()) + t.min_delta
            if improved:
                self.best_score.assign(score)
                self.bad_epochs.assign(0)
                if is_chief:
                    self.save_best(run)
            else:
                self.bad_epochs.assign_add(1)
            self.epoch.assign(epoch + 1)
            sums.reset()
            save(step)
            last_ckpt_step = step
            if is_chief:
                rundir.append_history(run, row)
                with self._summary_writer(run).as_default(step=step):
                    for key, value in row.items():
                        if key not in ("epoch", "step") and isinstance(value, (int, float)) and np.isfinite(value):
                            tf.summary.scalar(key, value)
            terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("loss"))
            memory = f", GPU peak {speed['gpu_mem_peak_mb']:.0f} MB" if "gpu_mem_peak_mb" in speed else ""
            selection = f" (selected by {select_name}: {score:.4f})" if select_name != export_name else ""
            self.log(f"epoch {epoch + 1}/{t.epochs} {terms} val_dice={row['val_dice']:.4f}{selection}"
                     f"{' *' if improved else ''} ({row['time_s']:.1f}s; {speed['images_per_s']:.1f} img/s, "
                     f"{speed['step_ms']:.0f} ms/step{memory})")
            if t.patience and int(self.bad_epochs.numpy()) >= t.patience:
                self.log(f"early stopping: no validation improvement for {t.patience} epochs")
                return "early_stopped"
        return "completed"


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


def job_end_time() -> float | None:
    """SLURM_JOB_END_TIME (unix seconds of the job's wall limit, set by Slurm 21.08+), else None."""
    import os
    value = os.environ.get("SLURM_JOB_END_TIME", "")
    try:
        return float(value) if value else None
    except ValueError:
        return None


def near_job_end(margin_s: float) -> bool:
    """Whether the job's wall limit is less than `margin_s` away: stop and checkpoint now, even if
    no signal comes (a missing --signal, or one sent too late to finish validation and the save)."""
    end = job_end_time()
    return end is not None and margin_s > 0 and time.time() >= end - margin_s


def _local_gpus() -> list:
    return tf.config.list_logical_devices("GPU")


def _reset_gpu_peak() -> None:
    for device in _local_gpus():
        try:
            tf.config.experimental.reset_memory_stats(device.name)
        except (ValueError, tf.errors.OpError):
            pass


def _gpu_peak_mb() -> float | None:
    """Largest peak allocation over this process's GPUs since the last reset, in MB; None on CPU
    or where the allocator does not report it."""
    peaks = []
    for device in _local_gpus():
        try:
            peaks.append(tf.config.experimental.get_memory_info(device.name)["peak"])
        except (ValueError, tf.errors.OpError):
            pass
    return round(max(peaks) / 2 ** 20, 1) if peaks else None


def save_checkpoint(manager: tf.train.CheckpointManager, step: int) -> None:
    """manager.save, its errors named by the checkpoint's path. A failed save leaves the previous
    checkpoint as `latest`: TF writes the shards under a temporary name and updates the
    `checkpoint` index file (atomically) only after they are complete."""
    path = Path(manager.directory) / f"ckpt-{step}"
    try:
        manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as err:
        # The shards' temporary folder: give its space back (a full disk is the likely cause).
        shutil.rmtree(f"{path}_temp", ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) else _op_error_reason(err)
        raise atomic_write.WriteError(path, f"{reason} (the previous checkpoint, "
                                      f"{manager.latest_checkpoint or 'none'}, is kept)",
                                      getattr(err, "errno", None)) from err


def _op_error_reason(err: tf.errors.OpError) -> str:
    """The message of a TF op error without its '{{function_node ...}}' prefix and '[Op:SaveV2]' tail."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", err.message.strip())
    return re.sub(r"\s*\[Op:\w+\]$", "", text).splitlines()[0] if text else type(err).__name__


def augment_fn(kind: str):
    from semiseg.data import augment
    return {"weak": augment.weak_augment, "strong": augment.strong_augment, "none": None}[kind]


def save_model_atomic(model, path: Path) -> None:
    atomic_write.write_with(path, model.save)      # the temporary name keeps `.keras` for Keras
