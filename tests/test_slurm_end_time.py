"""The sbatch scripts pass the job's wall limit on and requeue a trainer that stopped before it.

    python -m pytest tests/test_slurm_end_time.py -q     # skipped, saying why, where SLURM cannot run

On a real single-node SLURM (tests/slurm_cluster.py; 22.05, which does not set SLURM_JOB_END_TIME
itself) train_1gpu.sbatch runs a stand-in main.py that records SLURM_JOB_END_TIME and, as the
trainer does within train.end_time_margin_s of it, saves a checkpoint and exits 75 with no signal
received. The script must export the end time (from squeue) and requeue the job. That the real
trainer stops at that time with exit 75 and a checkpoint is tests/test_cluster_io.py's.
"""
import os
import sys
import textwrap
import time

import pytest

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from test_slurm import make_workdir

STAND_IN_MAIN = textwrap.dedent('''
    import os, sys
    out = sys.argv[sys.argv.index("--out") + 1]
    os.makedirs(os.path.join(out, "checkpoints"), exist_ok=True)
    print(f"stand-in sees SLURM_JOB_END_TIME={os.environ.get('SLURM_JOB_END_TIME', '')}", flush=True)
    with open(os.path.join(out, "checkpoints", "step"), "w") as f:
        f.write("3")
    print("end time near: checkpoint saved at step 3; exiting for requeue", flush=True)
    sys.exit(75)
''')


@pytest.fixture
def workdir(tmp_path):
    return make_workdir(tmp_path, STAND_IN_MAIN)


def test_end_time_is_exported_and_a_self_stop_requeues(slurm_cluster, workdir):
    submitted = time.time()
    job = slurm_cluster.submit("slurm/train_1gpu.sbatch", "supervised", "smoke", options=("--time=7",),
                               cwd=workdir, env={"PYTHON": sys.executable})
    try:
        deadline = time.monotonic() + 120
        while slurm_cluster.job(job).get("Restarts") != "1" and time.monotonic() < deadline:
            time.sleep(0.5)
        log_path = workdir / "logs" / f"semiseg-1gpu-{job}.out"
        log = log_path.read_text() if log_path.exists() else ""
        assert slurm_cluster.job(job).get("Restarts") == "1", log[-3000:]
    finally:
        slurm_cluster.run("scancel", job, check=False)      # do not wait for the requeued start
    seen = int(log.split("stand-in sees SLURM_JOB_END_TIME=")[1].split()[0])
    assert abs(seen - (submitted + 7 * 60)) < 90, (seen, submitted)      # the 7-minute wall limit
    assert "command exited with code 75" in log and f"requeueing job {job}" in log
