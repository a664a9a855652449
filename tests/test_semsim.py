"""SemSim: the network's two outputs, one exact step against NumPy, 1 vs 2 replicas (prototypes
all-gathered), the smoke run end to end, and `describe`'s parameter count.

    python -m pytest tests/test_semsim.py -q
"""
import contextlib
import io
import json

import numpy as np
import pytest
import tensorflow as tf
import keras

from semiseg import cli as main
from semiseg import config
from semiseg.data import augment
from semiseg.data import loader as data_loader
from semiseg.methods.fixmatch import trainer as fixmatch
from semiseg.methods.semsim import trainer as semsim
from semiseg.models.networks import configured_network
from semiseg.models.outputs import main_output
from semiseg.runs import run_dir
from test_equivalence import LOSS_RTOL, WEIGHT_ATOL
from replicas import one_vs_two_replicas
from test_fixmatch import CONFIDENT_HEAD, replica_overrides
from test_fixmatch import _np_dice, _np_softmax


def test_student_returns_logits_then_decoder_features_and_counts_as_the_unet():
    cfg = config.resolve("smoke", method="semsim")
    student = semsim.SemSim.build_networks(cfg, 32, 1)["student"]
    logits, features = student(tf.zeros([2, 32, 32, 1]))
    assert logits.shape == (2, 32, 32, 1) and features.shape == (2, 16, 16, cfg.model.base_filters * 2)
    assert student.count_params() == configured_network(cfg, 32, 1, "unet").count_params()
    assert main_output(student)(tf.zeros([1, 32, 32, 1])).shape == (1, 32, 32, 1)     # validation/export view
    with pytest.raises(config.ConfigError, match="semsim.feature_layer"):
        semsim.SemSim.build_networks(config.resolve("smoke", overrides=["semsim.feature_layer=nope"], method="semsim"), 32, 1)


def _pool(x, size):
    f = x.shape[1] // size
    return x.reshape(x.shape[0], size, f, size, f, x.shape[-1]).mean((2, 4))


def _normalise(f):
    return f / np.maximum(np.linalg.norm(f, axis=-1, keepdims=True), 1e-12)


def _regions(x, g):
    b, s, _, c = x.shape
    k = s // g
    return x.reshape(b, g, k, g, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, g * g, k * k, c)


def _unregions(x, g, s):
    b, c, k = x.shape[0], x.shape[-1], s // g
    return x.reshape(b, g, g, k, k, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, s, s, c)


@pytest.mark.parametrize("preset, threshold", [("smoke", 0.52), ("smoke_multiclass", 0.36)])
def test_one_step_loss_equals_numpy(preset, threshold):
    """compute_loss = the article's equations in NumPy from the same network outputs (CutMix off: its
    mixing is tested with FixMatch; the photometric views are drawn with the step's seeds)."""
    cfg = config.resolve(preset, overrides=["model.dropout=0", f"semsim.threshold={threshold}", "semsim.cutmix=false"],
                         method="semsim")
    bundle = data_loader.prepare_data(cfg, log=lambda m: None, progress=False)
    keras.utils.set_random_seed(0)
    trainer = semsim.SemSim(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    s, model, mc = cfg.semsim, trainer.models["student"], trainer.multiclass
    images, masks = (v.numpy() for v in next(iter(bundle.train_dataset("labeled", 4, None, 0, None, stream_id=1,
                                                                        log=lambda m: None))))
    u = np.random.default_rng(1).random(images.shape).astype("float32")
    step = tf.constant(3, tf.int64)
    weak, weak_f = (v.numpy().astype("float64") for v in model(u, training=False))
    probs = _np_softmax(weak) if mc else np.concatenate([1 / (1 + np.exp(-weak)), 1 / (1 + np.exp(weak))], -1)
    threshold = s.threshold = float(np.median(probs.max(-1)))      # half the pixels pass, whatever the init
    loss, logs = trainer.compute_loss((tf.constant(images), tf.constant(masks)), tf.constant(u), step)

    s1 = augment.batch_photometric(u, trainer.replica_seed(step, fixmatch.PHOTOMETRIC_STREAM)).numpy()
    s2 = augment.batch_photometric(u, trainer.replica_seed(step, fixmatch.PHOTOMETRIC_STREAM + 10)).numpy()
    z, feats = (v.numpy().astype("float64")       # the forward passes as train.labeled_forward says
                for v in trainer.training_forward(model, np.concatenate([images, s1, s2]), 4))
    z1, fl, f1, f2 = z[4:8], feats[:4], feats[4:8], feats[8:]
    prob = _np_softmax if mc else (lambda a: 1 / (1 + np.exp(-a)))
    pw = prob(weak)
    if mc:
        y, conf = np.eye(pw.shape[-1])[pw.argmax(-1)], pw.max(-1, keepdims=True)
        labels = np.eye(trainer.n_classes)[np.round(masks[..., 0]).astype(int)]
    else:
        y, conf = (pw >= 0.5).astype("float64"), np.maximum(pw, 1 - pw)
        labels = np.concatenate([1 - masks, masks], -1)
    m = (conf >= threshold).astype("float64")
    assert 0.05 < m.mean() < 0.95
    fg = slice(1, None) if mc else slice(0, 1)
    S, g = min(s.affinity_size, feats.shape[1]), s.grid

    def refine(p, f):
        p, f = _pool(p, S).reshape(4, S * S, -1), _normalise(_pool(f, S).reshape(4, S * S, -1))
        a = np.exp(f @ f.transpose(0, 2, 1) / s.affinity_temperature)
        a /= a.sum(-1, keepdims=True)
        return ((p + a @ p) / 2).reshape(4, S, S, -1)
    w1 = _pool(m, S)
    intra = _np_dice(refine(prob(z1), f1) * w1, refine(pw, weak_f) * w1, fg)

    fr, yr = _regions(_normalise(_pool(fl, S)), g), _regions(_pool(labels, S), g)       # [L,R,P,*]
    sums, counts = np.einsum("lrpk,lrpc->lrkc", yr, fr), yr.sum(2)
    present = counts > 1e-6
    protos = _normalise(sums / np.maximum(counts, 1e-6)[..., None])
    cos = np.einsum("brpc,lrkc->blrpk", _regions(_normalise(_pool(f2, S)), g), protos) / s.prototype_temperature
    cos = np.where(present[None, :, :, None, :], cos, -1e9)
    q = np.exp(cos - cos.max(-1, keepdims=True))
    q /= q.sum(-1, keepdims=True)
    p_cr, var = _unregions(q.mean(1), g, S), _unregions(q.var(1).sum(-1, keepdims=True), g, S)
    y2 = _pool(y if mc else np.concatenate([1 - y, y], -1), S)
    w2 = np.exp(-var) * _pool(m, S)
    # Dice on the foreground: classes 1..C-1; binary: the foreground column of the 2-class distribution.
    cross = (_np_dice(p_cr * w2, y2 * w2, slice(1, None)) if mc
             else _np_dice(p_cr[..., 1:] * w2, y2[..., 1:] * w2, slice(0, 1)))
    assert float(logs["loss_intra"]) == pytest.approx(intra, rel=1e-4)
    assert float(logs["loss_cross"]) == pytest.approx(cross, rel=1e-4)
    assert float(logs["cross_uncertainty"]) == pytest.approx(var.mean(), rel=1e-4)
    assert 0 < intra < 1 and 0 < cross < 1
    expected = (float(logs["loss_sup"]) + float(logs["loss_unsup"]) + 0.25 * intra + 0.25 * cross)
    assert float(loss) == pytest.approx(expected, rel=1e-5)
    # L_sup and L_u are FixMatch's (tests/test_fixmatch.py checks them against NumPy); here their sum's parts:
    assert float(logs["mask_ratio"]) == pytest.approx(m.mean(), rel=1e-6)


STEPS = 3
def test_one_replica_equals_two_mirrored(tmp_path):
    """As tests/test_fixmatch.py's (the same randomness switched off): the cross-image term queries
    prototypes all-gathered from both replicas' labelled images, so it must match one replica."""
    results, single_w, mirrored_w = one_vs_two_replicas(tmp_path, "semsim", replica_overrides("semsim"), STEPS,
                                                        setup=CONFIDENT_HEAD)
    single = results["none"]["logs"]
    assert all(log["loss_cross"] > 0 and log["loss_intra"] > 0 for log in single), single
    for key in ("loss", "loss_unsup", "loss_intra", "loss_cross", "cross_uncertainty", "mask_ratio"):
        np.testing.assert_allclose([log[key] for log in results["mirrored"]["logs"]], [log[key] for log in single],
                                   rtol=LOSS_RTOL, err_msg=key)
    for a, b in zip(single_w, mirrored_w):
        np.testing.assert_allclose(b, a, atol=WEIGHT_ATOL)


def test_smoke_training_end_to_end(tmp_path):
    out = tmp_path / "ss"
    assert main.main(["train", "--method", "semsim", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", "semsim.threshold=0.55", "semsim.weak_mode=train"]) == 0
    history = run_dir.read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for row in history:
        assert 0.0 < float(row["mask_ratio"]) <= 1.0 and float(row["loss_unsup"]) > 0
        assert 0.0 < float(row["loss_intra"]) < 1.0 and 0.0 < float(row["loss_cross"]) < 1.0
        assert float(row["cross_uncertainty"]) >= 0 and 0.0 <= float(row["pseudo_dice"]) <= 1.0
    assert json.loads((out / "export.json").read_text())["network"] == "student"
    exported = keras.models.load_model(out / "best_model.keras")
    assert len(exported.outputs) == 1                # the main output only


def test_describe_counts_the_student():
    buffer = io.StringIO()
    with contextlib.redirect_stdout(buffer):
        assert main.main(["describe", "--method", "semsim", "--preset", "smoke"]) == 0
    counts = json.loads(buffer.getvalue())["parameters"]
    cfg = config.resolve("smoke", method="semsim")
    assert counts == {"student": semsim.SemSim.build_networks(cfg, cfg.data.image_size, 1)["student"].count_params()}
