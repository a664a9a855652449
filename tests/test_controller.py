"""The controller (semiseg/training/controller.py): the cadence of any stage, on a stage whose step
is a counter (checkpoint steps, per-epoch means, resume mid-epoch, the NaN guard, preemption), and
MIRA-U's stage 1 preempted at an epoch's last step, which once lost that epoch's row.

    python -m pytest tests/test_controller.py -q
"""
import os
import signal
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import tensorflow as tf

from semiseg import config
from semiseg.runs import atomic_write
from semiseg.training.controller import Controller, EpochLogSums, Stage


@pytest.fixture(autouse=True)
def signal_handlers_restored():
    """These tests call run_stage directly (Controller.fit restores the handlers it installs; a
    stage alone does not): put SIGTERM/SIGUSR1 back, so later tests see the process as it was."""
    before = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGUSR1)}
    yield
    for sig, handler in before.items():
        signal.signal(sig, handler)


class CountingStage(Stage):
    """Step k (1-based) logs loss = k; rows go to a list. `nan_at`: the step whose loss is NaN;
    `signal_at`: the step after which SIGUSR1 arrives."""
    folder = "count"

    def __init__(self, controller, epochs, steps_per_epoch, nan_at=None, signal_at=None):
        self.controller, self.epochs, self.steps_per_epoch = controller, epochs, steps_per_epoch
        self.sums, self.rows, self.nan_at, self.signal_at = EpochLogSums(), [], nan_at, signal_at
        self.counter = tf.Variable(0, dtype=tf.int64)

    def checkpoint(self):
        return tf.train.Checkpoint(counter=self.counter, epoch_log_sums=self.sums.variable)

    def resume(self, restored):
        if restored:
            self.sums.load()
        return int(self.counter.numpy())

    def make_loop(self, step):
        def loop(n):
            first = int(self.counter.numpy()) + 1
            self.counter.assign_add(int(n))
            last = int(self.counter.numpy())
            if self.signal_at is not None and first <= self.signal_at <= last:
                os.kill(os.getpid(), signal.SIGUSR1)
            loss = float("nan") if self.nan_at is not None and first <= self.nan_at <= last else (first + last) / 2
            return {"loss": tf.constant(loss)}
        return loop

    def current_epoch(self, step):
        epoch = (step - self.sums.steps) // self.steps_per_epoch
        return epoch if epoch < self.epochs else None

    def nan_message(self, value, step, epoch):
        return f"counting stage: loss {value} at step {step}"

    def end_epoch(self, epoch, step, t0, first_step):
        return {"epoch": epoch + 1, "step": step, **self.sums.means()}

    def write_row(self, row):
        self.rows.append(row)


def _controller(tmp_path, **train):
    cfg = config.resolve("smoke", overrides=[f"train.{k}={v}" for k, v in train.items()])
    trainer = SimpleNamespace(cfg=cfg, strategy=tf.distribute.get_strategy(), strategy_info={}, log=lambda m: None)
    return Controller(trainer, tmp_path / "run")


def _saved_steps(folder: Path):
    return sorted(int(p.name.split("-")[1].split(".")[0]) for p in folder.glob("ckpt-*.index"))


def test_checkpoints_at_the_cadence_and_rows_average_each_epoch(tmp_path):
    controller = _controller(tmp_path, steps_per_loop=2, checkpoint_every=3, keep_checkpoints=100)
    stage = CountingStage(controller, epochs=2, steps_per_epoch=5)
    assert controller.run_stage(stage) == "completed"
    # chunks end at steps 2, 4, 5 | 7, 9, 10: periodic saves once 3 steps passed the last save
    # (never an epoch's last step: the epoch's own save follows), plus each epoch's end.
    assert _saved_steps(tmp_path / "run" / "checkpoints" / "count") == [4, 5, 9, 10]
    assert stage.rows == [{"epoch": 1, "step": 5, "loss": 3.0}, {"epoch": 2, "step": 10, "loss": 8.0}]


def test_preempted_mid_epoch_resumes_to_the_same_rows(tmp_path):
    controller = _controller(tmp_path, steps_per_loop=1)
    cut = CountingStage(controller, epochs=2, steps_per_epoch=4, signal_at=6)
    try:
        assert controller.run_stage(cut) == "preempted"
    finally:
        controller._preemption.restore()
    assert _saved_steps(tmp_path / "run" / "checkpoints" / "count")[-1] == 6
    again = _controller(tmp_path, steps_per_loop=1)
    resumed = CountingStage(again, epochs=2, steps_per_epoch=4)
    assert again.run_stage(resumed) == "completed"
    # The resumed epoch averages all its steps (5..8), not only those after the restart.
    assert cut.rows + resumed.rows == [{"epoch": 1, "step": 4, "loss": 2.5}, {"epoch": 2, "step": 8, "loss": 6.5}]


def test_nan_loss_stops_with_the_stages_message_and_keeps_the_last_checkpoint(tmp_path):
    controller = _controller(tmp_path, steps_per_loop=1, checkpoint_every=2)
    stage = CountingStage(controller, epochs=1, steps_per_epoch=6, nan_at=5)
    with pytest.raises(FloatingPointError, match="counting stage: loss nan at step 5"):
        controller.run_stage(stage)
    assert _saved_steps(tmp_path / "run" / "checkpoints" / "count") == [2, 4]


# ----------------------------------------------------------------------------- MIRA-U stage 1
def _mira_stage1(run: Path, signal_after_call=None):
    """A fresh MIRA-U trainer's stage 1 (2 MIM epochs, one step per call) on the controller;
    SIGUSR1 after loop call `signal_after_call`. Returns (reason, steps per MIM epoch)."""
    import keras
    from semiseg.data import loader
    from semiseg.methods import get_method
    from semiseg.methods.mira_u.trainer import MimStage
    cfg = config.resolve("smoke", overrides=["mira_u.student_swin_depth=1", "mira_u.mim_epochs=2",
                                             "train.steps_per_loop=1"], method="mira_u")
    keras.utils.set_random_seed(cfg.seed)
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("mira_u")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    run.mkdir(parents=True, exist_ok=True)
    controller = Controller(trainer, run)
    stage = MimStage(trainer, controller)
    make_loop, calls = stage.make_loop, [0]

    def counting_make_loop(step):
        loop = make_loop(step)

        def wrapped(n):
            out = loop(n)
            calls[0] += 1
            if calls[0] == signal_after_call:
                os.kill(os.getpid(), signal.SIGUSR1)
            return out
        return wrapped
    stage.make_loop = counting_make_loop
    try:
        return controller.run_stage(stage), stage.steps_per_epoch
    finally:
        if controller._preemption is not None:
            controller._preemption.restore()


def test_mira_u_stage1_preempted_at_an_epochs_last_step_keeps_that_epochs_row(tmp_path):
    """The checkpoint of a preemption at an epoch's last step holds the whole epoch's sums, its row
    not yet written: the resumed stage must write that row (it once skipped to the next epoch, lost
    the row and averaged two epochs into the next one)."""
    reason, steps = _mira_stage1(tmp_path / "straight")
    assert reason == "completed"
    assert _mira_stage1(tmp_path / "cut", signal_after_call=steps)[0] == "preempted"
    assert not (tmp_path / "cut" / "mim_history.csv").exists()
    assert _mira_stage1(tmp_path / "cut")[0] == "completed"
    straight = atomic_write.read_csv_rows(tmp_path / "straight" / "mim_history.csv")
    cut = atomic_write.read_csv_rows(tmp_path / "cut" / "mim_history.csv")
    assert [(r["epoch"], r["step"]) for r in cut] == [("1", str(steps)), ("2", str(2 * steps))]
    np.testing.assert_allclose([float(r["loss_mim"]) for r in cut], [float(r["loss_mim"]) for r in straight],
                               rtol=1e-5)
