"""Multi-class training on two mirrored replicas equals one replica (CPU): the per-class Dice sums
are all-reduced before the ratio, the CE is a global-batch mean.

    python -m pytest tests/test_multiclass_replicas.py -q

The smoke_multiclass U-Net (C = 3, no BatchNorm, no dropout: as tests/test_equivalence.py, whose
helpers this uses) trains STEPS steps on the same global batch of 4 as one replica and as two
replicas of MirroredStrategy over two logical CPUs; losses and weights must agree to round-off.
"""
import sys

import numpy as np

from test_equivalence import LOSS_RTOL, WEIGHT_ATOL, last_json_line, load_weights, python_env, run_processes

STEPS = 3
SCRIPT = """
import json, sys
import numpy as np
from semiseg import config
from semiseg.training import distribute
cfg = config.resolve("smoke_multiclass", "", ["model.batchnorm=false", "model.dropout=0",
                     "train.steps_per_epoch=%(steps)d", "train.epochs=1"], "supervised")
results = {}
for distribution in sys.argv[2:]:
    strategy, info = distribute.make_strategy(distribution)
    import keras, tensorflow as tf
    from semiseg.data import loader
    from semiseg.methods import get_method
    keras.utils.set_random_seed(cfg.seed)
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("supervised")(cfg, bundle, strategy, info, log=lambda m: None)
    loop = trainer._make_loop(*trainer._iterators(0))
    logs = [{k: float(v) for k, v in loop(tf.constant(1)).items()} for _ in range(%(steps)d)]
    np.savez(f"{sys.argv[1]}-{distribution}.npz", *[keras.ops.convert_to_numpy(w) for w in trainer.trainable_variables()])
    results[distribution] = {"logs": logs, "replicas": info["num_replicas"],
                             "out_channels": int(trainer.models["student"].output_shape[-1])}
print(json.dumps(results))
""" % {"steps": STEPS}


def test_multiclass_one_replica_equals_two(tmp_path):
    prefix = str(tmp_path / "w")
    ((rc, stdout, stderr),) = run_processes([([sys.executable, "-c", SCRIPT, prefix, "none", "mirrored"],
                                              python_env(SEMISEG_LOGICAL_CPUS="2"))])
    assert rc == 0, stderr[-3000:]
    results = last_json_line(stdout)
    assert (results["none"]["replicas"], results["mirrored"]["replicas"]) == (1, 2)
    assert results["none"]["out_channels"] == 3
    for key in ("loss", "loss_dice", "loss_sup_ce"):
        single = [log[key] for log in results["none"]["logs"]]
        assert len(set(single)) == STEPS                                    # training moves it
        np.testing.assert_allclose([log[key] for log in results["mirrored"]["logs"]], single, rtol=LOSS_RTOL)
    for a, b in zip(load_weights(f"{prefix}-none.npz"), load_weights(f"{prefix}-mirrored.npz")):
        np.testing.assert_allclose(b, a, atol=WEIGHT_ATOL)
