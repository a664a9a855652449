"""The sbatch scripts and semiseg.training.distribute on a real single-node SLURM (tests/slurm_cluster.py).

    python -m pytest tests/test_slurm.py -q     # skipped, saying why, where SLURM cannot run

The scripts are run from a copy of the repository in tmp_path whose main.py is STAND_IN_MAIN:
a stand-in that honours the trainer's contract with the scripts (checkpoint every step under
OUT/checkpoints, --resume continues from it, SIGUSR1/SIGTERM -> save and exit 75, only the
chief writes OUT) without training anything, so these tests check the scripts' machinery. It
parses its arguments with the real main.py's parser and resolves the real config from them, so
it cannot accept a command line the trainer would read differently. The tests at the end run
the real trainer.
"""
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time

import pytest
import yaml

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)

from slurm_cluster import slurm_cluster  # noqa: E402,F401  (the fixture; pytest puts tests/ on the path)


def _load_sweep_index():
    """slurm/sweep_index.py is a script beside the sbatch files, not a package: load it from its file."""
    spec = importlib.util.spec_from_file_location("sweep_index", os.path.join(REPO, "slurm", "sweep_index.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sweep_index = _load_sweep_index()

STAND_IN_MAIN = textwrap.dedent('''
    """Stand-in for main.py: the trainer's side of the sbatch scripts' contract."""
    import importlib.util, json, os, signal, sys, time

    # The real command line's parser and config resolution: what the stand-in records is what the
    # trainer would have run with.
    from semiseg import cli as real_main
    args = real_main.build_parser().parse_args()
    record = {"argv": sys.argv[1:], "start": time.time()}
    if args.command == "train" and not args.resume:      # a resumed run reads OUT/config.yaml
        cfg = real_main.config.resolve(args.preset, args.config, args.set, args.method)
        record["config"] = real_main.config.to_dict(cfg)

    if args.command == "preprocess":
        time.sleep(1)
        record["end"] = time.time()
        with open("preprocessed.json", "w") as f:
            json.dump(record, f)
        sys.exit(0)

    info = {"is_chief": True, "task_index": 0}
    if int(os.environ.get("SLURM_STEP_NUM_TASKS", "0")) > 1:
        from semiseg.training import distribute
        strategy, info = distribute.make_strategy("auto")
        total, expected = distribute.check_all_reduce(strategy)
        print(f"all-reduce task={info['task_index']} workers={info['num_workers']} "
              f"sum={total:g} expected={expected:g}", flush=True)
        record["strategy"] = info

    stop = []
    signal.signal(signal.SIGUSR1, lambda signum, frame: stop.append(signum))
    signal.signal(signal.SIGTERM, lambda signum, frame: stop.append(signum))
    ckpt = os.path.join(args.out, "checkpoints", "step")
    step = 0
    if args.resume:
        with open(ckpt) as f:
            step = int(f.read())
        print(f"resumed from step {step}", flush=True)
    record["first_step"] = step

    def save(step):
        if info["is_chief"]:
            os.makedirs(os.path.dirname(ckpt), exist_ok=True)
            with open(ckpt + ".tmp", "w") as f:
                f.write(str(step))
            os.replace(ckpt + ".tmp", ckpt)   # atomic: a kill never leaves half a checkpoint

    steps = int(os.environ.get("FAKE_STEPS", "3"))
    while step < steps:
        time.sleep(float(os.environ.get("FAKE_STEP_SECONDS", "0.1")))
        step += 1
        save(step)
        print(f"step {step}", flush=True)
        if stop:
            print(f"interrupted by signal {stop[0]} at step {step}", flush=True)
            sys.exit(75)
    if info["is_chief"]:
        record["end"] = time.time()
        with open(os.path.join(args.out, "done.json"), "w") as f:
            json.dump(record, f)
''')


def make_workdir(tmp_path, stand_in=STAND_IN_MAIN):
    """A submit folder: the scripts and a stand-in main.py (semiseg comes from PYTHONPATH); logs/ made."""
    shutil.copytree(os.path.join(REPO, "slurm"), tmp_path / "slurm")
    (tmp_path / "main.py").write_text(stand_in)
    (tmp_path / "logs").mkdir()
    return tmp_path


@pytest.fixture
def workdir(tmp_path):
    return make_workdir(tmp_path)


def job_env(**extra):
    return dict(PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO,
                **extra)


def read_log(workdir, pattern):
    logs = sorted((workdir / "logs").glob(pattern))
    assert logs, f"no log {pattern} in {workdir / 'logs'}"
    return "\n".join(log.read_text() for log in logs)


def wait_for_file(path, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().strip():
            return path.read_text().strip()
        time.sleep(0.2)
    raise TimeoutError(f"{path} did not appear within {timeout}s")


def test_srun_two_tasks_all_reduce_with_auto_strategy(slurm_cluster, tmp_path):
    script = tmp_path / "allreduce.sh"
    script.write_text(f"#!/bin/bash\ncd {REPO}\nsrun --label {sys.executable} -m semiseg.training.distribute --check\n")
    proc = slurm_cluster.run("sbatch", "--wait", "-n", "2", "-o", str(tmp_path / "out.log"),
                             str(script), check=False, timeout=300, cwd=tmp_path,
                             env=dict(slurm_cluster.env, TF_CPP_MIN_LOG_LEVEL="3"))
    log = (tmp_path / "out.log").read_text()
    assert proc.returncode == 0, log[-3000:]
    lines = re.findall(r"all-reduce task=(\d) workers=(\d) replicas=(\d) sum=(\S+) expected=(\S+)",
                       log)
    assert sorted(task for task, *_ in lines) == ["0", "1"]
    assert all(tuple(rest) == ("2", "2", "3", "3") for _, *rest in lines), lines
    infos = [json.loads(line.split("strategy ", 1)[1]) for line in log.splitlines()
             if "strategy {" in line]
    assert {info["source"] for info in infos} == {"slurm"}
    assert sorted(info["is_chief"] for info in infos) == [False, True]


def test_multinode_script_runs_two_workers(slurm_cluster, workdir):
    # Two tasks on this one node stand for two nodes.
    job = slurm_cluster.submit("slurm/train_multinode.sbatch", "supervised", "smoke",
                               options=["--nodes=1", "--ntasks-per-node=2"], cwd=workdir,
                               env=job_env(EXTRA="--set train.epochs=1"))
    (record,) = slurm_cluster.wait(job, timeout=400)
    log = read_log(workdir, f"semiseg-multinode-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-3000:]
    assert len(re.findall(r"all-reduce task=\d workers=2 sum=3 expected=3", log)) == 2, log
    assert f"port {20000 + (int(job) % 750) * 16}" in log and "tensorflow 2." in log
    done = json.loads((workdir / f"runs/semiseg-multinode-{job}/done.json").read_text())
    assert done["strategy"]["num_workers"] == 2 and done["strategy"]["task_index"] == 0
    assert done["config"]["train"]["epochs"] == 1 and done["config"]["preset"] == "smoke"
    assert done["argv"] == ["train", "--method", "supervised", "--preset", "smoke",
                            "--out", f"runs/semiseg-multinode-{job}", "--set", "train.epochs=1"]


def test_usr1_checkpoints_requeues_and_resumes(slurm_cluster, workdir):
    job = slurm_cluster.submit("slurm/train_1gpu.sbatch", "mean_teacher", "smoke", cwd=workdir,
                               env=job_env(FAKE_STEPS="30", FAKE_STEP_SECONDS="0.3"))
    step_file = workdir / f"runs/semiseg-1gpu-{job}/checkpoints/step"
    wait_for_file(step_file)
    # What --signal=B:USR1@120 does two minutes before the time limit.
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 120
    while slurm_cluster.job(job).get("Restarts") != "1" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.job(job).get("Restarts") == "1", slurm_cluster.job(job)
    slurm_cluster.wait_requeued_start(job)
    (record,) = slurm_cluster.wait(job, timeout=300)
    log = read_log(workdir, f"semiseg-1gpu-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-3000:]
    interrupted = int(re.search(r"interrupted by signal 10 at step (\d+)", log).group(1))
    assert "command exited with code 75" in log and f"requeueing job {job}" in log
    assert "restart 1 on" in log and "resuming runs/" in log
    assert f"resumed from step {interrupted}" in log
    done = json.loads((workdir / f"runs/semiseg-1gpu-{job}/done.json").read_text())
    assert done["first_step"] == interrupted and 0 < interrupted < 30
    assert "--resume" in done["argv"]
    assert step_file.read_text() == "30"


def test_scancel_stops_without_requeue(slurm_cluster, workdir):
    job = slurm_cluster.submit("slurm/train_1gpu.sbatch", "supervised", cwd=workdir,
                               env=job_env(FAKE_STEPS="300", FAKE_STEP_SECONDS="0.3"))
    wait_for_file(workdir / f"runs/semiseg-1gpu-{job}/checkpoints/step")
    slurm_cluster.run("scancel", job)
    (record,) = slurm_cluster.wait(job, timeout=120)
    assert record["JobState"] == "CANCELLED"
    deadline = time.monotonic() + 30   # the batch shell may still be writing its last lines
    while "command exited" not in read_log(workdir, f"semiseg-1gpu-{job}.out"):
        assert time.monotonic() < deadline, read_log(workdir, f"semiseg-1gpu-{job}.out")
        time.sleep(0.5)
    log = read_log(workdir, f"semiseg-1gpu-{job}.out")
    assert "caught SIGTERM" in log and "requeueing" not in log
    assert slurm_cluster.job(job)["Restarts"] == "0"


def test_node_script_takes_env_inputs_and_resumes_existing_out(slurm_cluster, workdir):
    # A run folder that already has a checkpoint (an earlier job of the same OUT).
    (workdir / "runs/mine/checkpoints").mkdir(parents=True)
    (workdir / "runs/mine/checkpoints/step").write_text("2")
    job = slurm_cluster.submit("slurm/train_node.sbatch", cwd=workdir, env=job_env(
        METHOD="mixmatch", DATA="/data/isic", FORMAT="isic", OUT="runs/mine",
        EXTRA="--set train.precision=mixed_float16", FAKE_STEPS="4"))
    (record,) = slurm_cluster.wait(job, timeout=120)
    log = read_log(workdir, f"semiseg-node-{job}.out")
    assert record["ExitCode"] == "0:0", log[-3000:]
    done = json.loads((workdir / "runs/mine/done.json").read_text())
    assert done["argv"] == ["train", "--method", "mixmatch", "--data", "/data/isic",
                            "--set", "data.format=isic", "--out", "runs/mine", "--resume",
                            "--set", "train.precision=mixed_float16"]
    assert done["first_step"] == 2
    assert re.findall(r"^step (\d+)$", log, re.MULTILINE) == ["3", "4"]


def test_sweep_array_after_preprocess(slurm_cluster, workdir):
    index = subprocess.run(
        [sys.executable, "slurm/sweep_index.py", "--methods", "supervised", "mean_teacher",
         "--fractions", "0.1", "--seeds", "3", "--presets", "mean_teacher=pancreas_mean_teacher"],
        cwd=workdir, capture_output=True, text=True, check=True)
    (workdir / "sweep.tsv").write_text(index.stdout)
    assert "--array=0-1" in index.stderr
    # As the docs chain them: preprocess with the sweep's preset, so that training finds its cache.
    pre = slurm_cluster.submit("slurm/preprocess.sbatch", "/data/Task07", "msd", cwd=workdir,
                               env=job_env(PRESET="smoke"))
    sweep = slurm_cluster.submit("slurm/sweep.sbatch", "sweep.tsv", cwd=workdir,
                                 options=["--array=0-1", f"--dependency=afterok:{pre}"],
                                 env=job_env(PRESET="smoke"))
    (pre_record,) = slurm_cluster.wait(pre, timeout=120)
    records = slurm_cluster.wait(sweep, timeout=300)
    assert pre_record["ExitCode"] == "0:0", read_log(workdir, f"semiseg-preprocess-{pre}.out")
    assert [r["JobState"] for r in records] == ["COMPLETED", "COMPLETED"], \
        read_log(workdir, "semiseg-sweep-*.out")
    preprocessed = json.loads((workdir / "preprocessed.json").read_text())
    assert preprocessed["argv"] == ["preprocess", "--data", "/data/Task07", "--format", "msd", "--preset", "smoke"]
    for method, preset in (("supervised", "smoke"), ("mean_teacher", "pancreas_mean_teacher")):
        done = json.loads((workdir / f"runs/sweep/{method}-lf0.1-seed3/done.json").read_text())
        assert done["argv"] == ["train", "--method", method, "--preset", preset,
                                "--out", f"runs/sweep/{method}-lf0.1-seed3",
                                "--set", "data.labeled_fraction=0.1", "--set", "seed=3"]
        # Both --set options reach the config (a parser keeping only the last one lost the fraction).
        assert done["config"]["data"]["labeled_fraction"] == 0.1 and done["config"]["seed"] == 3
        assert done["config"]["preset"] == preset and done["config"]["method"] == method
        assert done["start"] > preprocessed["end"]   # afterok held the sweep back


def test_sweep_index_rows_and_errors():
    rows = sweep_index.sweep_rows(["a", "b"], [0.1, 0.25], [0, 1], {"b": "pb"})
    assert len(rows) == 8
    assert rows[0] == (0, "a", "0.1", "0", "-")
    assert rows[7] == (7, "b", "0.25", "1", "pb")
    with pytest.raises(ValueError, match="not in --methods: c"):
        sweep_index.sweep_rows(["a"], [0.1], [0], {"c": "x"})
    with pytest.raises(ValueError, match="1.5 is not in"):
        sweep_index.sweep_rows(["a"], [1.5], [0])
    with pytest.raises(ValueError, match="METHOD=PRESET"):
        sweep_index.parse_presets(["nopreset"])


# ---------------------------------------------------------------- the real trainer under SLURM
# The scripts run REPO's own main.py (SEMISEG_ROOT=REPO); logs and the run folder (OUT, absolute)
# stay in tmp_path. Few and small: every TF start costs 10-30 s on a small machine.
RUN_FILES = ("config.yaml", "splits.json", "history.csv", "checkpoints", "metrics.json",
             "per_case.csv", "run_info.json", "best_model.keras")


def real_job_env(tmp_path, **extra):
    (tmp_path / "logs").mkdir(exist_ok=True)
    return dict(PYTHON=sys.executable, TF_CPP_MIN_LOG_LEVEL="3", SEMISEG_ROOT=REPO,
                SEMISEG_CACHE=os.environ.get("SEMISEG_CACHE", str(tmp_path / "cache")),
                CUDA_VISIBLE_DEVICES="", **extra)


def test_real_trainer_multinode_two_workers(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    job = slurm_cluster.submit(
        os.path.join(REPO, "slurm/train_multinode.sbatch"), "supervised", "smoke",
        options=["--nodes=1", "--ntasks-per-node=2"], cwd=tmp_path,
        env=real_job_env(tmp_path, OUT=str(out), DISTRIBUTION="auto",
                         EXTRA="--no-progress --set train.epochs=1"))
    (record,) = slurm_cluster.wait(job, timeout=600)
    log = read_log(tmp_path, f"semiseg-multinode-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-4000:]
    # srun --label prefixes each line with its rank; both ranks built the same 2-worker strategy.
    infos = {int(rank): json.loads(text) for rank, text in
             re.findall(r"^\s*(\d+): strategy: (\{.*\}); per-replica batch 2$", log, re.MULTILINE)}
    assert sorted(infos) == [0, 1], log[-4000:]
    for rank, info in infos.items():
        assert info["strategy"] == "MultiWorkerMirroredStrategy" and info["source"] == "slurm"
        assert (info["num_workers"], info["num_replicas"]) == (2, 2)
        assert info["task_index"] == rank and info["is_chief"] == (rank == 0)
    # The chief logs the epoch's all-reduced loss; history.csv holds the same value.
    (loss,) = re.findall(r"^\s*0: epoch 1/1 loss=(\d+\.\d+)", log, re.MULTILINE)
    assert not re.search(r"^\s*1: epoch 1/1", log, re.MULTILINE)    # only the chief logs
    for name in RUN_FILES:
        assert (out / name).exists(), name
    history = open(out / "history.csv").read().splitlines()
    assert len(history) == 2 and float(history[1].split(",")[3]) == pytest.approx(float(loss), abs=1e-4)
    run_info = json.loads((out / "run_info.json").read_text())
    assert run_info["status"] == "completed"
    assert run_info["strategy"]["num_workers"] == 2
    assert json.loads((out / "metrics.json").read_text())["n_cases"] > 0


def test_real_trainer_usr1_requeues_and_resumes(slurm_cluster, tmp_path):
    out = tmp_path / "run"
    steps = 80                     # per epoch (~0.1 s each here): the signal lands mid-run
    job = slurm_cluster.submit(
        os.path.join(REPO, "slurm/train_1gpu.sbatch"), "supervised", "smoke", cwd=tmp_path,
        env=real_job_env(tmp_path, OUT=str(out), EXTRA=(
            f"--no-progress --set train.epochs=2 train.steps_per_epoch={steps} "
            "train.steps_per_loop=1 train.checkpoint_every=5")))
    wait_for_file(out / "checkpoints" / "checkpoint", timeout=300)    # training is under way
    slurm_cluster.run("scancel", "--signal=USR1", "--batch", job)
    deadline = time.monotonic() + 180
    while slurm_cluster.job(job).get("Restarts") != "1" and time.monotonic() < deadline:
        time.sleep(0.5)
    assert slurm_cluster.job(job).get("Restarts") == "1", read_log(tmp_path, "*.out")[-4000:]
    slurm_cluster.wait_requeued_start(job)
    (record,) = slurm_cluster.wait(job, timeout=600)
    log = read_log(tmp_path, f"semiseg-1gpu-{job}.out")
    assert record["JobState"] == "COMPLETED" and record["ExitCode"] == "0:0", log[-4000:]
    saved = int(re.search(r"SIGUSR1 received: checkpoint saved at step (\d+)", log).group(1))
    assert 0 < saved < 2 * steps
    assert "command exited with code 75" in log and f"requeueing job {job}" in log
    assert "restart 1 on" in log
    resumed = re.search(r"resumed from (\S+) \(epoch (\d+), step (\d+)\)", log)
    assert resumed and int(resumed.group(3)) == saved, log[-4000:]
    assert resumed.group(1).endswith(f"ckpt-{saved}")
    history = [line.split(",") for line in open(out / "history.csv").read().splitlines()[1:]]
    assert [int(row[1]) for row in history] == [steps, 2 * steps]
    assert json.loads((out / "run_info.json").read_text())["status"] == "completed"


def test_real_sweep_array_trains_each_rows_fraction_and_seed(slurm_cluster, tmp_path):
    # Fractions and seeds unlike the smoke preset's (0.25, 0): each row's values must reach the run.
    rows = [(0, "supervised", "0.5", "1", "-"), (1, "supervised", "0.75", "2", "-")]
    index = tmp_path / "sweep.tsv"
    index.write_text("".join("\t".join(map(str, row)) + "\n" for row in rows))
    sweep_out = tmp_path / "sweep"
    job = slurm_cluster.submit(
        os.path.join(REPO, "slurm/sweep.sbatch"), str(index), options=["--array=0-1"], cwd=tmp_path,
        env=real_job_env(tmp_path, PRESET="smoke", SWEEP_OUT=str(sweep_out), EXTRA=(
            "--no-progress --set train.epochs=1 train.steps_per_epoch=2")))
    records = slurm_cluster.wait(job, timeout=600)
    log = read_log(tmp_path, "semiseg-sweep-*.out")
    assert [r["JobState"] for r in records] == ["COMPLETED", "COMPLETED"], log[-4000:]
    for _, method, fraction, seed, _ in rows:
        run = sweep_out / f"{method}-lf{fraction}-seed{seed}"
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["data"]["labeled_fraction"] == float(fraction) and saved["seed"] == int(seed)
        # The EXTRA overrides before the sweep's own --set options were kept as well.
        assert (saved["preset"], saved["train"]["epochs"], saved["train"]["steps_per_epoch"]) == ("smoke", 1, 2)
        assert json.loads((run / "splits.json").read_text())["labeled_fraction"] == float(fraction)
        assert json.loads((run / "run_info.json").read_text())["status"] == "completed"
