"""One replica, two mirrored replicas and two workers train the same model identically (CPU).

    python -m pytest tests/test_equivalence.py -q

The same tiny U-Net (smoke preset, no BatchNorm, no dropout: Dropout draws the same mask on every
replica, so it cannot match one replica's draw over the whole batch) trains for STEPS steps on the
same global batch of 4 (a) as one replica, (b) as two replicas of MirroredStrategy over two
logical CPUs (SEMISEG_LOGICAL_CPUS=2) and (c) as two localhost workers of
MultiWorkerMirroredStrategy (TF_CONFIG). The per-step all-reduced losses and the final weights
must agree to float32 round-off: only the order of the sums differs. The strategies need the TF
runtime configured before it starts, so each configuration runs in a subprocess with a timeout.
"""
import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SUBPROCESS_TIMEOUT_S = 300
STEPS = 4          # 16 records: more than a pass over the 9 labelled slices (labeled_fraction 0.27)
# float32 sums in another order: measured here 8.5e-8 (relative, losses) and 3e-8 (weights).
LOSS_RTOL, WEIGHT_ATOL = 1e-5, 1e-5

# Trains STEPS steps under each distribution named in argv[2:], writes losses + weights to argv[1].
TRAIN_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from semiseg import config
    from semiseg.training import distribute
    cfg = config.resolve("smoke", "", ["model.batchnorm=false", "model.dropout=0", "%(fraction)s",
                                       "train.steps_per_epoch=%(steps)d", "train.epochs=1"],
                         "supervised")
    results = {}
    for distribution in sys.argv[2:]:
        strategy, info = distribute.make_strategy(distribution)
        import keras, tensorflow as tf
        from semiseg.data import loader as data_loader_tf2
        from semiseg.methods import get_method
        keras.utils.set_random_seed(cfg.seed)      # the same initial weights in every run
        bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
        trainer = get_method("supervised")(cfg, bundle, strategy, info, log=lambda m: None)
        loop = trainer._make_loop(*trainer._iterators(0))
        losses = [float(loop(tf.constant(1))["loss"]) for _ in range(%(steps)d)]
        weights = [keras.ops.convert_to_numpy(w) for w in trainer.trainable_variables()]
        np.savez(f"{sys.argv[1]}-{distribution}-{info['task_index']}.npz", *weights)
        results[distribution] = {"losses": losses, "replicas": info["num_replicas"],
                                 "workers": info["num_workers"], "per_replica_batch": trainer.per_replica_batch,
                                 "n_labeled_slices": bundle.n_slices("labeled")}
    print(json.dumps(results))
""") % {"steps": STEPS, "fraction": "data.labeled_fraction=0.27"}


def python_env(**extra):
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("SLURM_") and k not in ("TF_CONFIG", "SEMISEG_PORT", "SEMISEG_LOGICAL_CPUS")}
    env.update(TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", PYTHONPATH=REPO, **extra)
    return env


def free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("localhost", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def last_json_line(stdout):
    lines = [line for line in stdout.splitlines() if line.startswith("{")]
    assert lines, f"no JSON result in output:\n{stdout[-3000:]}"
    return json.loads(lines[-1])


def run_result_script(script, cwd, **env):
    """Run `script` with `python -c` (env as python_env plus `env`); its 'RESULT{json}' line, parsed."""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=cwd,
                          env=python_env(**env), timeout=SUBPROCESS_TIMEOUT_S)
    line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")]
    assert proc.returncode == 0 and line, proc.stderr[-3000:]
    return json.loads(line[0][len("RESULT"):])


def run_processes(commands_envs, timeout_s=SUBPROCESS_TIMEOUT_S):
    """Start all, wait for all (timeout), kill leftovers; returns [(rc, stdout, stderr)]."""
    procs = [subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for cmd, env in commands_envs]
    outputs = []
    try:
        for proc in procs:
            stdout, stderr = proc.communicate(timeout=timeout_s)
            outputs.append((proc.returncode, stdout, stderr))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return outputs


def load_weights(path):
    with np.load(path) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("equivalence")
    prefix = str(out / "w")
    # (a) and (b) in one process (the default strategy uses one of the two logical CPUs); it also
    # builds the shared slice cache before the two workers read it.
    ((rc, stdout, stderr),) = run_processes([(
        [sys.executable, "-c", TRAIN_SCRIPT, prefix, "none", "mirrored"],
        python_env(SEMISEG_LOGICAL_CPUS="2"))])
    assert rc == 0, stderr[-3000:]
    results = last_json_line(stdout)
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    workers = run_processes([(
        [sys.executable, "-c", TRAIN_SCRIPT, prefix, "multi_worker"],
        python_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(2)])
    for rc, _, stderr in workers:
        assert rc == 0, stderr[-3000:]
    results["multi_worker"] = [last_json_line(stdout)["multi_worker"] for _, stdout, _ in workers]
    return results, prefix


def test_setups_are_what_they_claim(runs):
    results, _ = runs
    assert (results["none"]["replicas"], results["none"]["per_replica_batch"]) == (1, 4)
    assert (results["mirrored"]["replicas"], results["mirrored"]["workers"]) == (2, 1)
    assert results["mirrored"]["per_replica_batch"] == 2
    for worker in results["multi_worker"]:
        assert (worker["replicas"], worker["workers"], worker["per_replica_batch"]) == (2, 2, 2)
    # The steps cross a pass boundary of the labelled stream (where per-pass sharding went wrong).
    assert STEPS * 4 > results["none"]["n_labeled_slices"]


def test_step_losses_agree(runs):
    results, _ = runs
    single = results["none"]["losses"]
    assert len(single) == STEPS and len(set(single)) == STEPS      # training moves the loss
    others = [results["mirrored"]["losses"]] + [w["losses"] for w in results["multi_worker"]]
    print(f"\nsingle-replica losses {single}; max relative difference of mirrored/workers "
          f"{max(float(np.max(np.abs(np.subtract(o, single)) / np.abs(single))) for o in others):.2e}")
    np.testing.assert_allclose(results["mirrored"]["losses"], single, rtol=LOSS_RTOL)
    for worker in results["multi_worker"]:
        # Both workers report the same all-reduced loss, equal to one replica's loss.
        np.testing.assert_allclose(worker["losses"], single, rtol=LOSS_RTOL)


def test_final_weights_agree(runs):
    _, prefix = runs
    single = load_weights(f"{prefix}-none-0.npz")
    for name in ("mirrored-0", "multi_worker-0", "multi_worker-1"):
        other = load_weights(f"{prefix}-{name}.npz")
        assert len(other) == len(single)
        print(f"\n{name}: max |weight difference| "
              f"{max(float(np.max(np.abs(a - b))) for a, b in zip(single, other)):.2e}")
        for a, b in zip(single, other):
            np.testing.assert_allclose(b, a, atol=WEIGHT_ATOL, err_msg=name)


def test_two_pipelines_split_the_global_batches():
    """Data only: each global step holds the same augmented images for one or two input
    pipelines, across pass boundaries and when starting mid-stream (resume)."""
    import tensorflow as tf
    from semiseg.data import augment
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    cfg = config.resolve("smoke", "", ["data.labeled_fraction=0.27"])
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    total, steps = bundle.n_slices("labeled"), 6
    assert total % 2 and steps * 4 > 2 * total    # passes split evenly neither into batches nor pipelines

    def batches(context, start, per_replica, n):
        ds = bundle.train_dataset("labeled", per_replica, context, start, augment.weak_augment)
        return [images.numpy() for images, _ in ds.take(n)]

    def as_set(images):
        return sorted(image.tobytes() for image in images)

    single = batches(None, 0, 4, steps)
    for start in (0, 3):
        pipes = [batches(tf.distribute.InputContext(2, p, 2), start, 2, steps - start) for p in range(2)]
        for s in range(steps - start):
            both = np.concatenate([pipes[0][s], pipes[1][s]])
            assert as_set(both) == as_set(single[start + s]), f"start {start}, step {start + s}"
