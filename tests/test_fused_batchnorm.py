"""FusedBatchNormalization (TF's fused kernel) is Keras BatchNormalization, numerically and on disk.

    python -m pytest tests/test_fused_batchnorm.py -q

Forward outputs, gradients (input, gamma, beta), moving statistics after several training calls
and inference outputs equal Keras BN's within float32 round-off, in float32 and mixed_bfloat16;
weights restore across the two classes (.weights.h5, tf.train.Checkpoint) and a .keras file of a
fused network loads as one.
"""
import numpy as np
import pytest
import tensorflow as tf
import keras

from semiseg.models import fused_batchnorm
from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.fused_batchnorm import FusedBatchNormalization


@pytest.fixture
def policy(request):
    keras.mixed_precision.set_global_policy(request.param)
    yield request.param
    keras.mixed_precision.set_global_policy("float32")


def _pair(momentum=0.9, **kwargs):
    """A Keras BN and a fused BN with the same random (non-trivial) weights, built for 5 channels."""
    keras_bn = keras.layers.BatchNormalization(momentum=momentum, **kwargs)
    fused = FusedBatchNormalization(momentum=momentum, **kwargs)
    for layer in (keras_bn, fused):
        layer.build((None, 6, 6, 5))
    rng = np.random.default_rng(1)
    weights = [rng.uniform(0.5, 1.5, 5).astype("float32"), rng.normal(size=5).astype("float32"),
               rng.normal(size=5).astype("float32"), rng.uniform(0.5, 2.0, 5).astype("float32")]
    keras_bn.set_weights(weights)
    fused.set_weights(weights)
    return keras_bn, fused


def _batches(n=4):
    rng = np.random.default_rng(0)
    return [(rng.normal(size=(3, 6, 6, 5)) * rng.uniform(0.5, 4, 5) + rng.normal(size=5) * 3).astype("float32")
            for _ in range(n)]


def _run(layer, x):
    """Output, gradients wrt (input, gamma, beta) of one training call, as float64 arrays."""
    xt = tf.constant(x)
    with tf.GradientTape() as tape:
        tape.watch(xt)
        y = tf.cast(layer(xt, training=True), tf.float64)
        # A loss whose gradient is not constant per channel (sum(y) has zero dx under BN).
        loss = tf.reduce_sum(y ** 2 * tf.range(1.0, 6.0, dtype=tf.float64))
    return [y.numpy()] + [tf.cast(g, tf.float64).numpy() for g in tape.gradient(loss, [xt, layer.gamma, layer.beta])]


def _dx_terms(layer, x, y):
    """The largest of the terms whose difference is BN's input gradient, dx = gamma / sigma *
    (dy - mean(dy) - x^ mean(dy x^)): |dy| gamma / sigma, with dy = 2 c y from _run's loss. For that
    loss the terms cancel almost exactly (dx is ~1e-4 of them), so float32 round-off in dx is a
    fraction of an ulp of the terms, not of dx, and the kernels' summation order decides it."""
    sigma = np.sqrt(x.astype("float64").var(axis=(0, 1, 2)) + layer.epsilon)
    dy = 2 * np.abs(y) * np.arange(1.0, 6.0)
    return float((dy * np.abs(layer.gamma.numpy()) / sigma).max())


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
def test_training_calls_match_keras_outputs_gradients_and_moving_statistics(policy):
    """Both layers against a float64 Keras BN (the exact answer): the fused layer is as close as Keras
    BN in float32 / bfloat16 up to round-off: 2x Keras' error + 1e-6 (8 float32 ulps) of the scale,
    the result's own or, for the input gradient, that of the terms it is the difference of (the
    fused kernel sums them in another order, and on some CPUs lands 2-3x farther than Keras; a wrong
    term would be off by the terms' size, 1e5 times more)."""
    keras_bn, fused = _pair()
    exact = keras.layers.BatchNormalization(momentum=0.9, dtype="float64")
    exact.build((None, 6, 6, 5))
    exact.set_weights([w.astype("float64") for w in keras_bn.get_weights()])
    for x in _batches():
        if policy == "mixed_bfloat16":      # both layers see the input rounded to bfloat16
            x = tf.cast(tf.cast(x, tf.bfloat16), tf.float32).numpy()
        want = _run(exact, x.astype("float64"))
        got_keras, got_fused = _run(keras_bn, x), _run(fused, x)
        scales = [np.abs(w).max() for w in want]
        scales[1] = max(scales[1], _dx_terms(exact, x, want[0]))
        for k, f, w, scale, what in zip(got_keras, got_fused, want, scales, ("output", "input gradient",
                                                                              "gamma gradient", "beta gradient")):
            err_keras, err_fused = np.abs(k - w).max(), np.abs(f - w).max()
            assert err_fused <= 2 * err_keras + 1e-6 * scale, (what, err_fused, err_keras, scale)
    # Moving statistics after 4 training calls: Keras' biased variance and momentum form.
    for name in ("moving_mean", "moving_variance"):
        np.testing.assert_allclose(getattr(fused, name).numpy(), getattr(keras_bn, name).numpy(),
                                   rtol=1e-5, atol=1e-6, err_msg=name)
    tol = {"float32": 1e-5, "mixed_bfloat16": 3e-2}[policy]     # bfloat16 output: 8 mantissa bits
    x = _batches(1)[0]
    for training in (False, None):
        np.testing.assert_allclose(tf.cast(fused(x, training=training), tf.float32).numpy(),
                                   tf.cast(keras_bn(x, training=training), tf.float32).numpy(), atol=tol, rtol=tol)


def test_moving_variance_is_the_biased_batch_variance():
    """One call with momentum 0: moving statistics = the batch's mean and biased variance (the fused op
    itself returns the unbiased one)."""
    fused = FusedBatchNormalization(momentum=0.0)
    x = _batches(1)[0]
    fused(x, training=True)
    np.testing.assert_allclose(fused.moving_mean.numpy(), x.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(fused.moving_variance.numpy(), x.var(axis=(0, 1, 2)), rtol=1e-5)


def test_frozen_bn_statistics_and_non_trainable_layer():
    keras_bn, fused = _pair()
    before = [w.numpy().copy() for w in fused.weights]
    model = keras.Sequential([keras.Input((6, 6, 5)), fused])
    x = _batches(1)[0]
    with frozen_bn_statistics(model) as frozen:
        assert frozen.layers == [fused]
        y = model(x, training=True)     # batch statistics, moving ones kept
    for w, b in zip(fused.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)
    with frozen_bn_statistics(keras.Sequential([keras.Input((6, 6, 5)), keras_bn])):
        np.testing.assert_allclose(y.numpy(), keras_bn(x, training=True).numpy(), atol=1e-5)
    assert fused.momentum == 0.9
    fused.trainable = False             # Keras: a frozen BN normalises with its moving statistics
    keras_bn.trainable = False
    np.testing.assert_allclose(fused(x, training=True).numpy(), keras_bn(x, training=True).numpy(), atol=1e-5)
    for w, b in zip(fused.weights, before):
        np.testing.assert_array_equal(w.numpy(), b)


@pytest.mark.parametrize("kwargs,shape", [({"axis": 1}, (3, 5, 6, 6)), ({}, (7, 5)), ({"center": False, "scale": False}, (3, 6, 6, 5)),
                                          ({"epsilon": 1e-6}, (3, 6, 6, 5))])
def test_other_cases_equal_keras(kwargs, shape):
    """Other ranks/axes fall back to Keras' call; center/scale off stay fused with 0/1."""
    keras_bn = keras.layers.BatchNormalization(momentum=0.5, **kwargs)
    fused = FusedBatchNormalization(momentum=0.5, **kwargs)
    x = np.random.default_rng(2).normal(2.0, 3.0, size=shape).astype("float32")
    for _ in range(2):
        np.testing.assert_allclose(fused(x, training=True).numpy(), keras_bn(x, training=True).numpy(), atol=1e-5)
    np.testing.assert_allclose(fused(x).numpy(), keras_bn(x).numpy(), atol=1e-5)
    np.testing.assert_allclose(fused.moving_variance.numpy(), keras_bn.moving_variance.numpy(), rtol=1e-5)


def _net(bn_class):
    inputs = keras.Input((8, 8, 2))
    x = keras.layers.Conv2D(4, 3, padding="same", use_bias=False, name="conv")(inputs)
    x = bn_class(momentum=0.8, name="bn")(x)
    return keras.Model(inputs, keras.layers.ReLU()(x))


def _trained(model):
    x = np.random.default_rng(3).normal(size=(2, 8, 8, 2)).astype("float32")
    for _ in range(3):
        model(x, training=True)
    return x


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
def test_keras_file_round_trip(tmp_path, policy):
    model = _net(FusedBatchNormalization)
    x = _trained(model)
    model.save(tmp_path / "fused.keras")
    loaded = keras.saving.load_model(tmp_path / "fused.keras", compile=False)
    assert type(loaded.get_layer("bn")) is FusedBatchNormalization
    assert loaded.get_layer("bn").get_config() == model.get_layer("bn").get_config()
    assert loaded.get_layer("bn").dtype_policy.name == policy
    for training in (False, True):
        np.testing.assert_allclose(np.float32(loaded(x, training=training)), np.float32(model(x, training=training)),
                                   atol=1e-6)


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16"], indirect=True)
@pytest.mark.parametrize("src,dst", [(keras.layers.BatchNormalization, FusedBatchNormalization),
                                     (FusedBatchNormalization, keras.layers.BatchNormalization)])
def test_weights_and_checkpoints_restore_across_classes(tmp_path, src, dst, policy):
    a = _net(src)
    x = _trained(a)
    a.save_weights(tmp_path / "w.weights.h5")
    tf.train.Checkpoint(model=a).write(str(tmp_path / "ckpt"))
    via_h5, via_ckpt = _net(dst), _net(dst)
    via_h5.load_weights(tmp_path / "w.weights.h5")
    tf.train.Checkpoint(model=via_ckpt).read(str(tmp_path / "ckpt")).assert_consumed()
    for b in (via_h5, via_ckpt):
        for wa, wb in zip(a.weights, b.weights):
            np.testing.assert_array_equal(wa.numpy(), wb.numpy())
        # Inference outputs of the two classes: float32 round-off, or bfloat16's 8 mantissa bits.
        tol = 1e-5 if policy == "float32" else 3e-2
        np.testing.assert_allclose(np.float32(b(x)), np.float32(a(x)), atol=tol, rtol=tol)


def test_unet_builds_fused_bn_and_the_ablation_builds_keras_bn():
    from semiseg import config
    from semiseg.models.unet import build_model
    cfg = config.ModelConfig(depth=1, base_filters=4, batchnorm=True)
    bns = [layer for layer in build_model(cfg, 16, 1).layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(type(layer) is FusedBatchNormalization for layer in bns)
    with fused_batchnorm.keras_batchnorm():
        bns = [layer for layer in build_model(cfg, 16, 1).layers
               if isinstance(layer, keras.layers.BatchNormalization)]
    assert bns and all(type(layer) is keras.layers.BatchNormalization for layer in bns)


MIRRORED_FREEZE = """
import json
import numpy as np
from semiseg.training import distribute
strategy, info = distribute.make_strategy("mirrored")
import tensorflow as tf, keras
from semiseg.models.batchnorm import frozen_bn_statistics
from semiseg.models.fused_batchnorm import FusedBatchNormalization
x = tf.constant(np.random.default_rng(0).normal(3.0, 1.0, (4, 4, 4, 2)).astype("float32"))
out = {"replicas": strategy.num_replicas_in_sync}
for name, with_block in (("reference", False), ("frozen_block", True)):
    with strategy.scope():
        inp = keras.Input((4, 4, 2))
        model = keras.Model(inp, FusedBatchNormalization(momentum=0.5)(inp))

    @tf.function
    def run(x):
        def step(x):
            total = tf.constant(0.0)
            if with_block:
                with frozen_bn_statistics(model):
                    y = model(x, training=True)
                    # a cross-replica point inside the block: the replicas' threads take turns here
                    total += tf.distribute.get_replica_context().all_reduce("sum", tf.reduce_sum(y))
            return total + tf.reduce_sum(model(x, training=True))      # an ordinary forward
        return strategy.run(step, args=(x,))

    run(strategy.experimental_distribute_values_from_function(lambda ctx: x[2 * ctx.replica_id_in_sync_group:][:2]))
    bn = model.layers[-1]
    out[name] = {"momentum": bn.momentum, "mean": keras.ops.convert_to_numpy(bn.moving_mean).tolist(),
                 "variance": keras.ops.convert_to_numpy(bn.moving_variance).tolist()}
print("RESULT" + json.dumps(out))
"""


def test_frozen_block_under_mirrored_replicas_freezes_only_its_own_calls(tmp_path):
    """Two replicas trace their steps in two threads that take turns at cross-replica points. The
    block must not leak into the other replica's ordinary forward, nor leave the momentum at 1 (the
    old attribute-setting version ended with momentum 1.0: the statistics frozen for good)."""
    from test_equivalence import run_result_script
    out = run_result_script(MIRRORED_FREEZE, tmp_path, SEMISEG_LOGICAL_CPUS="2")
    assert out["replicas"] == 2
    assert out["frozen_block"]["momentum"] == 0.5
    ref, got = out["reference"], out["frozen_block"]
    assert ref["mean"] != [0.0, 0.0]          # the ordinary forward moved the statistics
    np.testing.assert_allclose(got["mean"], ref["mean"], rtol=1e-6)
    np.testing.assert_allclose(got["variance"], ref["variance"], rtol=1e-6)


def test_frozen_block_is_per_thread():
    import threading
    layer = FusedBatchNormalization(momentum=0.9)
    layer.build((None, 4, 4, 2))
    model = keras.Sequential([keras.Input((4, 4, 2)), layer])
    inside, seen = threading.Event(), {}

    def other_thread():
        inside.wait(10)
        seen["momentum"] = layer.momentum

    thread = threading.Thread(target=other_thread)
    thread.start()
    with frozen_bn_statistics(model):
        assert layer.momentum == 1.0
        inside.set()
        thread.join(10)
    assert seen["momentum"] == 0.9 and layer.momentum == 0.9
