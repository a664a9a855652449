"""Validation sharded over replicas scores exactly what one device scores (smoke data, CPU).

    python -m pytest tests/test_sharded_eval.py -q

Two logical CPU devices (SEMISEG_LOGICAL_CPUS=2, set before TF starts, hence a subprocess) give
MirroredStrategy two replicas. evaluation.ShardedCaseDice over them, and over the default strategy
(one replica), must give the single-device mean_case_dice to 1e-6; the per-case slice counts must
be the cache's (every case present, no slice twice, none lost) though the validation split's 7 cases
and its slices do not divide by 2 replicas x the per-replica batch (padding is never counted).
"""
import textwrap

from test_equivalence import run_result_script

SCRIPT = textwrap.dedent("""
    import json
    from semiseg import config
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy("mirrored")
    import numpy as np, tensorflow as tf, keras
    from semiseg.data import loader as data_loader_tf2
    from semiseg.evaluation import evaluate as evaluation
    from models_tf2 import build_model
    cfg = config.resolve("smoke", "", [], "supervised")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    keras.utils.set_random_seed(0)
    with strategy.scope():
        model = build_model(cfg.model, bundle.image_size, bundle.channels, "student")
    out = {"replicas": strategy.num_replicas_in_sync, "cases": sorted(bundle.splits["val"])}
    out["expected_slices"] = [bundle.case_info(c)["n_slices"] for c in out["cases"]]
    out["reference"] = evaluation.mean_case_dice(evaluation.make_predict_fn(model), bundle, "val", 16)
    for name, strat, batch in (("two", strategy, 6), ("one", tf.distribute.get_strategy(), 5)):
        scorer = evaluation.ShardedCaseDice(strat, model, bundle, "val", batch)
        out[name] = scorer.score()
        out[name + "_slices"] = scorer.case_counts()[:, 0].tolist()
        out[name + "_cases"] = scorer.case_ids
    print("RESULT" + json.dumps(out))
""")


def test_two_replicas_score_validation_like_one_device(tmp_path):
    out = run_result_script(SCRIPT, tmp_path, SEMISEG_LOGICAL_CPUS="2")
    assert out["replicas"] == 2
    assert len(out["cases"]) % 2 == 1 and sum(out["expected_slices"]) % 6 != 0    # padding is exercised
    for name in ("two", "one"):
        assert out[name + "_cases"] == out["cases"]
        assert out[name + "_slices"] == out["expected_slices"]      # complete, nothing twice
        assert abs(out[name] - out["reference"]) < 1e-6, (name, out[name], out["reference"])
    assert 0.0 < out["reference"] < 1.0          # a score that can differ, not a constant 0 or 1
