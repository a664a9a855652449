"""Step agreement across replicas and workers where single-process runs cannot tell (CPU).

    python -m pytest tests/test_cluster_step.py -q

- mixed_float16 on two mirrored replicas (two logical CPUs) where one replica's loss overflows at
  one step: every replica skips that step together, the weights stay finite and identical on both
  replicas, and the step counter (stream position, resume point, LR schedule) still advances.
- Early stopping on two localhost workers whose validation scores differ: both take the chief's
  decision, stop after the same epoch, and the job does not hang.
Each configuration runs in subprocesses with a timeout, so a hang fails instead of blocking.
"""
import json
import sys
import textwrap

import numpy as np

from test_equivalence import free_ports, last_json_line, python_env, run_processes

# Trains 3 steps under mixed_float16 on two mirrored replicas; replica 1's loss is multiplied by
# 1e30 at step 1 (index), which overflows float16 only there. BCE only: the batch Dice all-reduces
# its sums, whose gradient would carry replica 1's overflow to replica 0 (all would then agree).
OVERFLOW_SCRIPT = textwrap.dedent("""
    import json
    import numpy as np
    from semiseg import config
    from semiseg.training import distribute
    cfg = config.resolve("smoke", "", ["model.batchnorm=false", "model.dropout=0", "train.precision=mixed_float16",
                                       "train.lambda_dice=0", "train.schedule=cosine", "train.steps_per_epoch=3",
                                       "train.epochs=1"], "supervised")
    strategy, info = distribute.make_strategy("mirrored")
    import keras, tensorflow as tf
    from semiseg.data import loader as data_loader_tf2
    import train_ssl_tf2
    keras.mixed_precision.set_global_policy("mixed_float16")
    keras.utils.set_random_seed(cfg.seed)
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)

    class OverflowOnReplica1(train_ssl_tf2.get_method("supervised")):
        def compute_loss(self, labeled, unlabeled, step):
            loss, logs = super().compute_loss(labeled, unlabeled, step)
            replica = tf.distribute.get_replica_context().replica_id_in_sync_group
            blow_up = tf.logical_and(tf.equal(replica, 1), tf.equal(step, 1))
            return loss * tf.where(blow_up, 1e30, 1.0), logs

    trainer = OverflowOnReplica1(cfg, bundle, strategy, info, log=lambda m: None)
    loop = trainer._make_loop(*trainer._iterators(0))
    scales = [float(trainer.optimizer.dynamic_scale.numpy())]
    for _ in range(3):
        loop(tf.constant(1))
        scales.append(float(trainer.optimizer.dynamic_scale.numpy()))
    per_replica = [[keras.ops.convert_to_numpy(v) for v in strategy.experimental_local_results(w.value)]
                   for w in trainer.trainable_variables()]
    print(json.dumps({"replicas": info["num_replicas"], "scales": scales,
                      "steps_taken": int(getattr(trainer, "steps_taken", trainer.optimizer.iterations).numpy()),
                      "iterations": int(trainer.optimizer.iterations.numpy()),
                      "lr": trainer.current_lr(), "schedule_lr": [float(trainer._lr_schedule()(n)) for n in (2, 3)],
                      "all_finite": bool(all(np.isfinite(r).all() for w in per_replica for r in w)),
                      "max_replica_difference": max(float(np.max(np.abs(w[0].astype(np.float64) - w[1])))
                                                    for w in per_replica)}))
""")


def test_mixed_float16_overflow_on_one_replica_skips_on_all():
    ((rc, stdout, stderr),) = run_processes([([sys.executable, "-c", OVERFLOW_SCRIPT],
                                              python_env(SEMISEG_LOGICAL_CPUS="2"))])
    assert rc == 0, stderr[-3000:]
    result = last_json_line(stdout)
    print(f"\n{result}")
    assert result["replicas"] == 2
    assert result["all_finite"], "a replica applied the overflowed gradients"
    assert result["max_replica_difference"] == 0.0
    # The overflow at step index 1 halves the loss scale once; the other steps keep it.
    assert result["scales"] == [result["scales"][0]] * 2 + [result["scales"][0] / 2] * 2
    # The skipped step is a step taken (the stream moved on) but no optimizer update.
    assert (result["steps_taken"], result["iterations"]) == (3, 2)
    # The LR schedule follows the steps taken (its value at step 3), not the optimizer's updates.
    assert result["schedule_lr"][0] != result["schedule_lr"][1]
    assert result["lr"] == result["schedule_lr"][1]


# Two workers fit with patience 1 while seeing different validation scores: the chief's fall
# (0.5, 0.4, ...), the other's rise. The real validation runs; only its returned score is replaced,
# per worker, to make the workers disagree for certain (unsynchronised BatchNorm does it by chance).
EARLY_STOP_SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from semiseg import config
    from semiseg.training import distribute
    cfg = config.resolve("smoke", "", ["train.steps_per_epoch=2", "train.epochs=4", "train.patience=1",
                                       "train.min_delta=0"], "supervised")
    strategy, info = distribute.make_strategy("multi_worker")
    import keras
    from semiseg.data import loader as data_loader_tf2
    from semiseg.evaluation import evaluate as evaluation
    import train_ssl_tf2
    keras.utils.set_random_seed(cfg.seed)
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    scripted = {0: [0.5, 0.4, 0.3, 0.2], 1: [0.1, 0.2, 0.3, 0.4]}[info["task_index"]]
    # Validation is sharded and its counts gathered, so real scores agree across workers: the real
    # score still runs (it is collective), and each worker then sees its scripted value instead.
    real_score = evaluation.ShardedCaseDice.score
    seen = []

    def scripted_score(self):
        real_score(self)
        seen.append(scripted[len(seen)])
        return seen[-1]

    evaluation.ShardedCaseDice.score = scripted_score
    run = Path(sys.argv[1])
    run.mkdir(parents=True, exist_ok=True)
    trainer = train_ssl_tf2.get_method("supervised")(cfg, bundle, strategy, info, log=lambda m: None)
    ckpt_dir = Path(distribute.worker_checkpoint_dir(str(run), info))
    reason = trainer.fit(run, is_chief=info["is_chief"], ckpt_dir=ckpt_dir, progress=False)
    distribute.remove_worker_checkpoint_dir(str(ckpt_dir), info)
    print(json.dumps({"task": info["task_index"], "reason": reason, "epochs": int(trainer.epoch.numpy()),
                      "own_scores": seen, "best_score": float(trainer.best_score.numpy()),
                      "bad_epochs": int(trainer.bad_epochs.numpy())}))
""")
EARLY_STOP_TIMEOUT_S = 240      # both workers finish in about a minute here; more is a hang


def test_workers_with_different_validation_scores_stop_together(tmp_path):
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    workers = run_processes([(
        [sys.executable, "-c", EARLY_STOP_SCRIPT, str(tmp_path / "run")],
        python_env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})))
        for i in range(2)], timeout_s=EARLY_STOP_TIMEOUT_S)
    for rc, _, stderr in workers:
        assert rc == 0, stderr[-3000:]
    chief, other = (last_json_line(stdout) for _, stdout, _ in workers)
    print(f"\n{chief}\n{other}")
    assert other["own_scores"][:2] == [0.1, 0.2]        # the workers did see different scores
    # The chief's 0.5 then 0.4: an improvement, then one bad epoch, which is patience 1.
    for worker in (chief, other):
        assert (worker["reason"], worker["epochs"], worker["bad_epochs"]) == ("early_stopped", 2, 1)
        assert worker["best_score"] == 0.5
    assert (tmp_path / "run" / "best_model.keras").exists()


def _train_steps(jit_compile: bool, steps: int):
    """Losses and final weights of `steps` steps of the smoke U-Net on the default strategy, built with
    Keras' BatchNormalization: XLA lowers the fused BN kernel to its own batch-norm ops (another
    summation order), and Adam's normalised update turned that round-off into weight differences
    of 6e-5 to 4e-4 after 3 steps, different on every run; Keras' BN keeps them at 1e-5."""
    import keras
    import tensorflow as tf
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    from semiseg.models.fused_batchnorm import keras_batchnorm
    import train_ssl_tf2
    cfg = config.resolve("smoke", "", ["model.dropout=0", f"train.jit_compile={str(jit_compile).lower()}"],
                         "supervised")
    keras.utils.set_random_seed(cfg.seed)
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    with keras_batchnorm():
        trainer = train_ssl_tf2.get_method("supervised")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    loop = trainer._make_loop(*trainer._iterators(0))
    losses = [float(loop(tf.constant(1))["loss"]) for _ in range(steps)]
    return losses, [keras.ops.convert_to_numpy(w) for w in trainer.trainable_variables()]


def test_jit_compiled_replica_step_matches_the_plain_step():
    """XLA compiles the replica step only (the iterator stays outside); on one replica its steps
    equal the plain ones to float32 round-off (measured here: 1.2e-7 in the third loss)."""
    plain_losses, plain_weights = _train_steps(False, 3)
    xla_losses, xla_weights = _train_steps(True, 3)
    assert len(set(plain_losses)) == 3
    np.testing.assert_allclose(xla_losses, plain_losses, rtol=1e-5)
    for a, b in zip(plain_weights, xla_weights):
        np.testing.assert_allclose(b, a, atol=1e-5)


def test_jit_compile_on_two_cpu_replicas_is_refused_before_any_file(tmp_path):
    out = tmp_path / "run"
    ((rc, _, stderr),) = run_processes([(
        [sys.executable, "main.py", "train", "--method", "supervised", "--preset", "smoke", "--out", str(out),
         "--no-progress", "--set", "train.jit_compile=true", "train.distribution=mirrored"],
        python_env(SEMISEG_LOGICAL_CPUS="2"))], timeout_s=120)
    assert rc == 2, stderr[-3000:]
    assert "train.jit_compile" in stderr and "2 CPU replicas" in stderr
    assert not out.exists()
