"""kill -9 in the middle of training, then `--resume`: the run continues from its last checkpoint.

    python -m pytest tests/test_crash_resume.py -q

SIGKILL cannot be caught, so nothing is saved at the kill: the run must lose only the steps since
its last periodic checkpoint (train.checkpoint_every), and that checkpoint must be readable
(TF writes the data files first and then swaps the `checkpoint` index atomically).
"""
import os
import re
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TIMEOUT_S = 300
STEPS, CKPT_EVERY = 40, 4      # ~0.1 s a step here: the kill lands well before the end


def train_command(out, *extra):
    return [sys.executable, os.path.join(REPO, "main.py"), "train", "--out", str(out), "--no-progress", *extra]


def env():
    e = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TF_CONFIG"}
    e.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    return e


def test_sigkill_then_resume_continues_from_last_checkpoint(tmp_path):
    import tensorflow as tf
    out = tmp_path / "run"
    proc = subprocess.Popen(
        train_command(out, "--method", "supervised", "--preset", "smoke", "--set", "train.epochs=1",
                      f"train.steps_per_epoch={STEPS}", "train.steps_per_loop=1",
                      f"train.checkpoint_every={CKPT_EVERY}"),
        env=env(), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while tf.train.latest_checkpoint(str(out / "checkpoints")) is None:
            assert proc.poll() is None, proc.communicate()[0][-3000:]
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.1)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    latest = tf.train.latest_checkpoint(str(out / "checkpoints"))
    saved = int(latest.rsplit("-", 1)[1])
    assert 0 < saved < STEPS and saved % CKPT_EVERY == 0       # killed mid-epoch
    # Readable: every variable of the index loads.
    reader = tf.train.load_checkpoint(latest)
    names = reader.get_variable_to_shape_map()
    assert len(names) > 10 and all(reader.get_tensor(n) is not None for n in names)
    assert not (out / "history.csv").exists()

    resumed = subprocess.run(train_command(out, "--resume"), env=env(), cwd=tmp_path,
                             capture_output=True, text=True, timeout=TIMEOUT_S)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    match = re.search(r"resumed from (\S+) \(epoch 0, step (\d+)\)", resumed.stdout)
    assert match and match.group(1) == latest and int(match.group(2)) == saved, resumed.stdout[-3000:]
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 2 and history[1].split(",")[:2] == ["1", str(STEPS)]
    assert (out / "metrics.json").exists() and (out / "best_model.keras").exists()
