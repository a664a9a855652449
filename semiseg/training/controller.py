"""The outer loop of training, apart from the step, as in Orbit (tensorflow/models, orbit/): a
`Controller` owns the cadence, a Trainer owns the step and the method's hooks.

    python main.py train --method supervised --preset smoke      # Trainer.fit(run) runs Controller.fit()

The Controller runs *stages*, each an epoch loop with its own step function, checkpoint folder and
history file, and owns what they share:
- the loop over epochs and over chunks of `train.steps_per_loop` steps (one traced call per chunk);
- the checkpoint manager: every `train.checkpoint_every` steps, at every epoch's end, on preemption;
- resume from the chief's newest checkpoint (the chief's choice broadcast to every worker);
- the preemption watcher (SIGTERM/SIGUSR1, SLURM_JOB_END_TIME) and the workers' agreement on it;
- the NaN guard; per-epoch rows (a CSV, TensorBoard), the progress bar and the log line.

`TrainingStage` is a method's training: validation, early stopping, the best network's export,
RUN/history.csv and TensorBoard. A method may run stages of its own before it from
`Trainer.pretrain(controller)` (MIRA-U's masked-image-modelling stage 1, with `controller.run_stage`).

What the controller reads of a Trainer, and nothing else:
  cfg.train, strategy, strategy_info, data, log, steps_per_epoch, images_per_step()
  counters, checkpointed: steps_taken, epoch, best_score, bad_epochs, epoch_log_sums
  checkpoint() -> tf.train.Checkpoint            train_loop(step) -> loop(n) -> {name: mean of n steps}
  eval_models(), export_model(), save_best(run), schedule_logs(epoch), epoch_diagnostics(epoch),
  current_lr(), pretrain(controller) -> "preempted" | None
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import tensorflow as tf

from semiseg.evaluation import evaluate as evaluation
from semiseg.runs import run_dir as rundir
from semiseg.training import distribute
from semiseg.training.checkpoints import restore_latest, save_checkpoint
from semiseg.training.preemption import Preemption, near_job_end
from semiseg.training.throughput import reset_gpu_peak, throughput


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


class Stage:
    """One loop a Controller runs: what differs between stages. The controller calls, in order,
    checkpoint(), resume(restored), make_loop(step), start(step); then per epoch current_epoch(step),
    the loop, end_epoch(...), write_row(row) (chief only; before or after the epoch's checkpoint, as
    `row_before_checkpoint` says), report(...)."""
    folder = ""                     # checkpoints in CKPT_DIR/<folder> (RUN/checkpoints/<folder> on the chief)
    where = ""                      # e.g. " in stage 1": names the stage in the preemption message
    loss_key = "loss"               # the NaN guard watches this log
    shows_progress = False          # a progress bar per epoch (chief, unless --no-progress)
    # Whether the row is written before the epoch's checkpoint: then `resume` must drop rows after
    # the restored epoch (a kill between the two redoes the epoch and rewrites its row).
    row_before_checkpoint = False
    steps_per_epoch: int
    sums: EpochLogSums

    def checkpoint(self) -> tf.train.Checkpoint:
        raise NotImplementedError

    def resume(self, restored: int) -> int:
        """After checkpoint `restored` (its number; 0: none) was restored: the step to start at."""
        raise NotImplementedError

    def make_loop(self, step: int):
        """loop(n: int tensor) -> {name: mean over n steps}, its data stream starting at `step`."""
        raise NotImplementedError

    def start(self, step: int) -> str | None:
        """Before the first epoch: a stop reason where nothing is left to run, else None."""
        return None

    def current_epoch(self, step: int) -> int | None:
        """The 0-based epoch in progress at `step`, None when the stage is done."""
        raise NotImplementedError

    def nan_message(self, value: float, step: int, epoch: int) -> str:
        raise NotImplementedError

    def end_epoch(self, epoch: int, step: int, t0: float, first_step: int) -> dict:
        """The epoch's row, once its last step ran (the epoch's sums still hold)."""
        raise NotImplementedError

    def write_row(self, row: dict) -> None:
        raise NotImplementedError

    def report(self, row: dict, epoch: int, t0: float) -> str | None:
        """After the epoch's checkpoint: log it; a stop reason (early stopping), else None."""
        return None


class Controller:
    """Runs a trainer's stages (see the module docstring). One per `Trainer.fit` call."""

    def __init__(self, trainer, run: Path, is_chief: bool = True, ckpt_dir: Path | None = None,
                 progress: bool = True):
        self.trainer, self.run, self.is_chief, self.progress = trainer, Path(run), is_chief, progress
        # Every worker saves (tf.distribute gathers variables collectively), the chief into the run
        # folder and the others into private folders; all restore from the chief's.
        self.ckpt_dir = Path(ckpt_dir or self.run / "checkpoints")
        self.log = trainer.log
        self._preemption = None
        self._writer = None

    def fit(self) -> str:
        """The method's own stages, then training. Returns the stop reason ("completed",
        "early_stopped", "preempted"). The signal handlers it installs are removed however it ends."""
        try:
            if self.trainer.pretrain(self) == "preempted":
                return "preempted"
            return self.run_stage(TrainingStage(self))
        finally:
            if self._preemption is not None:
                self._preemption.restore()
                self._preemption = None

    # ------------------------------------------------------------------ preemption
    def preemption(self) -> Preemption:
        """One signal watcher for every stage: a second one would take over the handlers and miss
        what the first had caught."""
        if self._preemption is None:
            self._preemption = Preemption()
        return self._preemption

    def stop_requested(self) -> bool:
        """Whether to save and exit now. Called at the same steps on every worker: a signal reaches
        workers at different times, so they agree (all-reduce) and all save the same step together."""
        watcher = self.preemption()
        if watcher.signal is None and near_job_end(self.trainer.cfg.train.end_time_margin_s):
            watcher.signal = "SLURM_JOB_END_TIME (within train.end_time_margin_s)"
        caught = watcher.signal is not None
        if self.trainer.strategy_info.get("num_workers", 1) > 1:
            return distribute.any_worker_true(self.trainer.strategy, caught)
        return caught

    def summary_writer(self):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(str(self.run / "tensorboard"))
        return self._writer

    # ------------------------------------------------------------------ the loop
    def run_stage(self, stage: Stage) -> str:
        """Run `stage` to its end, from its newest checkpoint. Returns "completed", "preempted" or
        the stage's own stop reason."""
        from semiseg.progress import progress_bar
        t = self.trainer.cfg.train
        ckpt = stage.checkpoint()
        manager = tf.train.CheckpointManager(ckpt, str(self.ckpt_dir / stage.folder) if stage.folder
                                             else str(self.ckpt_dir), max_to_keep=t.keep_checkpoints)
        sums = stage.sums       # of the epoch in progress; every checkpoint carries them

        def save(at_step):
            sums.store()
            save_checkpoint(manager, at_step)

        restored = restore_latest(self.trainer.strategy, ckpt, self.run / "checkpoints" / stage.folder)
        step = stage.resume(restored)
        loop = stage.make_loop(step)
        self.preemption()
        reason = stage.start(step)
        if reason:
            return reason
        ckpt_every = t.checkpoint_every or stage.steps_per_epoch
        last_ckpt_step = step
        while (epoch := stage.current_epoch(step)) is not None:
            epoch_end = (epoch + 1) * stage.steps_per_epoch
            t0, first_step = time.time(), step
            reset_gpu_peak()
            bar = progress_bar(total=stage.steps_per_epoch, initial=step - epoch * stage.steps_per_epoch,
                               unit="step", desc=f"epoch {epoch + 1}/{t.epochs}",
                               enabled=stage.shows_progress and self.progress and self.is_chief, leave=False)
            while step < epoch_end:
                n = min(t.steps_per_loop, epoch_end - step)
                logs = {k: float(v) for k, v in loop(tf.constant(n)).items()}
                sums.add(logs, n)
                step += n
                bar.update(n)
                bar.set_postfix(loss=f"{logs.get('loss', float('nan')):.4f}")
                if not np.isfinite(logs.get(stage.loss_key, 0.0)):
                    raise FloatingPointError(stage.nan_message(logs[stage.loss_key], step, epoch))
                if self.stop_requested():
                    bar.close()
                    save(step)
                    self.log(f"{self.preemption().signal or 'a peer worker'} received{stage.where}: checkpoint "
                             f"saved at step {step}; exiting for requeue")
                    return "preempted"
                if step - last_ckpt_step >= ckpt_every and step < epoch_end:
                    save(step)
                    last_ckpt_step = step
            bar.close()
            row = stage.end_epoch(epoch, step, t0, first_step)
            if self.is_chief and stage.row_before_checkpoint:
                stage.write_row(row)
            sums.reset()
            save(step)
            last_ckpt_step = step
            if self.is_chief and not stage.row_before_checkpoint:
                stage.write_row(row)
            reason = stage.report(row, epoch, t0)
            if reason:
                return reason
        return "completed"


class TrainingStage(Stage):
    """The method's training: the Trainer's step, validation of `eval_models()` each epoch (the first
    selects the best epoch), early stopping (train.patience), the best network's export
    (`save_best`), RUN/history.csv and TensorBoard."""
    shows_progress = True

    def __init__(self, controller: Controller):
        self.controller, self.trainer = controller, controller.trainer
        self.sums, self.steps_per_epoch = self.trainer.epoch_log_sums, self.trainer.steps_per_epoch
        self.train_cfg = self.trainer.cfg.train

    def checkpoint(self):
        return self.trainer.checkpoint()

    def resume(self, restored: int) -> int:
        tr = self.trainer
        if restored and int(tr.steps_taken.numpy()) == 0:
            # Saved before the step counter existed: a training checkpoint's number is its step. Only
            # here: other checkpoints restored by restore_latest (MIRA-U's stage 1) do not hold this
            # counter, and taking their number for it shifted the stage-2 step, its ramps and stream.
            tr.steps_taken.assign(restored)
        if restored:
            self.sums.load()
            tr.log(f"resumed from {self.controller.run / 'checkpoints' / f'ckpt-{restored}'} "
                   f"(epoch {int(tr.epoch.numpy())}, step {int(tr.steps_taken.numpy())})")
        return int(tr.steps_taken.numpy())

    def make_loop(self, step: int):
        return self.trainer.train_loop(step)

    def start(self, step: int) -> str | None:
        tr, t = self.trainer, self.train_cfg
        validated = dict(tr.eval_models())
        self.select_name = next(iter(validated))
        # history.csv's val_dice is always the exported network's (train.export may name one the
        # method does not validate, or not the one that selects the best epoch).
        self.export_name, export_net = tr.export_model()
        validated.setdefault(self.export_name, export_net)
        # Validation runs on every replica of every worker, each on its share of the slices.
        self.validators = {name: evaluation.ShardedCaseDice(tr.strategy, m, tr.data, "val", t.eval_batch_size)
                           for name, m in validated.items()}
        if t.patience and int(tr.bad_epochs.numpy()) >= t.patience:
            return "early_stopped"      # a resumed run that had already stopped early
        return None

    def current_epoch(self, step: int) -> int | None:
        epoch = int(self.trainer.epoch.numpy())
        return epoch if epoch < self.train_cfg.epochs else None

    def nan_message(self, value: float, step: int, epoch: int) -> str:
        return (f"loss became {value} at step {step}; lower train.lr "
                f"or check the data (run folder kept: {self.controller.run})")

    def end_epoch(self, epoch: int, step: int, t0: float, first_step: int) -> dict:
        tr, t = self.trainer, self.train_cfg
        speed = throughput(step - first_step, time.time() - t0, tr.images_per_step())
        scores = {name: validator.score() for name, validator in self.validators.items()}
        score = scores[self.select_name]
        if tr.strategy_info.get("num_workers", 1) > 1:
            # Every worker must take the same improve/stop decision: one worker stopping while
            # the others enter the next step's all-reduce hangs the job. Sharded validation
            # already gathers its counts, so the scores agree; the chief's value is still what
            # decides, so the decision cannot depend on a worker's own arithmetic (e.g. a
            # validator that scores a worker's networks alone, as before sharding). With
            # unsynchronised BatchNorm each shard is scored by its own replica's statistics.
            score = distribute.chief_float(tr.strategy, score)
        row = {"epoch": epoch + 1, "step": step, "lr": tr.current_lr(),
               **self.sums.means(),
               **tr.schedule_logs((epoch + 1)), **tr.epoch_diagnostics(epoch + 1),
               "val_dice": scores[self.export_name],
               **{f"val_dice_{k}": v for k, v in scores.items() if k != self.export_name},
               **speed, "time_s": round(time.time() - t0, 2)}
        self.improved = score > float(tr.best_score.numpy()) + t.min_delta
        self.score, self.speed = score, speed
        if self.improved:
            tr.best_score.assign(score)
            tr.bad_epochs.assign(0)
            if self.controller.is_chief:
                tr.save_best(self.controller.run)
        else:
            tr.bad_epochs.assign_add(1)
        tr.epoch.assign(epoch + 1)
        return row

    def write_row(self, row: dict) -> None:
        rundir.append_history(self.controller.run, row)
        with self.controller.summary_writer().as_default(step=row["step"]):
            for key, value in row.items():
                if key not in ("epoch", "step") and isinstance(value, (int, float)) and np.isfinite(value):
                    tf.summary.scalar(key, value)

    def report(self, row: dict, epoch: int, t0: float) -> str | None:
        t, speed = self.train_cfg, self.speed
        terms = " ".join(f"{k}={v:.4f}" for k, v in row.items() if k.startswith("loss"))
        memory = f", GPU peak {speed['gpu_mem_peak_mb']:.0f} MB" if "gpu_mem_peak_mb" in speed else ""
        selection = (f" (selected by {self.select_name}: {self.score:.4f})"
                     if self.select_name != self.export_name else "")
        self.trainer.log(f"epoch {epoch + 1}/{t.epochs} {terms} val_dice={row['val_dice']:.4f}{selection}"
                         f"{' *' if self.improved else ''} ({row['time_s']:.1f}s; {speed['images_per_s']:.1f} img/s, "
                         f"{speed['step_ms']:.0f} ms/step{memory})")
        if t.patience and int(self.trainer.bad_epochs.numpy()) >= t.patience:
            self.trainer.log(f"early stopping: no validation improvement for {t.patience} epochs")
            return "early_stopped"
        return None
