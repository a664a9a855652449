"""Pick and build the tf.distribute strategy: one CPU, all GPUs of a node, or many workers.

The trainer calls `make_strategy(config.train.distribution)` before any other TF op (a
MultiWorkerMirroredStrategy must configure collectives before the TF runtime starts), then
saves the returned info dict in the run folder. Check a cluster by hand with:

    python -m semiseg.training.distribute --distribution auto --check             # one process
    srun -N 2 --ntasks-per-node=1 python -m semiseg.training.distribute --check   # one worker per SLURM task

`auto` picks, in order: a SLURM step with more than one task -> MultiWorkerMirroredStrategy
over the SLURM tasks; TF_CONFIG with more than one task -> MultiWorkerMirroredStrategy; more
than one GPU visible -> MirroredStrategy; else TF's default (single-device) strategy.

Multi-worker all-reduces use NCCL when the workers have GPUs and TF's gRPC ring on CPUs
(`train.collective=auto|nccl|ring`). Several SLURM tasks on one node that each see every GPU of
the node (`--gres=gpu:4 --ntasks-per-node=4` without `--gpus-per-task`) are pinned to one GPU
each by SLURM_LOCALID. SEMISEG_WORKER_HOST_SUFFIX (environment, e.g. `-ib`) is appended to the
SLURM node names in worker addresses, for clusters whose fast network has its own host names.

SEMISEG_LOGICAL_CPUS=N (environment) splits the CPU into N logical devices before the strategy
is built, so `mirrored` runs N replicas on a machine without GPUs (the equivalence tests do):

    SEMISEG_LOGICAL_CPUS=2 python main.py train --preset smoke --set train.distribution=mirrored
"""
import argparse
import hashlib
import json
import os
import shutil
import signal
import tempfile

import tensorflow as tf
# TF's own SLURM hostlist parsers ("node[9-10]" -> ["node9", "node10"], "2(x3)" -> [2, 2, 2]);
# they are not exported under tf.*, only the resolver class is.
from tensorflow.python.distribute.cluster_resolver.slurm_cluster_resolver import (
    expand_hostlist, expand_tasks_per_node)

DISTRIBUTIONS = ("auto", "none", "mirrored", "multi_worker")
COLLECTIVES = ("auto", "nccl", "ring")

STRATEGY_NAMES = {"none": "default", "mirrored": "MirroredStrategy",
                  "multi_worker": "MultiWorkerMirroredStrategy"}

# Exit code of a training process that caught SIGUSR1/SIGTERM, wrote a checkpoint and stopped
# early (EX_TEMPFAIL: "try again later"). slurm/job_lib.sh requeues a job that exits so after
# SIGUSR1 (the time-limit warning).
PREEMPTED_EXIT_CODE = 75

# Port of SLURM task 0 on each node is PORT_BASE + (job_id % PORT_SPAN) * PORT_STRIDE (tasks sharing a node
# take the next ports), so two jobs on one node rarely collide; SEMISEG_PORT overrides it.
# 20000-31999 stays below Linux's ephemeral range (32768+) used by outgoing connections.
PORT_BASE, PORT_SPAN = 20000, 750    # job ids modulo PORT_SPAN ...
PORT_STRIDE = 16          # ... times this: one job's tasks on a node get ports P..P+15, so consecutive jobs
                          # (ids n, n+1) never share a port, even while the last one's sockets linger


# Signals (SIGTERM, SIGUSR1) caught before the trainer installs its own handler, and the handlers
# the early catch replaced (what the trainer puts back when it is done).
_early_signals = []
_before_early = {}


def catch_preemption_signals_early():
    """Record SIGTERM/SIGUSR1 from now on; the trainer's Preemption takes over what arrived.

    Start-up (TF, the slice cache, building networks) can take minutes, and Python's default
    action for SIGUSR1 kills the process: a time-limit warning then would lose the job without a
    checkpoint. Recorded, it makes the trainer save and stop after its first steps instead.
    """
    _early_signals.clear()          # a second run in one process starts clean
    def record(signum, _frame):
        _early_signals.append(signal.Signals(signum).name)
    record.semiseg_early = True
    for sig in (signal.SIGTERM, signal.SIGUSR1):
        try:
            previous = signal.signal(sig, record)
        except ValueError:          # not the main thread
            continue
        if not getattr(previous, "semiseg_early", False):
            _before_early[sig] = previous


def handler_to_restore(sig, replaced):
    """The handler to put back for `sig` once training is over: the one before the early catch
    when `replaced` is that catch (so SIGTERM ends the process again), else `replaced` itself."""
    return _before_early.get(sig, replaced) if getattr(replaced, "semiseg_early", False) else replaced


def early_signal():
    """Name of the first signal recorded by catch_preemption_signals_early, else None."""
    return _early_signals[0] if _early_signals else None


def slurm_port(env=None):
    """The first port of this job's workers: $SEMISEG_PORT, else derived from $SLURM_JOB_ID."""
    env = os.environ if env is None else env
    if env.get("SEMISEG_PORT"):
        return int(env["SEMISEG_PORT"])
    if not env.get("SLURM_JOB_ID"):
        raise RuntimeError("SLURM_JOB_ID is not set: cannot derive a port; set SEMISEG_PORT")
    return PORT_BASE + (int(env["SLURM_JOB_ID"]) % PORT_SPAN) * PORT_STRIDE


def slurm_step_tasks(env=None):
    """Number of tasks of the enclosing `srun` step, 0 outside a step.

    SLURM_STEP_NUM_TASKS exists only inside `srun`; the batch shell of `sbatch -n 2` has
    SLURM_NTASKS=2 but is a single process, so it must not count as two workers.
    """
    env = os.environ if env is None else env
    return int(env.get("SLURM_STEP_NUM_TASKS", 0) or 0)


def tf_config_tasks(env=None):
    """Number of chief+worker tasks in $TF_CONFIG, 0 when unset."""
    env = os.environ if env is None else env
    if not env.get("TF_CONFIG"):
        return 0
    try:
        cluster = json.loads(env["TF_CONFIG"]).get("cluster", {})
    except json.JSONDecodeError as err:
        raise ValueError(f"TF_CONFIG is not valid JSON: {err}") from err
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


def visible_gpus(num_gpus_hint=None):
    """GPUs this process will use: the first `num_gpus_hint` of those TF sees, else all.

    Asks TF itself (it honours CUDA_VISIBLE_DEVICES, which SLURM sets per task);
    list_physical_devices does not start the TF runtime, so a strategy can still follow.
    """
    gpus = tf.config.list_physical_devices("GPU")
    if num_gpus_hint is not None:
        if num_gpus_hint > len(gpus):
            raise ValueError(f"num_gpus_hint={num_gpus_hint} but TF sees {len(gpus)} GPU(s)")
        gpus = gpus[:num_gpus_hint]
    return gpus


def tasks_on_this_node(env=None):
    """Tasks of the enclosing `srun` step on this node (0 outside a step), from the step's
    nodelist and tasks-per-node, so `--ntasks-per-node` and uneven `-n` layouts both count."""
    env = os.environ if env is None else env
    if not env.get("SLURM_STEP_TASKS_PER_NODE"):
        return 0
    per_node = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
    hosts = expand_hostlist(env["SLURM_STEP_NODELIST"]) if env.get("SLURM_STEP_NODELIST") else []
    node = env.get("SLURMD_NODENAME")
    if node in hosts and len(hosts) == len(per_node):
        return per_node[hosts.index(node)]
    return per_node[int(env.get("SLURM_NODEID", 0) or 0)] if per_node else 0


def task_gpu_indices(env, n_visible):
    """Which of the `n_visible` GPUs this SLURM task should use: None = all it sees.

    `--gres=gpu:4 --ntasks-per-node=4` without `--gpus-per-task`/`--gpu-bind` gives every task
    all 4 GPUs: each would build a MirroredStrategy over all of them, 4 processes on each GPU.
    With several tasks on the node and more than one GPU each, task SLURM_LOCALID takes its
    own equal share of the visible list (SLURM lists the same GPUs, in the same order, to every
    task of a node). A count that does not split evenly is refused.
    """
    local_tasks = tasks_on_this_node(env)
    if local_tasks <= 1 or n_visible <= 1:
        return None
    if n_visible % local_tasks:
        raise ValueError(
            f"{local_tasks} SLURM tasks on this node each see {n_visible} GPUs, which do not split "
            f"evenly between them: submit with --gpus-per-task=1 (or --gpu-bind=single:1), or "
            f"with --ntasks-per-node equal to the GPUs per node")
    share = n_visible // local_tasks
    first = int(env["SLURM_LOCALID"]) * share
    return list(range(first, first + share))


def pin_task_gpus(gpus, env=None):
    """Make only this task's GPUs visible to TF (task_gpu_indices); returns the GPUs it keeps.
    Must run before the TF runtime starts, as make_strategy does first."""
    env = os.environ if env is None else env
    indices = task_gpu_indices(env, len(gpus))
    if indices is None:
        return gpus
    kept = [gpus[i] for i in indices]
    tf.config.set_visible_devices(kept, "GPU")
    print(f"distribute: SLURM task {env.get('SLURM_LOCALID')} of {tasks_on_this_node(env)} on this node "
          f"sees {len(gpus)} GPUs; pinned to GPU(s) {indices}", flush=True)
    return kept


def collective_implementation(collective, n_gpus):
    """The all-reduce of MultiWorkerMirroredStrategy: "NCCL" or "RING".

    TF's default (AUTO) picks gRPC rings even between GPUs, which copy every gradient through host
    memory; NCCL moves them GPU to GPU (NVLink, InfiniBand). NCCL needs GPUs, rings work anywhere.
    """
    if collective not in COLLECTIVES:
        raise ValueError(f"train.collective={collective!r}: expected one of {COLLECTIVES}")
    if collective == "nccl" and not n_gpus:
        raise ValueError("train.collective=nccl needs GPUs, and this worker sees none: "
                         "use train.collective=auto or ring")
    if collective == "auto":
        return "NCCL" if n_gpus else "RING"
    return collective.upper()


def communication_options(implementation):
    return tf.distribute.experimental.CommunicationOptions(
        implementation=getattr(tf.distribute.experimental.CommunicationImplementation, implementation))


def slurm_cluster_resolver(gpus_per_task):
    """A cluster resolver for the current `srun` step whose task ids equal SLURM_PROCID.

    Built on tf.distribute.cluster_resolver.SlurmClusterResolver, minus its faults:
    - it calls nvidia-smi when no GPU count is given (FileNotFoundError on CPU nodes) and
      rejects gpus_per_node=0: we pass counts with auto_set_gpu=False (SLURM already set
      CUDA_VISIBLE_DEVICES per task) and report the true count through SimpleClusterResolver;
    - cluster_spec() pairs the tasks of a node with range(0, gpus_per_node, gpus_per_task) and
      silently drops tasks beyond the GPU count: we give it one "slot" per task and check that
      no task went missing;
    - it lists nodes sorted as strings (node10 before node9) yet gives rank r the r-th address,
      while SLURM's block distribution puts rank 0 on the first node of the step's nodelist:
      we reorder the addresses into SLURM's node order, and check this task's own rank.
    Reads os.environ (as the TF resolver does): call it inside the `srun` step.
    """
    env = os.environ
    hosts = expand_hostlist(env["SLURM_STEP_NODELIST"])
    tasks_per_host = expand_tasks_per_node(env["SLURM_STEP_TASKS_PER_NODE"])
    if len(hosts) != len(tasks_per_host):
        raise RuntimeError(f"SLURM_STEP_NODELIST has {len(hosts)} nodes but "
                           f"SLURM_STEP_TASKS_PER_NODE lists {len(tasks_per_host)}")
    num_tasks, procid = sum(tasks_per_host), int(env["SLURM_PROCID"])
    port = slurm_port(env)

    slots_per_task = max(gpus_per_task, 1)
    resolver = tf.distribute.cluster_resolver.SlurmClusterResolver(
        port_base=port, gpus_per_node=slots_per_task * max(tasks_per_host),
        gpus_per_task=slots_per_task, auto_set_gpu=False)
    addresses = resolver.cluster_spec().as_dict().get("worker", [])
    if len(addresses) != num_tasks:
        raise RuntimeError(f"SlurmClusterResolver listed {len(addresses)} of {num_tasks} tasks")

    # Block distribution: rank r lives on the node holding the r-th task when nodes are taken in
    # nodelist order, at port base + its local index on that node.
    by_host = {}
    for address in addresses:
        by_host.setdefault(address.rsplit(":", 1)[0], []).append(address)
    ordered = [address for host in hosts for address in by_host[host]]

    node, local_id = env.get("SLURMD_NODENAME"), env.get("SLURM_LOCALID")
    if node in hosts and local_id is not None:
        expected = sum(tasks_per_host[:hosts.index(node)]) + int(local_id)
        if expected != procid:
            raise RuntimeError(
                f"SLURM_PROCID={procid} on {node} (local task {local_id}) is not the block "
                f"layout's rank {expected}: run srun with --distribution=block (the default)")

    # Node names as SLURM knows them may resolve to the management network; a site suffix
    # (node7 -> node7-ib) points the workers at the fast one.
    suffix = env.get("SEMISEG_WORKER_HOST_SUFFIX", "")
    if suffix:
        ordered = [f"{host}{suffix}:{port_}" for host, port_ in (a.rsplit(":", 1) for a in ordered)]

    return tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec({"worker": ordered}), task_type="worker", task_id=procid,
        num_accelerators={"GPU": gpus_per_task}, rpc_layer="grpc")


def configure_logical_cpus(env=None):
    """Split the first CPU into $SEMISEG_LOGICAL_CPUS logical devices; returns the count (0: unset).

    TF accepts this only before its runtime starts, hence here, at the top of make_strategy.
    """
    env = os.environ if env is None else env
    text = env.get("SEMISEG_LOGICAL_CPUS", "").strip()
    if not text:
        return 0
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"SEMISEG_LOGICAL_CPUS={text!r}: expected a positive integer")
    count = int(text)
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as err:
        # Already initialised: fine if an earlier call configured the same split.
        if len(tf.config.list_logical_devices("CPU")) != count:
            raise RuntimeError(f"SEMISEG_LOGICAL_CPUS={count}: TF was initialised before "
                               f"make_strategy ({err})") from err
    return count


def make_strategy(distribution="auto", num_gpus_hint=None, collective="auto"):
    """Build the strategy named by `distribution` (see module docstring) and describe it.

    Returns (strategy, info); info is JSON-serialisable: strategy, distribution, source
    (slurm|tf_config|local), num_replicas, num_workers, task_type, task_index, is_chief,
    cluster ({job: [host:port]} or None), gpus_per_worker, collective (NCCL|RING for
    multi_worker, else None).
    """
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"train.distribution={distribution!r}: expected one of {DISTRIBUTIONS}")
    configure_logical_cpus()
    step_tasks, config_tasks = slurm_step_tasks(), tf_config_tasks()
    gpus = pin_task_gpus(visible_gpus(num_gpus_hint))

    if distribution == "auto":
        if step_tasks > 1 or config_tasks > 1:
            distribution = "multi_worker"
        elif len(gpus) > 1:
            distribution = "mirrored"
        else:
            distribution = "none"

    resolver, source, implementation = None, "local", None
    if distribution == "multi_worker":
        implementation = collective_implementation(collective, len(gpus))
    if distribution == "none":
        strategy = tf.distribute.get_strategy()
    elif distribution == "mirrored":
        # Without GPUs mirror over the logical CPUs (one unless configured, as the tests do).
        devices = ([f"/gpu:{i}" for i in range(len(gpus))] if gpus
                   else [d.name for d in tf.config.list_logical_devices("CPU")])
        strategy = tf.distribute.MirroredStrategy(devices=devices)
    elif step_tasks >= 1:
        source, resolver = "slurm", slurm_cluster_resolver(len(gpus))
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            cluster_resolver=resolver, communication_options=communication_options(implementation))
    else:
        # TF_CONFIG, or a lone local worker when it is unset.
        source = "tf_config" if config_tasks else "local"
        strategy = tf.distribute.MultiWorkerMirroredStrategy(
            communication_options=communication_options(implementation))
        resolver = strategy.cluster_resolver if config_tasks else None

    cluster, task_type, task_index = None, None, 0
    if resolver is not None:
        cluster = {job: list(tasks) for job, tasks in resolver.cluster_spec().as_dict().items()}
        task_type, task_index = resolver.task_type, int(resolver.task_id)
    info = {
        "strategy": STRATEGY_NAMES[distribution],
        "distribution": distribution,
        "source": source,
        "num_replicas": int(strategy.num_replicas_in_sync),
        "num_workers": sum(len(tasks) for tasks in cluster.values()) if cluster else 1,
        "task_type": task_type,
        "task_index": task_index,
        "is_chief": bool(strategy.extended.should_checkpoint),
        "cluster": cluster,
        "gpus_per_worker": len(gpus),
        "collective": implementation,
    }
    return strategy, info


def is_chief(info):
    """Whether this process writes the run folder (logs, config, exported models)."""
    return bool(info["is_chief"])


def worker_checkpoint_dir(run_dir, info):
    """Where this worker saves checkpoints.

    Under MultiWorkerMirroredStrategy every worker must take part in a save (the variables'
    values are gathered collectively), but only the chief's copy is kept: the chief writes
    RUN_DIR/checkpoints, the others a private temporary folder that
    `remove_worker_checkpoint_dir` deletes afterwards. All workers restore from the chief's
    folder (RUN_DIR on a file system they share).
    """
    if is_chief(info):
        return os.path.join(run_dir, "checkpoints")
    run_key = hashlib.sha1(os.path.abspath(run_dir).encode()).hexdigest()[:10]
    name = f"semiseg-ckpt-{run_key}-{info['task_type']}{info['task_index']}"
    return os.path.join(tempfile.gettempdir(), name, "checkpoints")


def remove_worker_checkpoint_dir(checkpoint_dir, info):
    """Delete a non-chief worker's temporary checkpoints; the chief's are never touched."""
    if not is_chief(info):
        shutil.rmtree(os.path.dirname(checkpoint_dir), ignore_errors=True)


@tf.function
def _sum_over_replicas(strategy, value):
    # tf.identity makes one copy per replica (a captured tensor alone is not a per-replica
    # value); inside a tf.function because collectives run eagerly cost extra round trips.
    per_replica = strategy.run(lambda: tf.identity(value))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, per_replica, axis=None)


def any_worker_true(strategy, flag):
    """All-reduce a Python bool: True on every worker when True on any (a SUM of 0/1 > 0).

    A preemption signal reaches the workers at different steps; calling this at a fixed step
    cadence (every worker must call it, at the same steps) makes all of them stop, and save
    collectively, at the same step.
    """
    return bool(_sum_over_replicas(strategy, tf.constant(1.0 if flag else 0.0)).numpy() > 0)


def wait_for_all_workers(strategy, info):
    """Return on every worker only once all of them have called it (an all-reduce); no-op alone.

    A preempted worker exits 75 right after its own share of the checkpoint; `srun
    --kill-on-bad-exit` then kills the whole step, the chief too, maybe while it still writes
    the checkpoint and run_info.json to the shared file system. The chief calls this after its
    last write, the others before exiting: no one exits before the chief's files are complete.
    """
    if info.get("num_workers", 1) > 1:
        any_worker_true(strategy, True)


@tf.function
def _replica_zero_value(strategy, value):
    def contribute():
        first = tf.equal(tf.distribute.get_replica_context().replica_id_in_sync_group, 0)
        return tf.where(first, value, tf.zeros_like(value))
    return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribute), axis=None)


def chief_int(strategy, value):
    """The chief's `value` (a non-negative integer), on every worker.

    For decisions that must not rest on each worker's own view of the file system (does a file
    exist, which checkpoint is newest): the chief decides, every worker follows, so all run the
    same collectives. Every worker must call it at the same point. An all-reduce in which only
    replica 0 counts: TF numbers the chief's replicas first. float64 holds integers exactly to 2**53.
    """
    return int(_replica_zero_value(strategy, tf.constant(float(value), tf.float64)).numpy())


def chief_float(strategy, value):
    """The chief's `value` (a float), on every worker; as `chief_int`, every worker must call it at
    the same point. For decisions each worker would otherwise take from its own view (its own
    validation score): all take the chief's, so all stop, and save, at the same step."""
    return float(_replica_zero_value(strategy, tf.constant(float(value), tf.float64)).numpy())


def check_all_reduce(strategy):
    """Sum replica_id+1 over all replicas; returns (sum, expected n(n+1)/2)."""
    @tf.function
    def replica_sum():
        def replica_value():
            ctx = tf.distribute.get_replica_context()
            return tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1.0
        return strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(replica_value), axis=None)
    n = strategy.num_replicas_in_sync
    return float(replica_sum().numpy()), n * (n + 1) / 2.0


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--distribution", default="auto", choices=DISTRIBUTIONS)
    parser.add_argument("--collective", default="auto", choices=COLLECTIVES)
    parser.add_argument("--check", action="store_true",
                        help="all-reduce a known value across replicas; exit 1 if wrong")
    args = parser.parse_args()
    strategy, info = make_strategy(args.distribution, collective=args.collective)
    print("strategy " + json.dumps(info, sort_keys=True), flush=True)
    if args.check:
        total, expected = check_all_reduce(strategy)
        print(f"all-reduce task={info['task_index']} workers={info['num_workers']} "
              f"replicas={info['num_replicas']} sum={total:g} expected={expected:g}", flush=True)
        if total != expected:
            raise SystemExit(1)


if __name__ == "__main__":
    main()
