"""Cluster settings decided without a cluster: the all-reduce implementation, GPU pinning of
SLURM tasks that share a node, worker host names. No GPU is needed: the decisions are functions
of the device count and SLURM's environment, checked here with the values SLURM sets.

    python -m pytest tests/test_cluster_config.py -q
"""
import json
import os
import subprocess
import sys

import pytest

from semiseg import config
from semiseg.errors import ConfigError
from semiseg.training import distribute

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("choice, gpus, expected", [
    ("auto", 0, "RING"), ("auto", 4, "NCCL"), ("nccl", 1, "NCCL"), ("ring", 4, "RING"), ("ring", 0, "RING")])
def test_collective_choice(choice, gpus, expected):
    assert distribute.collective_implementation(choice, gpus) == expected
    options = distribute.communication_options(expected)
    assert options.implementation.name == expected


def test_nccl_without_gpus_and_unknown_values_are_refused():
    with pytest.raises(ValueError, match="train.collective=nccl needs GPUs"):
        distribute.collective_implementation("nccl", 0)
    with pytest.raises(ValueError, match="train.collective='grpc'"):
        distribute.collective_implementation("grpc", 2)
    with pytest.raises(ConfigError, match="train.collective: must be one of auto, nccl, ring"):
        config.resolve("smoke", "", ["train.collective=grpc"], "supervised")
    assert config.resolve("smoke", "", ["train.collective=ring"], "supervised").train.collective == "ring"


def test_multi_worker_strategy_is_built_with_the_chosen_collective():
    # A lone local worker on CPU: auto -> RING, recorded in the info dict the trainer logs.
    code = ("import json\nfrom semiseg.training import distribute\n"
            "s, info = distribute.make_strategy('multi_worker', collective='auto')\n"
            "print(json.dumps([info['collective'], s.extended._communication_options.implementation.name]))")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", code], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == ["RING", "RING"]


def step_env(nodelist, tasks_per_node, node, local_id):
    """The variables srun sets in each task of a step."""
    return {"SLURM_STEP_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": tasks_per_node,
            "SLURMD_NODENAME": node, "SLURM_LOCALID": str(local_id)}


@pytest.mark.parametrize("env, visible, expected", [
    # --nodes=4 --ntasks-per-node=4 --gres=gpu:4, no --gpus-per-task: every task sees 4 GPUs.
    (step_env("gpu[01-04]", "4(x4)", "gpu03", 2), 4, [2]),
    (step_env("gpu[01-04]", "4(x4)", "gpu03", 0), 4, [0]),
    # Two tasks on an 8-GPU node: four each.
    (step_env("gpu[09-10]", "2(x2)", "gpu10", 1), 8, [4, 5, 6, 7]),
    # --gpus-per-task=1 (or --gpu-bind): SLURM already gave each task one GPU.
    (step_env("gpu[01-04]", "4(x4)", "gpu03", 2), 1, None),
    # One task per node uses all GPUs of its node (MirroredStrategy inside the worker).
    (step_env("gpu[01-04]", "1(x4)", "gpu02", 0), 4, None),
    # Uneven -n 3 over 2 nodes: the second node runs a single task.
    (step_env("n[1-2]", "2,1", "n2", 0), 4, None),
    (step_env("n[1-2]", "2,1", "n1", 1), 4, [2, 3]),
    # Outside an srun step (the batch shell, a laptop): nothing to pin.
    ({}, 4, None),
    # CPU nodes.
    (step_env("n[1-2]", "2(x2)", "n1", 1), 0, None),
])
def test_task_gpu_indices(env, visible, expected):
    assert distribute.task_gpu_indices(env, visible) == expected


def test_gpus_that_do_not_split_evenly_are_refused_naming_the_option():
    with pytest.raises(ValueError, match=r"3 SLURM tasks on this node each see 4 GPUs.*--gpus-per-task=1"):
        distribute.task_gpu_indices(step_env("gpu[01-02]", "3(x2)", "gpu01", 0), 4)


def test_worker_host_suffix(monkeypatch):
    for key in [k for k in os.environ if k.startswith("SLURM")]:
        monkeypatch.delenv(key)
    monkeypatch.setenv("SEMISEG_PORT", "21000")
    for key, value in {"SLURM_STEP_NODELIST": "node[9-10]", "SLURM_STEP_TASKS_PER_NODE": "1(x2)",
                       "SLURM_STEP_NUM_TASKS": "2", "SLURM_PROCID": "1", "SLURMD_NODENAME": "node10",
                       "SLURM_LOCALID": "0", "SEMISEG_WORKER_HOST_SUFFIX": "-ib"}.items():
        monkeypatch.setenv(key, value)
    resolver = distribute.slurm_cluster_resolver(0)
    assert resolver.cluster_spec().as_dict() == {"worker": ["node9-ib:21000", "node10-ib:21000"]}
    assert resolver.task_id == 1
    monkeypatch.delenv("SEMISEG_WORKER_HOST_SUFFIX")
    assert distribute.slurm_cluster_resolver(0).cluster_spec().as_dict() == {
        "worker": ["node9:21000", "node10:21000"]}


def test_train_with_nccl_on_a_cpu_machine_exits_2_and_writes_nothing(tmp_path):
    out = tmp_path / "run"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TF_CONFIG"}
    env.update(CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "main.py", "train", "--method", "supervised", "--preset", "smoke",
                           "--no-progress", "--out", str(out), "--set", "train.distribution=multi_worker",
                           "train.collective=nccl"], env=env, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "error: train.collective=nccl needs GPUs" in proc.stderr
    assert not out.exists()
