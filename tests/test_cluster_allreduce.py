"""Gradient clipping under tf.distribute: one all-reduce of the gradient per step, same weights.

    python -m pytest tests/test_cluster_allreduce.py -q

With `train.clip_norm > 0` the step all-reduces the gradient itself (clipping must see the global
gradient) and the optimizer applies it as given. Two things are checked on two replicas of
MirroredStrategy over two logical CPUs (its all-reduces are the same CollectiveReduceV2 ops
MultiWorkerMirroredStrategy runs between workers): the traced step all-reduces as many gradient
elements as the network has weights, once, not twice; and after STEPS clipped steps the weights
equal those of one replica on the same global batch.
"""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 3
CLIP = 0.05        # far below the smoke U-Net's gradient norm: every step is clipped

SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from semiseg import config
    from semiseg.training import distribute
    cfg = config.resolve("smoke", "", ["model.batchnorm=false", "model.dropout=0", "train.clip_norm=%(clip)s",
                                       # SGD: Adam would hide a wrongly scaled gradient
                                       "train.optimizer=sgd", "train.lr=0.5",
                                       "train.steps_per_epoch=%(steps)d", "train.epochs=1"], "supervised")
    out = {}
    for distribution in ("none", "mirrored"):
        strategy, info = distribute.make_strategy(distribution)
        import keras, tensorflow as tf
        import data_loader_tf2, train_ssl_tf2
        keras.utils.set_random_seed(cfg.seed)
        bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
        trainer = train_ssl_tf2.get_method("supervised")(cfg, bundle, strategy, info, log=lambda m: None)
        loop = trainer._make_loop(*trainer._iterators(0))
        graph = loop.get_concrete_function(tf.TensorSpec([], tf.int32)).graph
        sizes, seen = [], set()
        def walk(g):
            # The step is a tf.function inside the loop's: collect ops of every nested function graph.
            for op in g.get_operations():
                if op.type.startswith("Collective") or op.type.startswith("Nccl"):
                    sizes.append(int(op.inputs[0].shape.num_elements()))
            for name, fn in getattr(g, "_functions", {}).items():
                if name not in seen and getattr(fn, "graph", None) is not None:
                    seen.add(name)
                    walk(fn.graph)
        walk(graph)
        initial = [keras.ops.convert_to_numpy(w) for w in trainer.trainable_variables()]
        for _ in range(%(steps)d):
            loop(tf.constant(1))
        weights = [keras.ops.convert_to_numpy(w) for w in trainer.trainable_variables()]
        np.savez(sys.argv[1] + "-" + distribution + ".npz", *weights)
        out[distribution] = {"replicas": info["num_replicas"], "collective_sizes": sizes,
                             "n_weights": int(sum(w.size for w in weights)),
                             "moved": float(max(np.max(np.abs(a - b)) for a, b in zip(initial, weights)))}
    print(json.dumps(out))
""") % {"clip": CLIP, "steps": STEPS}


def load(path):
    with np.load(path) as npz:
        return [npz[f"arr_{i}"] for i in range(len(npz.files))]


def test_clipped_step_all_reduces_once_and_matches_one_replica(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_") and k != "TF_CONFIG"}
    env.update(SEMISEG_LOGICAL_CPUS="2", CUDA_VISIBLE_DEVICES="", TF_CPP_MIN_LOG_LEVEL="3", PYTHONPATH=REPO)
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "w")], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads([line for line in proc.stdout.splitlines() if line.startswith("{")][-1])
    mirrored = result["mirrored"]
    assert mirrored["replicas"] == 2 and result["none"]["replicas"] == 1
    n = mirrored["n_weights"]
    # Each replica all-reduces its gradient (packed into one op here) plus the Dice sums (3
    # numbers). Summing the gradient twice, as before, made this 2n + 3 per replica.
    per_replica = sum(mirrored["collective_sizes"]) / mirrored["replicas"]
    print(f"\nweights {n}; all-reduced elements per replica and step {per_replica:g}")
    assert n <= per_replica < n + 100, mirrored["collective_sizes"]
    # Clipped SGD steps move the weights, and by the same amounts on one and on two replicas.
    assert result["none"]["moved"] > 1e-3 and mirrored["moved"] > 1e-3
    single, two = load(tmp_path / "w-none.npz"), load(tmp_path / "w-mirrored.npz")
    for a, b in zip(single, two):
        np.testing.assert_allclose(b, a, atol=1e-5)
