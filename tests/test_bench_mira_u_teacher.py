"""bench/mira_u_teacher.py: the frozen variant trains exactly stage 2's head (the encoder keeps its
stage-1 weights), finetune and scratch train the encoder too, scratch starts from other weights,
and the script reads a run folder end to end and refuses one that is not a MIRA-U run.

    python -m pytest tests/test_bench_mira_u_teacher.py
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf

from semiseg import config
from semiseg.data import loader
from semiseg.methods import get_method
from semiseg.training.trainer import save_model_atomic

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import mira_u_teacher  # noqa: E402

SMOKE = ["mira_u.student_swin_depth=1", "mira_u.probe_cases=4", "mira_u.mc_samples=2", "train.precision=float32"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A MIRA-U run folder as stage 1 leaves it (settings, splits, teacher_mim.keras), made directly:
    training the smoke run would spend minutes tracing the hybrid student this script never uses."""
    folder = tmp_path_factory.mktemp("mira") / "run"
    folder.mkdir()
    cfg = config.resolve("smoke", overrides=SMOKE, method="mira_u")
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("mira_u")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    config.save_yaml(cfg, folder / "config.yaml")
    (folder / "splits.json").write_text(json.dumps(bundle.splits))
    save_model_atomic(trainer.models["teacher"], folder / "teacher_mim.keras")
    return folder, trainer


def _weights(variables):
    return [v.numpy().copy() for v in variables]


def test_frozen_trains_the_head_only_and_finetune_the_encoder_too(run):
    folder, trainer = run
    teacher = trainer.models["teacher"]
    parts = teacher.part_weights()
    encoder = [v for v in parts["encoder"] if v.trainable]
    stage1 = _weights(encoder)

    frozen = mira_u_teacher.train_variant(trainer, "frozen", folder / "teacher_mim.keras", 3, 3, log=lambda m: None)
    head = [v for v in parts["seg_head"] if v.trainable]
    assert frozen["trained_parameters"] == sum(v.shape.num_elements() for v in head)
    for before, after in zip(stage1, _weights(encoder)):
        np.testing.assert_array_equal(before, after)             # the seed's stage 2: encoder frozen
    assert [r["step"] for r in frozen["curve"]] == [3]
    assert 0.0 <= frozen["best_val_dice"] <= 1.0 and 0.0 <= frozen["pseudo_dice_at_best"] <= 1.0

    finetune = mira_u_teacher.train_variant(trainer, "finetune", folder / "teacher_mim.keras", 3, 3,
                                            log=lambda m: None)
    mask_token = teacher.mask_token.shape.num_elements()         # stage 1 only: no gradient here
    assert finetune["trained_parameters"] == frozen["trained_parameters"] + sum(
        v.shape.num_elements() for v in encoder) - mask_token
    changed = [not np.array_equal(b, a) for b, a in zip(stage1, _weights(encoder))]
    assert sum(changed) >= len(encoder) - 1                      # every encoder weight moved but the mask token

    mira_u_teacher.reset_teacher(trainer, "scratch", folder / "teacher_mim.keras")
    assert not np.array_equal(stage1[2], encoder[2].numpy())     # patch embedding re-drawn, not stage 1's
    mira_u_teacher.reset_teacher(trainer, "frozen", folder / "teacher_mim.keras")
    np.testing.assert_array_equal(stage1[2], encoder[2].numpy())  # and the stage-1 weights come back


def _script(*args):
    return subprocess.run([sys.executable, str(REPO / "bench" / "mira_u_teacher.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_script_reads_a_run_folder_and_writes_its_json(run, tmp_path):
    folder, _ = run
    out = tmp_path / "teacher.json"
    proc = _script(folder, "--variants", "frozen", "--steps", "4", "--eval-every", "2", "--out", out)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert list(result["variants"]) == ["frozen"] and result["steps"] == 4
    curve = result["variants"]["frozen"]["curve"]
    assert [r["step"] for r in curve] == [2, 4] and all("pseudo_dice" in r for r in curve)
    assert result["labeled_cases"] == len(json.loads((folder / "splits.json").read_text())["labeled"])


def test_script_refuses_a_run_that_is_not_mira_u(one_epoch_run):
    proc = _script(one_epoch_run, "--steps", "1")
    assert proc.returncode != 0
    assert "config.yaml: method is 'supervised', not mira_u" in proc.stderr
    bad = _script(one_epoch_run, "--variants", "frozen,linear")
    assert bad.returncode == 2 and "--variants: ['linear']" in bad.stderr
