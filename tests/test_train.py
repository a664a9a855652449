"""End-to-end training on the embedded data set (smoke preset), in-process with real Keras/TF."""
import json
import os
import signal

import numpy as np
import pytest
import yaml

from semiseg import cli as main
from semiseg.runs import run_dir
from semiseg.training import trainer as train_ssl_tf2
from semiseg.methods import get_method

RUN_FILES = ["config.yaml", "splits.json", "export.json", "history.csv", "checkpoints", "metrics.json",
             "per_case.csv", "run_info.json", "best_model.keras"]


def _train(out, *extra, method="supervised"):
    return main.main(["train", "--method", method, "--preset", "smoke", "--out", str(out), "--no-progress", *extra])


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "smoke"
    assert _train(out, "--set", "train.epochs=2") == 0
    return out


def test_smoke_run_writes_every_file(smoke_run):
    for name in RUN_FILES:
        assert (smoke_run / name).exists(), name
    metrics = json.loads((smoke_run / "metrics.json").read_text())
    assert 0.0 <= metrics["dice"] <= 1.0 and metrics["n_cases"] > 0
    history = run_dir.read_history(smoke_run)
    assert [int(r["epoch"]) for r in history] == [1, 2]
    assert all(np.isfinite(float(r["loss"])) for r in history)
    info = json.loads((smoke_run / "run_info.json").read_text())
    assert info["status"] == "completed" and info["tensorflow"] and "train" in info["argv"]
    cfg = yaml.safe_load((smoke_run / "config.yaml").read_text())
    assert cfg["method"] == "supervised" and cfg["preset"] == "smoke"
    export = json.loads((smoke_run / "export.json").read_text())
    assert (export["network"], export["checkpoint_key"], metrics["model"]) == ("student", "student", "student")
    # What the run is, in metrics.json and run_info.json alike (flat keys for tables of runs).
    wanted = {"run": "smoke", "method": "supervised", "preset": "smoke", "seed": cfg["seed"],
              "labeled_fraction": cfg["data"]["labeled_fraction"], "data_format": "synthetic",
              "data_set": "synthetic v2", "network": "student"}
    assert {k: metrics.get(k) for k in wanted} == wanted
    assert {k: info.get(k) for k in wanted} == wanted
    per_case = (smoke_run / "per_case.csv").read_text().splitlines()
    run_column = per_case[0].split(",").index("run")
    assert len(per_case) - 1 == metrics["n_cases"] and {line.split(",")[run_column] for line in per_case[1:]} == {"smoke"}


def test_existing_out_is_refused_and_untouched(smoke_run, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()}
    assert _train(smoke_run) == 2
    assert "already exists" in capsys.readouterr().err
    assert {p.name: p.stat().st_mtime_ns for p in smoke_run.iterdir()} == before


def test_one_step_changes_weights_and_gives_finite_loss(tmp_path):
    import tensorflow as tf
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    cfg = config.resolve("smoke")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("supervised")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    before = [w.numpy().copy() for w in trainer.trainable_variables()]
    loop = trainer._make_loop(*trainer._iterators(0))
    logs = loop(tf.constant(1))
    assert np.isfinite(float(logs["loss"])) and float(logs["loss"]) > 0
    changed = [not np.allclose(b, w.numpy()) for b, w in zip(before, trainer.trainable_variables())]
    assert all(changed)
    assert int(trainer.optimizer.iterations.numpy()) == 1


def test_restoring_another_stages_checkpoint_leaves_the_step_counter_alone(tmp_path):
    """MIRA-U restores its stage-1 checkpoints (which hold no training step) with restore_latest;
    their number once became the stage-2 step counter, shifting stage 2's ramps and data stream."""
    import tensorflow as tf
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    cfg = config.resolve("smoke")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("supervised")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    other = tf.Variable(3.0)
    manager = tf.train.CheckpointManager(tf.train.Checkpoint(other=other), str(tmp_path), max_to_keep=1)
    manager.save(checkpoint_number=5)
    other.assign(0.0)
    assert trainer.restore_latest(tf.train.Checkpoint(other=other), tmp_path) == 5
    assert float(other.numpy()) == 3.0 and int(trainer.steps_taken.numpy()) == 0


def test_resume_after_interruption_matches_uninterrupted(tmp_path, monkeypatch):
    """Preempt mid-epoch (a real SIGUSR1 to this process), resume, and compare with a run that
    was never interrupted: same steps, same losses, same validation Dice."""
    common = ["--set", "train.epochs=2", "train.steps_per_epoch=4", "train.steps_per_loop=1"]
    assert _train(tmp_path / "straight", *common) == 0

    real_make_loop = train_ssl_tf2.Trainer._make_loop

    def interrupting_make_loop(self, *its):
        loop, calls = real_make_loop(self, *its), [0]

        def wrapped(n):
            out = loop(n)
            calls[0] += 1
            if calls[0] == 6:                  # in epoch 2, after step 6 of 8
                os.kill(os.getpid(), signal.SIGUSR1)
            return out
        return wrapped

    monkeypatch.setattr(train_ssl_tf2.Trainer, "_make_loop", interrupting_make_loop)
    assert _train(tmp_path / "cut", *common) == train_ssl_tf2.EXIT_PREEMPTED
    assert json.loads((tmp_path / "cut" / "run_info.json").read_text())["status"] == "preempted"
    assert len(run_dir.read_history(tmp_path / "cut")) == 1
    monkeypatch.setattr(train_ssl_tf2.Trainer, "_make_loop", real_make_loop)
    assert main.main(["train", "--out", str(tmp_path / "cut"), "--resume", "--no-progress"]) == 0

    a, b = run_dir.read_history(tmp_path / "straight"), run_dir.read_history(tmp_path / "cut")
    assert [r["step"] for r in b] == ["4", "8"]
    for key in ("loss", "loss_dice", "loss_bce", "val_dice"):
        np.testing.assert_allclose([float(r[key]) for r in b], [float(r[key]) for r in a], rtol=1e-5, atol=1e-6)
    ma = json.loads((tmp_path / "straight" / "metrics.json").read_text())
    mb = json.loads((tmp_path / "cut" / "metrics.json").read_text())
    assert ma["dice"] == pytest.approx(mb["dice"], abs=1e-6)


def test_describe_prints_parameter_counts(capsys):
    assert main.main(["describe", "--method", "supervised", "--preset", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["parameters"]["student"] > 100_000


def test_dry_run_reports_the_run_and_writes_no_run_folder(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)         # where a default runs/ folder would appear
    out = tmp_path / "never"
    assert main.main(["train", "--method", "mean_teacher", "--preset", "smoke", "--out", str(out), "--dry-run",
                      "--dry-run-steps", "2", "--no-progress", "--set", "train.epochs=5"]) == 0
    assert not out.exists() and not (tmp_path / "runs").exists()
    text = capsys.readouterr().out
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    from semiseg.methods import get_method
    cfg = config.resolve("smoke", overrides=["train.epochs=5"], method="mean_teacher")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    steps = data_loader_tf2.steps_per_epoch(cfg, bundle)
    splits = ", ".join(f"{s} {len(bundle.splits[s])}" for s in data_loader_tf2.SPLITS)
    params = get_method("mean_teacher").build_networks(cfg, bundle.image_size, bundle.channels)["student"].count_params()
    assert f"splits (cases): {splits}" in text
    assert f"steps per epoch: {steps} " in text and f"total steps: {5 * steps} (5 epochs x {steps}" in text
    assert f"parameters: student {params:,}, teacher {params:,}" in text
    assert "memory estimate per replica:" in text and "optimizer slots" in text
    assert f"ms/step x {5 * steps} steps" in text and "estimate from 2 timed steps on this machine" in text


def test_dry_run_memory_estimate_counts_adam_slots_and_gradients():
    import tensorflow as tf
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    from semiseg.training import dry_run
    cfg = config.resolve("smoke")
    bundle = data_loader_tf2.prepare_data(cfg, log=lambda m: None, progress=False)
    trainer = get_method("supervised")(cfg, bundle, tf.distribute.get_strategy(), log=lambda m: None)
    memory = dry_run.memory_estimate(trainer)
    trainable = sum(int(np.prod(v.shape)) for v in trainer.trainable_variables())
    assert memory["gradients"] == 4 * trainable
    assert 8 * trainable <= memory["optimizer"] <= 8 * trainable + 64     # Adam: m and v, plus counters
    assert memory["weights"] >= 4 * trainable
    per_image = dry_run.layer_output_elements(trainer.models["student"])
    assert per_image > cfg.data.image_size ** 2 and memory["activations"] == per_image * cfg.train.batch_size * 4 * 2
    assert memory["total"] == sum(memory[k] for k in ("weights", "gradients", "optimizer", "activations"))
