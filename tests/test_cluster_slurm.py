"""Cluster-grade behaviour of the sbatch scripts on the real single-node SLURM of tests/slurm_cluster.py.

    python -m pytest tests/test_cluster_slurm.py -q

PYTHON as a command (a container's `apptainer exec ... python`), the slice cache copied to
node-local scratch, GPU pinning of tasks that share a node's GPUs (the node's `gpu` GRES are
stand-in device files: SLURM sets CUDA_VISIBLE_DEVICES for them as for real GPUs), the README's
4-node recipe as far as one node allows, and a multi-worker preemption with the real trainer.
The stand-in main.py and helpers are tests/test_slurm.py's.
"""
import json
import os
import re
import shlex
import sys
import time

import pytest

from slurm_cluster import slurm_cluster  # noqa: F401  (the fixture)
from test_slurm import (REPO, STAND_IN_MAIN, job_env, read_log, real_job_env, wait_for_file,
                        workdir)  # noqa: F401  (workdir: the fixture)

# The stand-in also records where the trainer would read the slice cache from.
STAND_IN_WITH_CACHE = STAND_IN_MAIN.replace(
    'record = {"argv": sys.argv[1:], "start": time.time()}',
    'record = {"argv": sys.argv[1:], "start": time.time(), "cache": os.environ.get("SEMISEG_CACHE")}')


def stand_in_env(**extra):
    """test_slurm's job_env with any of its values replaced."""
    return {**job_env(), **extra}


def test_python_may_be_a_command(slurm_cluster, workdir):
    # `env FAKE_STEPS=5 python` stands for `apptainer exec --nv img.sif python`: a command of
    # several words whose own settings reach the process (5 steps instead of the default 3).
    job = slurm_cluster.submit("slurm/train_1gpu.sbatch", "supervised", "smoke", cwd=workdir,
                               env=stand_in_env(PYTHON=f"env FAKE_STEPS=5 {sys.executable}"))
    (record,) = slurm_cluster.wait(job, timeout=120)
    log = read_log(workdir, f"semiseg-1gpu-{job}.out")
    assert record["ExitCode"] == "0:0", log[-3000:]
    assert re.search(r"^python 3\.\d+\.\d+ .* tensorflow 2\.", log, re.MULTILINE), log[-3000:]
    assert re.findall(r"^step (\d+)$", log, re.MULTILINE) == ["1", "2", "3", "4", "5"]
    assert (workdir / f"runs/semiseg-1gpu-{job}/done.json").exists()


def test_cache_on_scratch_is_copied_once_per_node(slurm_cluster, workdir):
    (workdir / "main.py").write_text(STAND_IN_WITH_CACHE)
    shared, scratch = workdir / "shared-cache", workdir / "scratch"
    (shared / "key1").mkdir(parents=True)
    (shared / "key1" / "manifest.json").write_text('{"n_slices": 7}')
    scratch.mkdir()
    job = slurm_cluster.submit("slurm/train_1gpu.sbatch", "supervised", "smoke", cwd=workdir, env=job_env(
        CACHE_ON_SCRATCH="1", SEMISEG_CACHE=str(shared), SLURM_TMPDIR=str(scratch)))
    (record,) = slurm_cluster.wait(job, timeout=120)
    log = read_log(workdir, f"semiseg-1gpu-{job}.out")
    assert record["ExitCode"] == "0:0", log[-3000:]
    local = scratch / f"semiseg-cache-{job}"
    assert f"slice cache on node-local scratch: {shared} -> {local} (one copy per node, 1 node(s))" in log
    assert (local / "key1" / "manifest.json").read_text() == '{"n_slices": 7}'
    done = json.loads((workdir / f"runs/semiseg-1gpu-{job}/done.json").read_text())
    assert done["cache"] == str(local)


def test_tasks_sharing_a_nodes_gpus_are_pinned_by_local_id(slurm_cluster, tmp_path):
    # --gres=gpu:2 with two tasks and no --gpus-per-task: SLURM shows both GPUs to both tasks.
    code = ("import json, os; from semiseg.training import distribute; v = os.environ.get('CUDA_VISIBLE_DEVICES', ''); "
            "n = len([d for d in v.split(',') if d]); "
            "print('pin ' + json.dumps([int(os.environ['SLURM_LOCALID']), v, distribute.task_gpu_indices(os.environ, n)]))")
    script = tmp_path / "pin.sh"
    script.write_text(f"#!/bin/bash\nsrun {shlex.quote(sys.executable)} -c {shlex.quote(code)}\n")
    # Polled every 0.5 s (sbatch --wait backs off to tens of seconds).
    job = slurm_cluster.submit(str(script), options=["-n", "2", "--gres=gpu:2", "-o", str(tmp_path / "out.log")],
                               cwd=tmp_path, env=dict(TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO))
    (record,) = slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / "out.log").read_text()
    assert record["ExitCode"] == "0:0", log[-3000:]
    seen = sorted(json.loads(line[4:]) for line in log.splitlines() if line.startswith("pin "))
    assert seen == [[0, "0,1", [0]], [1, "0,1", [1]]], log[-3000:]


def recipe_blocks():
    """The README's 4-node recipe: its #SBATCH header lines and its command lines."""
    text = open(os.path.join(REPO, "slurm", "README.md")).read()
    section = text.split("### Recipe: 4 nodes x 4 GPUs", 1)[1].split("\n## ", 1)[0]
    header, commands = re.findall(r"```bash\n(.*?)```", section, re.DOTALL)[:2]
    return header.strip().splitlines(), commands.strip().splitlines()


def test_recipe_header_is_accepted_by_sbatch(slurm_cluster, tmp_path):
    header, _ = recipe_blocks()
    assert header and all(line.startswith("#SBATCH --") for line in header), header
    assert "#SBATCH --nodes=4" in header and "#SBATCH --gres=gpu:4" in header
    script = tmp_path / "recipe.sbatch"
    script.write_text("#!/bin/bash\n" + "\n".join(header) + "\ntrue\n")
    (tmp_path / "logs").mkdir()
    # The test cluster has one node (64 CPUs, 4 GPUs): everything but the node count is checked.
    proc = slurm_cluster.run("sbatch", "--test-only", "--nodes=1", str(script), check=False, cwd=tmp_path)
    assert proc.returncode == 0 and "to start at" in proc.stderr, proc.stderr
    refused = slurm_cluster.run("sbatch", "--test-only", str(script), check=False, cwd=tmp_path)
    assert refused.returncode != 0      # four nodes: this cluster cannot, so the header was read


def test_recipe_command_runs_on_one_node(slurm_cluster, workdir):
    _, commands = recipe_blocks()
    assert commands[0] == "mkdir -p logs"
    exports = shlex.split(commands[1])
    assert exports[0] == "export"
    env = dict(item.split("=", 1) for item in exports[1:])
    assert env["PYTHON"].startswith("apptainer exec --nv") and env["CACHE_ON_SCRATCH"] == "1"
    # No container here: the same settings through `env` in front of this Python.
    env["PYTHON"] = f"env NCCL_DEBUG={env['NCCL_DEBUG']} {sys.executable}"
    (workdir / "main.py").write_text(STAND_IN_WITH_CACHE)
    (workdir / "scratch").mkdir()
    argv = shlex.split(commands[2])
    assert argv[0] == "sbatch" and "--nodes=4" in argv
    argv = [a if a != "--nodes=4" else "--nodes=1" for a in argv]
    proc = slurm_cluster.run(*argv[:1], "--parsable", *argv[1:], cwd=workdir,
                             env=dict(slurm_cluster.env, **stand_in_env(**env, TMPDIR=str(workdir / "scratch"))))
    job = proc.stdout.strip()
    (record,) = slurm_cluster.wait(job, timeout=180)
    log = read_log(workdir, f"semiseg-4x4-{job}.out")
    assert record["ExitCode"] == "0:0", log[-3000:]
    assert "slice cache on node-local scratch" in log
    done = json.loads((workdir / f"runs/semiseg-4x4-{job}/done.json").read_text())
    assert done["cache"] == str(workdir / "scratch" / f"semiseg-cache-{job}")
    assert done["config"]["method"] == "mean_teacher" and done["config"]["preset"] == "pancreas_mean_teacher"
    assert done["config"]["train"]["batch_size"] == 64
    assert done["argv"][:7] == ["train", "--method", "mean_teacher", "--preset", "pancreas_mean_teacher",
                                "--data", "/data/Task07_Pancreas"]


# 70-260 s on a loaded machine (two TF starts, twice, and a requeue wait); in the default suite because
# the multi-node preemption path must be shown on the real SLURM in CI.
def test_real_trainer_two_workers_usr1_requeues_and_resumes(slurm_cluster, tmp_path):
    """Preemption of a two-worker run (srun --kill-on-bad-exit): every worker stops at the same
    step, the chief's checkpoint is complete when the workers exit, the job is requeued and
    both workers resume from that step to the end."""
    out = tmp_path / "run"
    steps = 60
    job = slurm_cluster.submit(
        os.path.join(REPO, "slurm/train_multinode.sbatch"), "supervised", "smoke",
        options=["--nodes=1", "--ntasks-per-node=2"], cwd=tmp_path,
        env=real_job_env(tmp_path, OUT=str(out), DISTRIBUTION="auto", EXTRA=(
            f"--no-progress --set train.epochs=2 train.steps_per_epoch={steps} "
            "train.steps_per_loop=1 train.checkpoint_every=5")))
    wait_for_file(out / "checkpoints" / "checkpoint", timeout=400)
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 240
    while slurm_cluster.job(job).get("Restarts") != "1" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.job(job).get("Restarts") == "1", read_log(tmp_path, "*.out")[-4000:]
    first = read_log(tmp_path, f"semiseg-multinode-{job}.out")
    slurm_cluster.wait_requeued_start(job)
    (record,) = slurm_cluster.wait(job, timeout=600)
    log = read_log(tmp_path, f"semiseg-multinode-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-4000:]
    saved = int(re.search(r"^\s*0: SIGUSR1 received: checkpoint saved at step (\d+)", first, re.MULTILINE).group(1))
    assert 0 < saved < 2 * steps
    # Every task exits 75 after the barrier; srun reports 75, or 143 when --kill-on-bad-exit
    # terminated a task that was still shutting down once the first had exited (after the barrier:
    # nothing of the run is lost). Either way the batch shell requeues.
    assert re.search(r"^command exited with code (75|143)$", first, re.MULTILINE), first[-3000:]
    assert f"requeueing job {job}" in first
    resumed = re.search(r"^\s*0: resumed from (\S+) \(epoch (\d+), step (\d+)\)", log, re.MULTILINE)
    assert resumed and int(resumed.group(3)) == saved, log[-4000:]
    assert resumed.group(1).endswith(f"ckpt-{saved}")
    history = [line.split(",") for line in open(out / "history.csv").read().splitlines()[1:]]
    assert [int(row[1]) for row in history] == [steps, 2 * steps]
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["status"] == "completed" and run_info["strategy"]["num_workers"] == 2
