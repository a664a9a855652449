"""What a cluster job's log, wall limit and signals need from training (smoke preset, CPU).

    python -m pytest tests/test_cluster_io.py -q

- A batch log is not a terminal: no progress-bar carriage returns in it, even without --no-progress.
- Each epoch logs its throughput (images/s, ms per step) in the log line and history.csv.
- SLURM_JOB_END_TIME closer than train.end_time_margin_s: checkpoint and exit 75 with no signal.
- After training the SIGTERM/SIGUSR1 handlers are the ones found before it (in-process).
"""
import csv
import os
import signal
import subprocess
import sys
import time

from test_equivalence import REPO, SUBPROCESS_TIMEOUT_S, python_env


def _train(out, *extra, env_extra=None):
    cmd = [sys.executable, os.path.join(REPO, "main.py"), "train", "--method", "supervised", "--preset", "smoke",
           "--out", str(out), *extra]
    # Pipes, as in a batch job: neither stdout nor stderr is a terminal. No --no-progress on purpose.
    return subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent, timeout=SUBPROCESS_TIMEOUT_S,
                          env=python_env(SEMISEG_CACHE=os.environ["SEMISEG_CACHE"], **(env_extra or {})))


def test_batch_log_has_no_carriage_returns_and_epochs_log_throughput(tmp_path):
    proc = _train(tmp_path / "run", "--set", "train.epochs=1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "\r" not in proc.stdout and "\r" not in proc.stderr
    epoch_line = [l for l in proc.stdout.splitlines() if l.startswith("epoch 1/1")]
    assert epoch_line and "img/s" in epoch_line[0] and "ms/step" in epoch_line[0], proc.stdout
    with open(tmp_path / "run" / "history.csv") as f:
        row = next(csv.DictReader(f))
    # smoke: 3 steps of 4 labelled images (supervised: no unlabelled ones)
    assert float(row["images_per_s"]) > 0 and float(row["step_ms"]) > 0
    steps_s = 3 * float(row["step_ms"]) / 1000
    assert abs(12 / steps_s - float(row["images_per_s"])) / float(row["images_per_s"]) < 0.02
    assert "gpu_mem_peak_mb" not in row          # CPU: nothing to report, no made-up column


def test_slurm_job_end_time_stops_with_a_checkpoint_and_exit_75(tmp_path):
    # The wall limit is 200 s away, closer than the default 300 s margin: stop at the first loop
    # boundary (step 3 of the smoke preset's 6), no signal needed.
    proc = _train(tmp_path / "run", "--no-progress", "--set", "train.epochs=2",
                  env_extra={"SLURM_JOB_END_TIME": str(int(time.time()) + 200)})
    assert proc.returncode == 75, proc.stdout[-2000:] + proc.stderr[-3000:]
    assert "SLURM_JOB_END_TIME" in proc.stdout
    assert (tmp_path / "run" / "checkpoints" / "ckpt-3.index").exists()
    assert not (tmp_path / "run" / "history.csv").exists()     # stopped inside epoch 1


def test_signal_handlers_are_restored_after_training(one_epoch_run):
    # one_epoch_run trained in this process through main.main (early catch, then the trainer's own).
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL


def test_shuffle_window_is_bounded_in_bytes_and_records():
    import config
    import data_loader_tf2
    cfg = config.resolve("smoke", "", [], "supervised")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    record = bundle.record_bytes()              # 32x32x1 float16 image + uint8 mask + fields
    assert record == 32 * 32 * 3 + 128
    assert bundle.shuffle_window() == 64        # data.shuffle_buffer binds (64 records = 0.2 MB)
    bundle.data_cfg.shuffle_buffer_mb = 0.05
    assert bundle.shuffle_window() == int(0.05 * 2 ** 20 // record) == 16
    bundle.data_cfg.shuffle_buffer_mb = 0.0     # no byte bound: the record count alone
    bundle.data_cfg.shuffle_buffer = 5000
    assert bundle.shuffle_window() == 5000
