"""One replica vs two mirrored replicas (two logical CPUs), for any method: the harness a method's
replica test calls, so that each test says only what it switches off and what it compares.

    results, single, mirrored = one_vs_two_replicas(tmp_path, "fixmatch", ["model.dropout=0"], steps=3)
    # results["none"/"mirrored"]: {"logs": [per-step logs], "replicas": n}; single/mirrored: every
    # network's weights (BN statistics and RNG states included, networks by name) then the method's state;
    # start_weights(tmp_path): the same before the first step

A subprocess: the logical CPUs must be configured before TensorFlow starts (SEMISEG_LOGICAL_CPUS).
Both runs train `steps` steps of the same global batch from the same seed; `setup` is Python run on
each built trainer before its first step (e.g. to scale an untrained head); `report`, a Python
expression evaluated on each trainer after its steps, lands in results[...]["report"] (e.g. a probe).
"""
from __future__ import annotations

import json
import sys

from test_equivalence import last_json_line, load_weights, python_env, run_processes

SCRIPT = """
import json, sys
import numpy as np
spec = json.loads(sys.argv[1])
from semiseg import config
from semiseg.training import distribute
cfg = config.resolve(spec["preset"], "", spec["overrides"] + ["train.steps_per_epoch=%d" % spec["steps"],
                     "train.epochs=1"], spec["method"])
results = {}
for distribution in ("none", "mirrored"):
    strategy, info = distribute.make_strategy(distribution)
    import keras, tensorflow as tf
    from semiseg.data import loader
    from semiseg.methods import get_method
    keras.utils.set_random_seed(cfg.seed)
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method(spec["method"])(cfg, bundle, strategy, info, log=lambda m: None)
    exec(spec["setup"], {"trainer": trainer, "tf": tf, "keras": keras, "np": np})
    weights = [w for name in sorted(trainer.models) for w in trainer.models[name].weights]
    weights += [v for _, v in sorted(trainer.state.items())]
    np.savez(spec["prefix"] + "-start-" + distribution + ".npz", *[keras.ops.convert_to_numpy(w) for w in weights])
    loop = trainer._make_loop(*trainer._iterators(0))
    logs = [{k: float(v) for k, v in loop(tf.constant(1)).items()} for _ in range(spec["steps"])]
    np.savez(spec["prefix"] + "-" + distribution + ".npz", *[keras.ops.convert_to_numpy(w) for w in weights])
    results[distribution] = {"logs": logs, "replicas": info["num_replicas"],
                             "report": eval(spec["report"], {"trainer": trainer}) if spec["report"] else None}
print(json.dumps(results))
"""


def one_vs_two_replicas(tmp_path, method: str, overrides: list, steps: int = 3, preset: str = "smoke",
                        setup: str = "", report: str = ""):
    prefix = str(tmp_path / "w")
    spec = {"method": method, "overrides": list(overrides), "steps": steps, "preset": preset, "setup": setup,
            "report": report, "prefix": prefix}
    ((rc, stdout, stderr),) = run_processes([([sys.executable, "-c", SCRIPT, json.dumps(spec)],
                                              python_env(SEMISEG_LOGICAL_CPUS="2"))])
    assert rc == 0, stderr[-3000:]
    results = last_json_line(stdout)
    assert (results["none"]["replicas"], results["mirrored"]["replicas"]) == (1, 2)
    single, mirrored = load_weights(f"{prefix}-none.npz"), load_weights(f"{prefix}-mirrored.npz")
    assert len(single) == len(mirrored) > 0
    for a, b in zip(load_weights(f"{prefix}-start-none.npz"), load_weights(f"{prefix}-start-mirrored.npz")):
        assert (a == b).all()           # the same starting point: what differs after is the steps
    return results, single, mirrored


def start_weights(tmp_path) -> list:
    """The weights (same order) before the first step of the last one_vs_two_replicas in tmp_path;
    both runs start from the same seed, and the harness checks they start equal."""
    return load_weights(str(tmp_path / "w-start-none.npz"))
