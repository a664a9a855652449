"""Faults on the real trainer of every method: `--resume` must end exactly where an uninterrupted
run ends (every variable of the final checkpoint, every history row but its time).

    python -m pytest tests/test_crash_resume.py -q              # supervised, mean_teacher, mixmatch
    python -m pytest tests/test_crash_resume.py -q -m slow      # MIRA-U (its hybrid student traces slowly)

kill -9 lands at a random step after a periodic checkpoint (train.checkpoint_every), mid-epoch:
SIGKILL cannot be caught, so the run loses the steps since that checkpoint and redoes them; the
resumed epoch's history row must still average the whole epoch (its running sums live in the
checkpoint). For MIRA-U, SIGUSR1 (preemption) during stage 1 and during stage 2 must save, exit 75
(the sbatch scripts requeue on it) and resume inside the stage it interrupted.
"""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from semiseg.runs import run_dir

REPO = Path(__file__).resolve().parents[1]
TIMEOUT_S = 600
EPOCHS, STEPS, CKPT_EVERY = 2, 8, 2
# Kill after one of these periodic checkpoints: none is an epoch's last, so a kill that lands a
# checkpoint later than aimed (the run keeps going while we react) still resumes mid-epoch.
KILL_AFTER = (2, 4, 10, 12)
SETTINGS = ["--preset", "smoke", "--no-progress", "--set", f"train.epochs={EPOCHS}",
            f"train.steps_per_epoch={STEPS}", "train.steps_per_loop=1", f"train.checkpoint_every={CKPT_EVERY}",
            "mira_u.mim_epochs=2", "mira_u.probe_cases=4"]
METHODS = ["supervised", "mean_teacher", "mixmatch", pytest.param("mira_u", marks=pytest.mark.slow)]


def env():
    # TF_CPP_MIN_LOG_LEVEL unset, as in a user's shell: main.py keeps TF's C++ log out by itself.
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("SLURM_") and k not in ("TF_CONFIG", "TF_CPP_MIN_LOG_LEVEL")}
    e.update(CUDA_VISIBLE_DEVICES="")
    return e


class Training:
    """`main.py train` in a subprocess, its output in a log file (a pipe could fill up and block it)."""

    def __init__(self, out: Path, *args):
        self.out, self.log = out, out.with_name(f"{out.name}-{time.monotonic_ns()}.log")
        with open(self.log, "w") as fh:
            self.proc = subprocess.Popen([sys.executable, str(REPO / "main.py"), "train", "--out", str(out), *args],
                                         env=env(), cwd=out.parent, stdout=fh, stderr=subprocess.STDOUT)

    def output(self) -> str:
        return self.log.read_text()

    def wait_until(self, condition, what: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while not condition():
            assert self.proc.poll() is None, f"exited {self.proc.returncode} before {what}:\n{self.output()[-3000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def finish(self, signum=None) -> int:
        try:
            if signum is not None:
                self.proc.send_signal(signum)
            return self.proc.wait(timeout=TIMEOUT_S)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


def latest_step(folder: Path) -> int:
    """Number of the newest checkpoint the `checkpoint` index names (what a resume reads), 0 if none."""
    index = folder / "checkpoint"
    text = index.read_text() if index.exists() else ""
    for line in text.splitlines():
        if line.startswith("model_checkpoint_path:"):
            return int(line.split('"')[1].rsplit("-", 1)[1])
    return 0


def final_variables(folder: Path) -> dict:
    """Every variable of the newest checkpoint in `folder`, except the count of saves (a
    preempted run saves once more than an uninterrupted one)."""
    import tensorflow as tf
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(str(folder)))
    return {name: reader.get_tensor(name) for name in reader.get_variable_to_shape_map()
            if not name.startswith(("save_counter", "_CHECKPOINTABLE_OBJECT_GRAPH"))}


def assert_same_variables(folder: Path, reference: Path) -> None:
    got, want = final_variables(folder), final_variables(reference)
    assert sorted(got) == sorted(want)
    assert len(want) > 20
    differing = [name for name in want if not np.array_equal(got[name], want[name])]
    # Every differing variable is named: which ones differ (weights, or BN statistics only) says where
    # a resume went wrong.
    assert not differing, f"{len(differing)} of {len(want)} variables differ: {differing[:40]}"


def rows(path: Path) -> list[dict]:
    """CSV rows without their wall-clock column."""
    import csv
    with open(path, newline="") as fh:
        return [{k: v for k, v in row.items() if k not in run_dir.TIMING_COLUMNS} for row in csv.DictReader(fh)]


def assert_same_run(out: Path, reference: Path) -> None:
    assert_same_variables(out / "checkpoints", reference / "checkpoints")
    assert rows(out / "history.csv") == rows(reference / "history.csv")
    assert len(run_dir.read_history(out)) == EPOCHS


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run of each method, trained once per module when first asked for."""
    runs = {}

    def get(method: str) -> Path:
        if method not in runs:
            out = tmp_path_factory.mktemp("reference") / method
            run = Training(out, "--method", method, *SETTINGS)
            assert run.finish() == 0, run.output()[-3000:]
            runs[method] = out
        return runs[method]
    return get


@pytest.mark.parametrize("method", METHODS)
def test_sigkill_at_a_random_step_then_resume_equals_uninterrupted(method, reference, tmp_path):
    expected = reference(method)
    rng = random.Random()
    target, delay = rng.choice(KILL_AFTER), rng.uniform(0.0, 0.05)
    out = tmp_path / "run"
    run = Training(out, "--method", method, *SETTINGS)
    run.wait_until(lambda: latest_step(out / "checkpoints") >= target, f"checkpoint {target}")
    time.sleep(delay)
    assert run.finish(signal.SIGKILL) == -signal.SIGKILL
    # Quiet start-up: the first line is semiseg's, no TensorFlow C++ INFO/WARNING line anywhere.
    assert run.output().splitlines()[0].startswith(f"semiseg: method={method} "), run.output()[:500]
    assert "oneDNN custom operations" not in run.output() and "absl::InitializeLog" not in run.output()
    saved = latest_step(out / "checkpoints")
    note = f"aimed after checkpoint {target} (+{delay:.3f} s), latest is {saved}"
    assert CKPT_EVERY <= saved < EPOCHS * STEPS and saved % STEPS, note    # killed mid-epoch

    resumed = Training(out, "--resume")
    assert resumed.finish() == 0, resumed.output()[-3000:]
    log = resumed.output()
    assert f"resumed from {out / 'checkpoints' / f'ckpt-{saved}'} (epoch {saved // STEPS}, step {saved})" in log, note
    if method == "mira_u":
        assert "stage 1 skipped" in log and "stage 1 epoch" not in log
    assert_same_run(out, expected)


@pytest.mark.slow   # MIRA-U: about 4 minutes on 2 cores, most of it tracing the hybrid student
def test_mira_u_killed_and_preempted_in_both_stages_equals_uninterrupted(reference, tmp_path):
    expected = reference("mira_u")
    out = tmp_path / "run"
    mim = out / "checkpoints" / "mim"
    mim_steps = int(rows(expected / "mim_history.csv")[0]["step"])

    # 1. kill -9 inside stage 1, after its first periodic checkpoint
    run = Training(out, "--method", "mira_u", *SETTINGS)
    run.wait_until(lambda: latest_step(mim) >= CKPT_EVERY, "a stage-1 checkpoint")
    assert run.finish(signal.SIGKILL) == -signal.SIGKILL
    killed_at = latest_step(mim)
    assert 0 < killed_at < 2 * mim_steps and not (out / "teacher_mim.keras").exists()

    # 2. SIGUSR1 in stage 1 of the resumed run: it saves and exits 75, still in stage 1
    run = Training(out, "--resume")
    run.wait_until(lambda: latest_step(mim) > killed_at, "a newer stage-1 checkpoint")
    assert run.finish(signal.SIGUSR1) == 75, run.output()[-3000:]
    preempted_at = latest_step(mim)
    assert f"stage 1 resumed from {mim / f'ckpt-{killed_at}'} (step {killed_at})" in run.output()
    assert killed_at < preempted_at < 2 * mim_steps and not (out / "teacher_mim.keras").exists()

    # 3. it finishes stage 1 (the same teacher as uninterrupted), then SIGUSR1 in stage 2
    run = Training(out, "--resume")
    run.wait_until(lambda: latest_step(out / "checkpoints") > 0, "a stage-2 checkpoint")
    assert run.finish(signal.SIGUSR1) == 75, run.output()[-3000:]
    assert f"stage 1 resumed from {mim / f'ckpt-{preempted_at}'} (step {preempted_at})" in run.output()
    assert_same_variables(mim, expected / "checkpoints" / "mim")
    assert rows(out / "mim_history.csv") == rows(expected / "mim_history.csv")
    stage2_at = latest_step(out / "checkpoints")
    assert 0 < stage2_at < EPOCHS * STEPS

    # 4. stage 1 is not rerun; stage 2 resumes at its saved step and ends as uninterrupted
    run = Training(out, "--resume")
    assert run.finish() == 0, run.output()[-3000:]
    assert "stage 1 skipped" in run.output() and "stage 1 epoch" not in run.output()
    # A preemption save happens inside an epoch's steps, before that epoch's validation bumps the
    # epoch counter: a stop at an epoch's last step (8 of 8) is still epoch 0.
    assert f"(epoch {(stage2_at - 1) // STEPS}, step {stage2_at})" in run.output()
    assert_same_run(out, expected)
    assert rows(out / "mim_history.csv") == rows(expected / "mim_history.csv")
