"""semiseg.training.fused_optimizers: one TF kernel per variable, Keras' update otherwise.

    python -m pytest tests/test_fused_optimizers.py -q

The fused optimizers must (1) really run the fused kernel (else the comparisons below compare Keras
with itself), (2) give Keras' values: Adam/AdamW to float32 rounding, SGD's momentum exactly,
(3) share Keras' variables, so a checkpoint of one restores into the other, (4) do the same under
two mirrored replicas, and (5) be what train.fused_update picks.
"""
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from semiseg.training.fused_optimizers import FusedAdam, FusedAdamW, FusedSGD
from test_equivalence import REPO, run_result_script

CASES = [  # (Keras class, fused class, kwargs, the kernel that must appear, exact?)
    (keras.optimizers.Adam, FusedAdam, {"learning_rate": 1e-2}, "ResourceApplyAdam", False),
    (keras.optimizers.AdamW, FusedAdamW, {"learning_rate": 1e-2, "weight_decay": 0.05}, "ResourceApplyAdam", False),
    (keras.optimizers.SGD, FusedSGD, {"learning_rate": 0.05, "momentum": 0.9}, "ResourceApplyKerasMomentum", True),
    (keras.optimizers.SGD, FusedSGD, {"learning_rate": 0.05, "momentum": 0.9, "nesterov": True},
     "ResourceApplyKerasMomentum", True),
]
SHAPES = [(3, 3, 2, 4), (4,), (5, 7)]


def _weights():
    rng = np.random.default_rng(0)
    return [keras.Variable(rng.normal(size=shape).astype("float32")) for shape in SHAPES]


def _train(opt, weights, steps, first=0):
    """`steps` updates with gradients that depend on the weights and the step (so a wrong m, v or
    bias correction shows); returns the traced step's op types."""
    @tf.function
    def step(i):
        grads = [tf.sin(1.3 * w + tf.cast(i, tf.float32)) + 0.1 * tf.cast(i, tf.float32) for w in weights]
        opt.apply_gradients(zip(grads, weights))
    for i in range(first, first + steps):
        step(tf.constant(i))
    graph = step.get_concrete_function(tf.constant(0)).graph
    ops = {op.type for op in graph.get_operations()}
    for func in graph._functions.values():      # apply_gradients' merge_call may nest functions
        ops |= {node.op for node in func.definition.node_def}
    return ops


def _values(weights):
    return [w.numpy() for w in weights]


@pytest.mark.parametrize("keras_cls, fused_cls, kwargs, kernel, exact", CASES,
                         ids=["adam", "adamw", "sgd_momentum", "sgd_nesterov"])
def test_fused_matches_keras_and_uses_the_kernel(keras_cls, fused_cls, kwargs, kernel, exact):
    reference, fused = _weights(), _weights()
    ref_ops = _train(keras_cls(**kwargs), reference, 25)
    fused_ops = _train(fused_cls(**kwargs), fused, 25)
    assert kernel in fused_ops and kernel not in ref_ops
    moved = max(float(np.abs(a - b).max()) for a, b in zip(_values(reference), _values(_weights())))
    assert moved > 0.05                             # the weights really trained
    for a, b in zip(_values(reference), _values(fused)):
        if exact:
            np.testing.assert_array_equal(a, b)
        else:
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)   # rounding; a wrong term moves them by ~lr = 1e-2


def test_amsgrad_falls_back_to_keras():
    reference, fused = _weights(), _weights()
    _train(keras.optimizers.Adam(learning_rate=1e-2, amsgrad=True), reference, 5)
    ops = _train(FusedAdam(learning_rate=1e-2, amsgrad=True), fused, 5)
    assert "ResourceApplyAdam" not in ops
    for a, b in zip(_values(reference), _values(fused)):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("direction", ["keras_to_fused", "fused_to_keras"])
def test_checkpoints_cross_between_keras_and_fused(tmp_path, direction):
    """Same variables, same checkpoint keys: 5 steps with one class, save, restore into the other,
    5 more steps == 10 steps with Keras alone."""
    first, second = (keras.optimizers.Adam, FusedAdam) if direction == "keras_to_fused" else \
        (FusedAdam, keras.optimizers.Adam)
    reference = _weights()
    _train(keras.optimizers.Adam(learning_rate=1e-2), reference, 10)

    weights = _weights()
    opt = first(learning_rate=1e-2)
    _train(opt, weights, 5)
    path = tf.train.Checkpoint(optimizer=opt, weights=weights).save(str(tmp_path / "ckpt"))
    restored_weights = [keras.Variable(np.zeros(shape, "float32")) for shape in SHAPES]
    restored_opt = second(learning_rate=1e-2)
    restored_opt.build(restored_weights)
    tf.train.Checkpoint(optimizer=restored_opt, weights=restored_weights).restore(path).assert_consumed()
    assert int(restored_opt.iterations.numpy()) == 5
    _train(restored_opt, restored_weights, 5, first=5)
    for a, b in zip(_values(reference), _values(restored_weights)):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)   # rounding; a wrong term moves them by ~lr = 1e-2


TWO_REPLICAS = textwrap.dedent("""
    import json
    import numpy as np
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy("mirrored")
    import keras, tensorflow as tf
    from semiseg.training.fused_optimizers import FusedAdam, FusedSGD
    out = {"replicas": strategy.num_replicas_in_sync}

    def train(cls, **kwargs):
        with strategy.scope():
            weights = [keras.Variable(np.linspace(-1, 1, 12, dtype="float32").reshape(3, 4))]
            opt = cls(**kwargs)
            opt.build(weights)

        @tf.function
        def step(i):
            def replica():
                rid = tf.cast(tf.distribute.get_replica_context().replica_id_in_sync_group, tf.float32)
                grads = [tf.sin(weights[0] * (1.0 + rid) + tf.cast(i, tf.float32))]   # differ per replica
                grads = tf.distribute.get_replica_context().all_reduce("sum", grads)
                opt.apply_gradients(zip(grads, weights))
            strategy.run(replica)
        for i in range(8):
            step(tf.constant(i))
        copies = [v.numpy() for v in weights[0].value.values]
        return copies

    for name, keras_cls, fused_cls, kwargs in [
            ("adam", keras.optimizers.Adam, FusedAdam, {"learning_rate": 1e-2}),
            ("sgd", keras.optimizers.SGD, FusedSGD, {"learning_rate": 0.05, "momentum": 0.9})]:
        ref, fused = train(keras_cls, **kwargs), train(fused_cls, **kwargs)
        out[name] = {"replica_gap": float(np.abs(fused[0] - fused[1]).max()),
                     "vs_keras": float(np.abs(fused[0] - ref[0]).max()),
                     "moved": float(np.abs(ref[0] - np.linspace(-1, 1, 12).reshape(3, 4)).max())}
    print("RESULT" + json.dumps(out))
""")


def test_two_mirrored_replicas_update_their_own_copies_like_keras():
    out = run_result_script(TWO_REPLICAS, REPO, SEMISEG_LOGICAL_CPUS="2")
    assert out["replicas"] == 2
    for name in ("adam", "sgd"):
        assert out[name]["moved"] > 0.02            # 8 steps of lr 1e-2 (Adam) or 0.05 (SGD)
        assert out[name]["replica_gap"] == 0.0      # each replica's kernel updated its own copy alike
        assert out[name]["vs_keras"] <= 1e-5


@pytest.mark.parametrize("sets, expected", [
    ([], FusedAdam), (["train.weight_decay=0.01"], FusedAdamW), (["train.optimizer=sgd"], FusedSGD),
    (["train.fused_update=false"], keras.optimizers.Adam),
    (["train.optimizer=sgd", "train.fused_update=false"], keras.optimizers.SGD)])
def test_the_trainer_builds_what_train_fused_update_says(sets, expected):
    from semiseg import config
    from semiseg.data import loader
    from semiseg.methods import get_method
    cfg = config.resolve("smoke", "", sets, "supervised")
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("supervised")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    assert type(trainer.optimizer) is expected
