"""Strategy choice and cluster discovery of distribute.py, on CPU, without a real SLURM.

    python -m pytest tests/test_distribute.py -q

Strategies that need the TF runtime configured before start-up (two logical CPUs, two
localhost workers) run in subprocesses with a timeout, so a hang fails instead of blocking.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from semiseg.training import distribute  # noqa: E402

SUBPROCESS_TIMEOUT_S = 240


def python_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TF_CONFIG", "SEMISEG_PORT")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, **extra)
    return env


def last_json_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result in output:\n{stdout}"
    return json.loads(lines[-1])


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_none_gives_one_replica_and_serialisable_info():
    strategy, info = distribute.make_strategy("none")
    assert strategy.num_replicas_in_sync == 1
    assert info["num_replicas"] == 1 and info["num_workers"] == 1
    assert info["is_chief"] is True and info["strategy"] == "default"
    assert json.loads(json.dumps(info)) == info


def test_unknown_distribution_is_rejected_by_name():
    with pytest.raises(ValueError, match="train.distribution='ring'"):
        distribute.make_strategy("ring")


MIRRORED_SCRIPT = textwrap.dedent("""
    import json, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy("mirrored")
    total, expected = distribute.check_all_reduce(strategy)
    # A per-replica tensor: replica r holds [r, 10 r]; the SUM over replicas is [1, 10].
    per_replica = strategy.run(lambda: tf.cast(
        tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32) * [1.0, 10.0])
    vector = strategy.reduce("SUM", per_replica, axis=None).numpy().tolist()
    print(json.dumps({"info": info, "sum": total, "expected": expected, "vector": vector,
                      "stop_none": distribute.any_worker_true(strategy, False),
                      "stop_one": distribute.any_worker_true(strategy, True),
                      "chief_int": distribute.chief_int(strategy, 12345678901)}))
""")


def test_mirrored_over_two_logical_cpus_all_reduces():
    proc = subprocess.run([sys.executable, "-c", MIRRORED_SCRIPT], env=python_env(),
                          capture_output=True, text=True, timeout=SUBPROCESS_TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = last_json_line(proc.stdout)
    assert result["info"]["strategy"] == "MirroredStrategy"
    assert result["info"]["num_replicas"] == 2 and result["info"]["num_workers"] == 1
    assert result["sum"] == result["expected"] == 3.0
    assert result["vector"] == [1.0, 10.0]
    assert result["stop_none"] is False and result["stop_one"] is True
    assert result["chief_int"] == 12345678901       # not doubled by the two replicas


WORKER_SCRIPT = textwrap.dedent("""
    import json
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy("auto")
    total, expected = distribute.check_all_reduce(strategy)
    # Only worker 1 "received a signal": both must agree to stop.
    stop = distribute.any_worker_true(strategy, info["task_index"] == 1)
    # Each worker offers its own value (as if each saw another newest checkpoint): all get the chief's.
    chief = distribute.chief_int(strategy, 7 + 10 * info["task_index"])
    print(json.dumps({"info": info, "sum": total, "expected": expected, "stop": stop, "chief": chief}))
""")


def test_two_localhost_workers_with_tf_config_all_reduce():
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    procs = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        procs.append(subprocess.Popen(
            [sys.executable, "-c", WORKER_SCRIPT], env=python_env(TF_CONFIG=tf_config),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=SUBPROCESS_TIMEOUT_S))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for proc, (_, stderr) in zip(procs, outputs):
        assert proc.returncode == 0, stderr[-3000:]
    results = [last_json_line(stdout) for stdout, _ in outputs]
    for index, result in enumerate(results):
        info = result["info"]
        assert info["strategy"] == "MultiWorkerMirroredStrategy" and info["source"] == "tf_config"
        assert info["num_workers"] == 2 and info["num_replicas"] == 2
        assert info["task_index"] == index and info["is_chief"] == (index == 0)
        assert info["cluster"] == cluster
        assert result["sum"] == result["expected"] == 3.0
        assert result["stop"] is True
        assert result["chief"] == 7


def fake_slurm_step(monkeypatch, nodelist, tasks_per_node, procid, node, local_id,
                    job_id="12345"):
    for key in list(os.environ):
        if key.startswith("SLURM_") or key == "SEMISEG_PORT":
            monkeypatch.delenv(key)
    monkeypatch.setenv("SLURM_JOB_ID", job_id)
    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_STEP_TASKS_PER_NODE", tasks_per_node)
    num_tasks = sum(distribute.expand_tasks_per_node(tasks_per_node))
    monkeypatch.setenv("SLURM_STEP_NUM_TASKS", str(num_tasks))
    monkeypatch.setenv("SLURM_PROCID", str(procid))
    monkeypatch.setenv("SLURMD_NODENAME", node)
    monkeypatch.setenv("SLURM_LOCALID", str(local_id))


@pytest.mark.parametrize("procid,node", [(0, "node9"), (1, "node10")])
def test_slurm_nodes_keep_slurm_order_not_string_order(monkeypatch, procid, node):
    fake_slurm_step(monkeypatch, "node[9-10]", "1(x2)", procid, node, 0)
    resolver = distribute.slurm_cluster_resolver(gpus_per_task=0)
    port = 20000 + (12345 % 750) * 16
    # TF's resolver alone sorts "node10" before "node9", giving rank 0 node10's address.
    assert resolver.cluster_spec().as_dict() == {"worker": [f"node9:{port}", f"node10:{port}"]}
    assert (resolver.task_type, resolver.task_id) == ("worker", procid)
    assert resolver.num_accelerators() == {"GPU": 0}
    assert distribute.slurm_step_tasks() == 2


def test_slurm_several_tasks_per_node_get_consecutive_ports(monkeypatch):
    fake_slurm_step(monkeypatch, "node[9-10]", "2(x2)", 3, "node10", 1, job_id="40007")
    monkeypatch.setenv("SEMISEG_PORT", "31000")
    resolver = distribute.slurm_cluster_resolver(gpus_per_task=2)
    assert resolver.cluster_spec().as_dict()["worker"] == [
        "node9:31000", "node9:31001", "node10:31000", "node10:31001"]
    assert resolver.task_id == 3
    assert resolver.num_accelerators() == {"GPU": 2}


def test_slurm_uneven_tasks_are_all_kept(monkeypatch):
    # 2 + 1 + 1 tasks: the resolver's GPU arithmetic would drop tasks if given 1 GPU per node.
    fake_slurm_step(monkeypatch, "gpu-a[1-3]", "2,1(x2)", 2, "gpu-a2", 0)
    resolver = distribute.slurm_cluster_resolver(gpus_per_task=0)
    assert len(resolver.cluster_spec().as_dict()["worker"]) == 4
    assert resolver.cluster_spec().as_dict()["worker"][2].startswith("gpu-a2:")


def test_slurm_cyclic_distribution_is_refused(monkeypatch):
    # Under --distribution=cyclic rank 1 sits on the second node: not the block layout.
    fake_slurm_step(monkeypatch, "node[9-10]", "2(x2)", 1, "node10", 0)
    with pytest.raises(RuntimeError, match="--distribution=block"):
        distribute.slurm_cluster_resolver(gpus_per_task=0)


def test_port_from_job_id_and_override():
    assert distribute.slurm_port({"SLURM_JOB_ID": "12345"}) == 20000 + 345 * 16
    assert distribute.slurm_port({"SLURM_JOB_ID": "57000"}) == 20000 + 0 * 16
    assert distribute.slurm_port({"SLURM_JOB_ID": "8"}) - distribute.slurm_port({"SLURM_JOB_ID": "7"}) == 16
    assert distribute.slurm_port({"SLURM_JOB_ID": "1", "SEMISEG_PORT": "29500"}) == 29500
    with pytest.raises(RuntimeError, match="SEMISEG_PORT"):
        distribute.slurm_port({})


def test_batch_shell_is_not_a_multi_task_step():
    # sbatch -n 2 sets SLURM_NTASKS=2 in the batch shell, which is still a single process.
    assert distribute.slurm_step_tasks({"SLURM_NTASKS": "2", "SLURM_PROCID": "0"}) == 0
    assert distribute.tf_config_tasks({"TF_CONFIG": json.dumps(
        {"cluster": {"chief": ["a:1"], "worker": ["b:1", "c:1"]}})}) == 3
    with pytest.raises(ValueError, match="TF_CONFIG"):
        distribute.tf_config_tasks({"TF_CONFIG": "{not json"})


def test_only_chief_checkpoints_in_run_folder(tmp_path):
    run_dir = str(tmp_path / "run")
    chief = {"is_chief": True, "task_type": "worker", "task_index": 0}
    workers = [{"is_chief": False, "task_type": "worker", "task_index": i} for i in (1, 2)]
    assert distribute.worker_checkpoint_dir(run_dir, chief) == os.path.join(run_dir, "checkpoints")
    paths = [distribute.worker_checkpoint_dir(run_dir, info) for info in workers]
    assert len(set(paths)) == 2
    assert all(not path.startswith(run_dir) for path in paths)
    os.makedirs(paths[0])
    distribute.remove_worker_checkpoint_dir(paths[0], workers[0])
    assert not os.path.exists(os.path.dirname(paths[0]))
    os.makedirs(os.path.join(run_dir, "checkpoints"))
    distribute.remove_worker_checkpoint_dir(os.path.join(run_dir, "checkpoints"), chief)
    assert os.path.isdir(os.path.join(run_dir, "checkpoints"))
