"""Mean Teacher's EMA teacher and MixMatch's random draws under two mirrored replicas (CPU).

    python -m pytest tests/test_two_replicas.py -q

Two logical CPU devices (SEMISEG_LOGICAL_CPUS=2, configured before TF starts, hence a subprocess)
run MirroredStrategy. After real train steps the teacher's copies on the two replicas must be
identical (with synchronised BatchNorm: otherwise each replica's moving statistics, and so their EMA,
legitimately differ) (an EMA assign in the replica context keeps mirrored copies in sync only if every replica
computes the same update), and the random draws MixMatch makes inside the step (MixUp lambdas)
must differ between replicas (seeded with the replica id: Keras draws do not differ, docs/design.md section 7).
"""
import textwrap

from test_equivalence import run_result_script

SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from semiseg import config
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy("mirrored")
    import keras, tensorflow as tf
    from semiseg.data import loader as data_loader_tf2
    from semiseg.methods import get_method
    from semiseg.methods.mixmatch.trainer import sample_mixup_lambda
    from semiseg.training.ema import ema_weights
    out = {"replicas": strategy.num_replicas_in_sync}
    cfg = config.resolve("smoke", "", ["train.steps_per_epoch=2", "train.epochs=1",
                                              "model.sync_batchnorm=true"], "mean_teacher")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    mt = get_method("mean_teacher")(cfg, bundle, strategy, info, log=lambda m: None)
    before = [keras.ops.convert_to_numpy(v) for v in ema_weights(mt.models["teacher"])]
    mt._make_loop(*mt._iterators(0))(tf.constant(2))
    teacher = ema_weights(mt.models["teacher"])      # weights and BN statistics
    out["teacher_moved"] = max(float(np.abs(keras.ops.convert_to_numpy(v) - b).max())
                               for v, b in zip(teacher, before))
    out["teacher_replica_gap"] = max(float(np.abs(v.value.values[0].numpy() - v.value.values[1].numpy()).max())
                                     for v in teacher)
    mm_cfg = config.resolve("smoke", "", [], "mixmatch")
    mm = get_method("mixmatch")(mm_cfg, bundle, strategy, info, log=lambda m: None)

    @tf.function
    def draws():
        return strategy.run(lambda: sample_mixup_lambda(8, 0.75, mm.replica_seed(tf.constant(5, tf.int64), 3)))
    per_replica = draws()
    a, b = (t.numpy() for t in per_replica.values)
    out["lambda_replica_0"], out["lambda_replica_1"] = a.tolist(), b.tolist()
    print("RESULT" + json.dumps(out))
""")


def test_ema_teacher_identical_and_mixmatch_draws_differ_across_replicas(tmp_path):
    out = run_result_script(SCRIPT, tmp_path, SEMISEG_LOGICAL_CPUS="2")
    assert out["replicas"] == 2
    assert out["teacher_moved"] > 0                    # the EMA did update the teacher
    assert out["teacher_replica_gap"] == 0.0           # ... identically on both replicas
    lam0, lam1 = out["lambda_replica_0"], out["lambda_replica_1"]
    assert all(0.5 <= x <= 1.0 for x in lam0 + lam1)
    assert lam0 != lam1                                # each replica mixes with its own draws
