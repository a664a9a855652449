"""Cross pseudo supervision: the loss equals the paper's equation computed in NumPy (binary, multi-class,
CutMix), the two networks start apart and both train, one replica equals two, the smoke run, describe.

    python -m pytest tests/test_cps.py -q
"""
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from semiseg import cli as main
from semiseg import config
from semiseg.data import loader as data_loader
from semiseg.methods import spec
from semiseg.methods.cps import cutmix
from semiseg.methods.cps import trainer as cps
from semiseg.runs import run_dir
from replicas import one_vs_two_replicas, start_weights
from test_equivalence import LOSS_RTOL, WEIGHT_ATOL


def _trainer(preset="smoke", *overrides):
    # Dropout off: the test must reproduce the step's logits outside it (BN in training mode uses the
    # batch's statistics, so its outputs do not depend on the moving statistics the calls update).
    cfg = config.resolve(preset, overrides=["model.dropout=0", *overrides], method="cps")
    bundle = data_loader.prepare_data(cfg, log=lambda m: None, progress=False)
    return cps.CrossPseudoSupervision(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)


# ------------------------------------------------------------------ the equation in NumPy
def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _bce(z, y):
    """Per-pixel binary CE with logits: -y log s(z) - (1-y) log(1-s(z)), in its stable form."""
    return np.maximum(z, 0) - z * y + np.log1p(np.exp(-np.abs(z)))


def _cce(z, onehot):
    return -(onehot * np.log(_softmax(z))).sum(-1)


def _supervised(z, masks, train, n_classes):
    """lambda_dice * soft Dice + lambda_ce * CE, Dice over the batch (multi-class: mean of the foreground classes)."""
    eps = 1e-5
    if n_classes == 2:
        p = _sigmoid(z)
        dice = 1 - (2 * (p * masks).sum() + eps) / (p.sum() + masks.sum() + eps)
        ce = _bce(z, masks).mean()
    else:
        onehot = np.eye(n_classes)[masks[..., 0].astype(int)]
        p = _softmax(z)
        inter, ps, ts = (p * onehot).sum((0, 1, 2)), p.sum((0, 1, 2)), onehot.sum((0, 1, 2))
        dice = np.mean(1 - (2 * inter[1:] + eps) / (ps[1:] + ts[1:] + eps))
        ce = _cce(z, onehot).mean()
    return train.lambda_dice * dice + train.lambda_bce * ce


def _hard(z, n_classes):
    return (_sigmoid(z) >= 0.5).astype(np.float64) if n_classes == 2 else np.eye(n_classes)[z.argmax(-1)]


def _pseudo_ce(z, labels, n_classes):
    return (_bce(z, labels) if n_classes == 2 else _cce(z, labels)).mean()


def _batch(n_classes, size=32, n=2, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.random((n, size, size, 1)).astype("float32")
    unlabeled = rng.random((n, size, size, 1)).astype("float32")
    yy, xx = np.mgrid[:size, :size]
    disc = ((yy - size / 2) ** 2 + (xx - size / 3) ** 2 < (size / 4) ** 2)
    if n_classes == 2:
        masks = np.stack([disc, disc.T])
    else:   # class indices: 1 in the disc, 2 in its mirror image outside it; 2 and 1 in the second
        masks = np.stack([disc * 1 + (disc.T & ~disc) * 2, disc.T * 2 + (disc & ~disc.T) * 1])
    masks = masks[:n, ..., None]
    return images, masks.astype("float32"), unlabeled


@pytest.mark.parametrize("preset, on_labeled, rampup, step", [
    ("smoke", True, 0.0, 0), ("smoke", False, 4.0, 3), ("smoke_multiclass", True, 0.0, 2)])
def test_one_step_loss_is_the_papers_equation(preset, on_labeled, rampup, step):
    trainer = _trainer(preset, f"cps.on_labeled={on_labeled}", f"cps.rampup_epochs={rampup}")
    n_classes = trainer.n_classes
    images, masks, unlabeled = _batch(n_classes)
    x = np.concatenate([images, unlabeled])
    n_lab = len(images)         # the forward passes as train.labeled_forward says
    z1, z2 = (trainer.training_forward(trainer.models[k], x, n_lab).numpy().astype(np.float64)
              for k in ("student", "student2"))
    loss, logs = trainer.compute_loss((tf.constant(images), tf.constant(masks)), tf.constant(unlabeled),
                                      tf.constant(step, tf.int64))
    n, first = len(images), 0 if on_labeled else len(images)
    sup1 = _supervised(z1[:n], masks, trainer.cfg.train, n_classes)
    sup2 = _supervised(z2[:n], masks, trainer.cfg.train, n_classes)
    # L_cps = CE(P1, hard(P2)) + CE(P2, hard(P1)), the mean over every pixel of the CPS images.
    l_cps = (_pseudo_ce(z1[first:], _hard(z2[first:], n_classes), n_classes)
             + _pseudo_ce(z2[first:], _hard(z1[first:], n_classes), n_classes))
    t = step / trainer.steps_per_epoch
    weight = 1.5 * (math.exp(-5 * (1 - min(t / rampup, 1)) ** 2) if rampup else 1.0)
    assert float(logs["loss_sup"]) == pytest.approx(sup1, rel=1e-5)
    assert float(logs["loss_sup2"]) == pytest.approx(sup2, rel=1e-5)
    assert float(logs["loss_unsup"]) == pytest.approx(l_cps, rel=1e-5)
    assert float(loss) == pytest.approx(sup1 + sup2 + weight * l_cps, rel=1e-5)
    assert l_cps > 0.1 and (weight < 1.5) == bool(rampup)        # the terms are real, the ramp acts


@pytest.mark.parametrize("preset", ["smoke", "smoke_multiclass"])
def test_cutmix_loss_trains_mixed_images_on_mixed_pseudo_labels_of_the_unmixed(preset):
    trainer = _trainer(preset, "cps.cutmix=true")
    k = trainer.n_classes
    images, masks, unlabeled = _batch(k, n=2, seed=1)
    step = tf.constant(5, tf.int64)
    c = trainer.cfg.cps
    # The boxes are the step's input (drawn from its seed); everything after is the paper's equation.
    boxes = cutmix.box_masks(2, 32, 32, trainer.replica_seed(step, cps.CUTMIX_STREAM), c.cutmix_boxes,
                             c.cutmix_min_area, c.cutmix_max_area).numpy()
    assert 0 < boxes.mean() < 1
    partner = np.roll(unlabeled, 1, axis=0)
    mixed = unlabeled * (1 - boxes) + partner * boxes
    x = np.concatenate([images, mixed])
    nets = trainer.models["student"], trainer.models["student2"]
    z = [trainer.training_forward(net, x, len(images)).numpy().astype(np.float64) for net in nets]
    plain = [_hard(net(unlabeled, training=True).numpy(), k) for net in nets]
    labels = [np.concatenate([_hard(zk[:2], k), p * (1 - boxes) + np.roll(p, 1, axis=0) * boxes])
              for zk, p in zip(z, plain)]
    loss, logs = trainer.compute_loss((tf.constant(images), tf.constant(masks)), tf.constant(unlabeled), step)
    l_cps = _pseudo_ce(z[0], labels[1], k) + _pseudo_ce(z[1], labels[0], k)
    sups = [_supervised(zk[:2], masks, trainer.cfg.train, k) for zk in z]
    assert float(logs["loss_unsup"]) == pytest.approx(l_cps, rel=1e-5)
    assert float(loss) == pytest.approx(sum(sups) + 1.5 * l_cps, rel=1e-5)


def test_box_masks_are_binary_boxes_of_the_drawn_area_and_differ_per_seed():
    one = cutmix.box_masks(400, 64, 64, tf.constant([1, 2], tf.int64), n_boxes=1, min_area=0.25, max_area=0.5).numpy()
    assert set(np.unique(one)) == {0.0, 1.0}
    area = one.mean(axis=(1, 2, 3))
    assert area.min() > 0.2 and area.max() < 0.56               # 0.25-0.5 up to rounding the sides to pixels
    assert 0.35 < area.mean() < 0.40                            # uniform in [0.25, 0.5]: mean 0.375
    rows = one[..., 0].any(axis=2)                              # one box: its rows are one contiguous run
    assert all(np.diff(np.flatnonzero(r)).max(initial=1) == 1 for r in rows)
    three = cutmix.box_masks(8, 64, 64, tf.constant([1, 2], tf.int64)).numpy()
    other = cutmix.box_masks(8, 64, 64, tf.constant([1, 3], tf.int64)).numpy()
    assert not np.array_equal(three, other)
    mixed = cutmix.mix(tf.zeros([8, 64, 64, 2]), tf.ones([8, 64, 64, 2]), three).numpy()
    np.testing.assert_array_equal(mixed, np.repeat(three, 2, axis=-1))


# ------------------------------------------------------------------ networks
def test_networks_start_different_deterministically_and_both_train():
    cfg = config.resolve("smoke", method="cps")
    builds = []
    for global_seed in (0, 1):
        keras.utils.set_random_seed(global_seed)
        builds.append(spec("cps").build_networks(cfg, 32, 1))
    kernels = lambda m: [v.numpy() for v in m.weights if v.path.endswith("kernel")]     # noqa: E731
    for a, b in zip(kernels(builds[0]["student"]), kernels(builds[0]["student2"])):
        assert a.shape == b.shape and not np.allclose(a, b)         # every kernel starts apart ...
        assert a.std() == pytest.approx(b.std(), rel=0.6)           # ... drawn by the same initialiser
    # Network 2 comes from seeds derived from cfg.seed, not from the global RNG.
    for a, b in zip(builds[0]["student2"].weights, builds[1]["student2"].weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert not np.allclose(kernels(builds[0]["student"])[0], kernels(builds[1]["student"])[0])

    trainer = _trainer("smoke")
    variables = trainer.trainable_variables()
    n1 = len(trainer.models["student"].trainable_variables)
    assert len(variables) == 2 * n1 and len(trainer.optimizer.variables) > 2 * n1     # one optimizer, both networks
    before = [v.numpy().copy() for v in variables]
    logs = trainer._make_loop(*trainer._iterators(0))(tf.constant(1))
    assert all(np.isfinite(float(v)) for v in logs.values())
    moved = [not np.allclose(b, v.numpy()) for b, v in zip(before, variables)]
    assert all(moved[:n1]) and all(moved[n1:])


def test_describe_counts_both_networks(capsys):
    assert main.main(["describe", "--method", "cps", "--preset", "smoke"]) == 0
    counts = json.loads(capsys.readouterr().out)["parameters"]
    cfg = config.resolve("smoke", method="cps")
    nets = spec("cps").build_networks(cfg, cfg.data.image_size, 1)
    assert set(counts) == {"student", "student2"}
    assert counts == {k: int(m.count_params()) for k, m in nets.items()}
    assert counts["student"] == counts["student2"] > 1000


# ------------------------------------------------------------------ end to end
def test_smoke_training_end_to_end(tmp_path):
    out = tmp_path / "cps"
    assert main.main(["train", "--method", "cps", "--preset", "smoke", "--out", str(out), "--no-progress"]) == 0
    history = run_dir.read_history(out)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    for row in history:
        assert float(row["unsup_weight"]) == pytest.approx(1.5) and float(row["rampup"]) == 1.0
        assert float(row["loss_unsup"]) > 0 and float(row["loss_sup2"]) > 0
        # loss = L_sup(1) + L_sup(2) + w * L_cps, each an epoch mean of per-step values
        assert float(row["loss"]) == pytest.approx(float(row["loss_sup"]) + float(row["loss_sup2"])
                                                   + 1.5 * float(row["loss_unsup"]), rel=1e-4)
        assert 0.0 <= float(row["pseudo_dice"]) <= 1.0
        assert 0.0 <= float(row["val_dice"]) <= 1.0 and 0.0 <= float(row["val_dice_student2"]) <= 1.0
    export = json.loads((out / "export.json").read_text())
    assert export["network"] == "student" and export["validated"] == ["student", "student2"]
    assert (out / "best_model.keras").exists() and (out / "metrics.json").exists()


def test_smoke_cutmix_runs(tmp_path):
    out = tmp_path / "cps_cutmix"
    assert main.main(["train", "--method", "cps", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", "cps.cutmix=true", "train.epochs=1", "train.steps_per_epoch=2"]) == 0
    (row,) = run_dir.read_history(out)
    assert float(row["loss_unsup"]) > 0 and 0.0 <= float(row["val_dice_student2"]) <= 1.0


def test_bad_cutmix_areas_exit_2(capsys):
    assert main.main(["describe", "--method", "cps", "--set", "cps.cutmix_min_area=0.6",
                      "cps.cutmix_max_area=0.5"]) == 2
    assert "cps.cutmix_min_area" in capsys.readouterr().err


# ------------------------------------------------------------------ one replica = two
STEPS = 3
# exact: BatchNorm off, Adam: every sum is the same up to its order, so the house's float32 bounds hold.
# bn: BatchNorm on and synchronised (statistics over the global batch, as one replica sees them) with
#   SGD. Keras' synchronised BN computes the variance in one pass (E[x^2] - E[x]^2 from all-reduced
#   sums), one replica in two: measured here, the first step's losses then agree to 8e-7 (relative) and
#   SGD's weights to 1.3e-5 after one step, 1.3e-4 after three (lr 0.1); Adam's first steps (m/sqrt(v))
#   would turn such round-off in near-zero gradients into differences as large as the learning rate.
# Both: dropout off (Keras draws the same mask on every replica, which one replica over the whole batch
# cannot match) and CutMix off (the default; its boxes are drawn per replica by design).
SETUPS = {"exact": (["model.batchnorm=false"], LOSS_RTOL, WEIGHT_ATOL),
          "bn": (["model.sync_batchnorm=true", "train.optimizer=sgd", "train.lr=0.1"], 3e-4, 5e-3)}
# The BatchNorm setup traces four more networks: about a minute more on 2 cores, so slow.
@pytest.mark.parametrize("setup", ["exact", pytest.param("bn", marks=pytest.mark.slow)])
def test_one_replica_equals_two_mirrored(setup, tmp_path):
    sets, loss_rtol, weight_atol = SETUPS[name := setup]
    results, single, mirrored = one_vs_two_replicas(tmp_path, "cps", ["model.dropout=0", *sets], steps=STEPS)
    one, two = results["none"], results["mirrored"]
    for key in ("loss", "loss_sup", "loss_sup2", "loss_unsup"):
        losses = [log[key] for log in one["logs"]]
        assert len(set(losses)) == STEPS, (name, key)                   # training moves it
        np.testing.assert_allclose([log[key] for log in two["logs"]], losses, rtol=loss_rtol, err_msg=name)
    start = start_weights(tmp_path)
    assert len(single) == len(mirrored) == len(start)
    # The bound is far below what training moved (so a wrong all-reduce could not hide in it).
    moved = max(float(np.abs(a - s).max()) for a, s in zip(single, start))
    gap = max(float(np.abs(a - b).max()) for a, b in zip(single, mirrored))
    print(f"\n{name}: weights moved up to {moved:.2e}, one vs two replicas differ by up to {gap:.2e}")
    assert moved > 10 * weight_atol, name
    for a, b in zip(single, mirrored):          # both networks, BN moving statistics included
        np.testing.assert_allclose(b, a, atol=weight_atol, err_msg=name)
