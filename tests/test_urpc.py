"""URPC: the loss of one step against NumPy, 1 vs 2 replicas, the smoke run with evaluate/predict,
describe's counts, and the network's training and inference views.

    python -m pytest tests/test_urpc.py -q
"""
import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from semiseg import cli as main
from semiseg import config
from semiseg.data import loader
from semiseg.methods.urpc import trainer as urpc
from semiseg.runs import run_dir
from replicas import one_vs_two_replicas
from test_equivalence import LOSS_RTOL, WEIGHT_ATOL

# depth 4: the main output and 3 auxiliary ones (feature noise 1/2, feature dropout 1/4, dropout 1/8).
DEEP = ["model.depth=4", "urpc.rampup_epochs=2"]


def _trainer(preset, overrides=()):
    cfg = config.resolve(preset, method="urpc", overrides=list(overrides))
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    keras.utils.set_random_seed(cfg.seed)
    return urpc.URPC(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)


def _rng_states(model):
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


# ---------------------------------------------------------------- the paper's equation in NumPy
def _np_class_probs(z, multiclass):
    z = z.astype(np.float64)
    if multiclass:
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)
    s = 1 / (1 + np.exp(-z))
    return np.concatenate([1 - s, s], -1)


def _np_supervised(z, masks, n_classes, multiclass, eps=1e-5):
    """0.5 Dice + 0.5 CE (train.lambda_dice/lambda_bce), Dice over the batch's sums."""
    p = _np_class_probs(z, multiclass)
    if multiclass:
        y = np.eye(n_classes)[masks[..., 0].round().astype(int)]
        ce = -(y * np.log(p)).sum(-1).mean()
        dice = np.mean([1 - (2 * (p[..., c] * y[..., c]).sum() + eps) / (p[..., c].sum() + y[..., c].sum() + eps)
                        for c in range(1, n_classes)])
    else:
        y, q = masks.astype(np.float64), p[..., 1:]
        ce = -(y * np.log(q) + (1 - y) * np.log(1 - q)).mean()
        dice = 1 - (2 * (q * y).sum() + eps) / (q.sum() + y.sum() + eps)
    return 0.5 * dice + 0.5 * ce


def _np_urpc(outputs, masks, n_lab, n_classes, multiclass, weight):
    """L_sup (mean over scales) + weight * 1/S sum_s [mean(w_s (p_s - p_c)^2) / mean(w_s) + mean(D_s)],
    D_s = sum_c p_c log(p_c / p_s) (SSL4MIS: KLDivLoss(log p_s, p_c)), w_s = exp(-D_s), on unlabelled pixels."""
    sup = np.mean([_np_supervised(z[:n_lab], masks, n_classes, multiclass) for z in outputs])
    probs = [_np_class_probs(z[n_lab:], multiclass) for z in outputs]
    p_c = np.mean(probs, axis=0)
    terms = []
    for p_s in probs:
        d = (p_c * np.log(p_c / p_s)).sum(-1, keepdims=True)
        w = np.exp(-d)
        terms.append((w * (p_s - p_c) ** 2).mean() / (w.mean() + 1e-8) + d.mean())
    return sup + weight * np.mean(terms), sup, np.mean(terms)


@pytest.mark.parametrize("preset", ["smoke", "smoke_multiclass"])
def test_one_step_loss_equals_numpy(preset):
    trainer = _trainer(preset, DEEP)
    model = trainer.models["student"]
    rng = np.random.default_rng(0)
    size = trainer.cfg.data.image_size
    images = tf.constant(rng.random((2, size, size, 1)), tf.float32)
    unlabeled = tf.constant(rng.random((3, size, size, 1)), tf.float32)
    masks = tf.constant(rng.integers(0, trainer.n_classes, (2, size, size, 1)), tf.float32)
    step = trainer.steps_per_epoch           # epoch 1 of a 2-epoch ramp: weight 0.1 exp(-5/4)
    states = _rng_states(model)
    assert len(states) >= 3                  # feature noise, feature dropout, dropout (+ the U-Net's)
    before = [v.numpy().copy() for v in states]
    loss, logs = trainer.compute_loss((images, masks), unlabeled, tf.constant(step, tf.int64))
    # The same draws again: restore the generators and rerun the training view (BN on batch statistics).
    for v, value in zip(states, before):
        v.assign(value)
    outputs = [np.asarray(z)            # the forward passes as train.labeled_forward says
               for z in trainer.training_forward(model, tf.concat([images, unlabeled], 0), 2)]
    assert len(outputs) == 4 and all(z.shape == outputs[0].shape for z in outputs)
    inference = [np.asarray(z) for z in model(tf.concat([images, unlabeled], 0), training=False)]
    assert not np.allclose(outputs[1], inference[1], atol=1e-4)       # perturbations were on
    weight = 0.1 * np.exp(-5 * 0.25)
    expected, sup, unsup = _np_urpc(outputs, np.asarray(masks), 2, trainer.n_classes, trainer.multiclass, weight)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    assert float(logs["loss_sup"]) == pytest.approx(sup, rel=1e-5)
    assert float(logs["loss_unsup"]) == pytest.approx(unsup, rel=1e-4)
    assert unsup > 0


def test_inference_view_is_deterministic_and_main_output_only():
    trainer = _trainer("smoke", DEEP)
    model = trainer.models["student"]
    x = tf.constant(np.random.default_rng(1).random((2, 32, 32, 1)), tf.float32)
    main_view = trainer.inference_network("student")
    assert len(model.outputs) == 4 and len(main_view.outputs) == 1
    np.testing.assert_array_equal(np.asarray(main_view(x, training=False)), np.asarray(model(x, training=False)[0]))
    np.testing.assert_array_equal(np.asarray(main_view(x, training=False)), np.asarray(main_view(x, training=False)))
    assert [name for name, _ in trainer.eval_models().items()] == ["student"]
    assert len(trainer.export_model()[1].outputs) == 1


def test_probe_leaves_training_state_alone():
    trainer = _trainer("smoke", DEEP)
    model = trainer.models["student"]
    x = tf.constant(np.random.default_rng(2).random((3, 32, 32, 1)), tf.float32)
    watched = _rng_states(model) + [v for v in model.non_trainable_variables if "moving" in v.path]
    before = [v.numpy().copy() for v in watched]
    fn = tf.function(trainer.pseudo_targets)
    target = fn(x).numpy()
    assert target.shape == (3, 32, 32, 1) and 0 < target.min() and target.max() < 1
    for b, v in zip(before, watched):
        np.testing.assert_array_equal(b, v.numpy())
    np.testing.assert_array_equal(target, fn(x).numpy())     # same draws every probe


# ---------------------------------------------------------------- 1 replica vs 2 mirrored replicas
STEPS = 3
# Randomness: element-wise dropout (the U-Net's model.dropout) is switched off: Keras draws the same
# mask on every replica, for a half-size batch, so it cannot equal one replica's mask over the whole
# batch. Feature noise and feature dropout (the two auxiliary heads at depth 3) stay ON: their draws are
# shared by the batch (as SSL4MIS's), so every replica drawing the same numbers IS one draw for the
# global batch. BatchNorm stays on, synchronised across replicas (model.sync_batchnorm). SGD (SSL4MIS's
# optimizer) rather than Adam: Adam divides by sqrt(v), which turned the float32 round-off of
# near-zero gradients into weight differences up to 2.3e-5 after 3 steps (measured; SGD: 1.7e-6).
def test_one_replica_equals_two(tmp_path):
    results, single_w, mirrored_w = one_vs_two_replicas(
        tmp_path, "urpc", ["model.depth=3", "model.dropout=0", "train.optimizer=sgd", "model.sync_batchnorm=true",
                           "urpc.rampup_epochs=0", "urpc.consistency=1"], STEPS,
        report='trainer.epoch_diagnostics(1)["pseudo_dice"]')
    for key in ("loss", "loss_sup", "loss_unsup", "loss_unsup_rect", "loss_unsup_kl", "loss_sup_main"):
        single = [log[key] for log in results["none"]["logs"]]
        assert len(set(single)) == STEPS                                    # training moves it
        np.testing.assert_allclose([log[key] for log in results["mirrored"]["logs"]], single, rtol=LOSS_RTOL)
    assert len(single_w) > 20
    for a, b in zip(single_w, mirrored_w):      # trainable, BN moving statistics and the generators' states
        np.testing.assert_allclose(b, a, atol=WEIGHT_ATOL)
    assert results["mirrored"]["report"] == pytest.approx(results["none"]["report"], abs=1e-6)


# ---------------------------------------------------------------- end to end, describe
@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("urpc") / "run"
    assert main.main(["train", "--method", "urpc", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    return out


def test_smoke_training_end_to_end(smoke_run):
    history = run_dir.read_history(smoke_run)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for row in history:
        for key in ("loss_sup", "loss_sup_main", "loss_unsup", "loss_unsup_rect", "loss_unsup_kl"):
            assert np.isfinite(float(row[key])) and float(row[key]) > 0, key
        assert float(row["loss_unsup"]) == pytest.approx(float(row["loss_unsup_rect"]) + float(row["loss_unsup_kl"]),
                                                         rel=1e-4)
        assert 0.0 <= float(row["pseudo_dice"]) <= 1.0
        assert float(row["unsup_weight"]) == pytest.approx(0.1)      # the paper's 0.1, ramped in 1 epoch (smoke)
    # Epoch 2's steps all run at the full weight: the logged terms add up to the loss.
    last = history[1]
    assert float(last["loss"]) == pytest.approx(float(last["loss_sup"]) + 0.1 * float(last["loss_unsup"]), rel=1e-4)
    assert json.loads((smoke_run / "export.json").read_text())["network"] == "student"


def test_exported_network_has_one_output_and_evaluate_predict_work(smoke_run, tmp_path):
    best = keras.saving.load_model(smoke_run / "best_model.keras", compile=False)
    assert len(best.outputs) == 1 and not any("urpc_aux" in layer.name for layer in best.layers)
    assert main.main(["evaluate", str(smoke_run)]) == 0
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n_cases"] > 0
    picture = tmp_path / "in.png"
    Image.fromarray((np.random.default_rng(3).random((40, 40)) * 255).astype(np.uint8)).save(picture)
    for checkpoint in ([], ["--checkpoint", "latest"]):     # the export, and the pyramid network restored
        out = tmp_path / f"mask{len(checkpoint)}.png"
        assert main.main(["predict", str(smoke_run), str(picture), str(out), "--no-progress", *checkpoint]) == 0
        mask = np.asarray(Image.open(out))
        assert mask.shape == (40, 40) and set(np.unique(mask)) <= {0, 255}


def test_describe_counts_equal_the_networks(capsys):
    assert main.main(["describe", "--method", "urpc", "--preset", "smoke", "--set", "model.depth=4"]) == 0
    described = json.loads(capsys.readouterr().out)
    cfg = config.resolve("smoke", method="urpc", overrides=["model.depth=4"])
    nets = urpc.URPC.build_networks(cfg, cfg.data.image_size, 1)
    assert described["parameters"] == {"student": nets["student"].count_params()}
    # The U-Net plus one 3x3 head per auxiliary scale (filters 4 * 2**level in, 1 channel out, a bias).
    from semiseg.models.networks import configured_network
    unet = configured_network(cfg, cfg.data.image_size, 1, "unet").count_params()
    assert described["parameters"]["student"] == unet + sum(9 * 4 * 2 ** level + 1 for level in (1, 2, 3))


@pytest.mark.parametrize("sets, key", [(["urpc.perturbations=noise"], "urpc.perturbations"),
                                       (["urpc.feature_dropout_low=0.95"], "urpc.feature_dropout_low"),
                                       (["model.depth=1"], "model.depth"),
                                       (["urpc.upsample=cubic"], "urpc.upsample")])
def test_bad_settings_exit_2_naming_the_key(sets, key, tmp_path, capsys):
    out = tmp_path / "run"
    assert main.main(["train", "--method", "urpc", "--preset", "smoke", "--out", str(out), "--set", *sets]) == 2
    assert key in capsys.readouterr().err and not out.exists()
