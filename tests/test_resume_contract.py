"""The --resume contract: a run is continued as it was trained; only outer-loop settings may change.

    python -m pytest tests/test_resume_contract.py -q

One finished supervised smoke run (2 epochs of 2 steps) and one preempted after its first step are
trained once per module and copied per test.
Every refusal exits 2 naming both values (or the key) and leaves the run byte-identical; a finished
run resumed as it is exits 0 before TensorFlow loads and touches nothing; raising train.epochs
trains the extra epoch and evaluates again.
"""
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest
import yaml

from semiseg import cli as main
from semiseg.runs import run_dir
from semiseg.training import trainer as train_ssl_tf2
from test_equivalence import SUBPROCESS_TIMEOUT_S, python_env


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "finished"
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", "train.epochs=2", "train.steps_per_epoch=2", "train.steps_per_loop=2"]) == 0
    return out


@pytest.fixture(scope="module")
def preempted_run(tmp_path_factory):
    """A real unfinished run: SIGUSR1 to this process after its first step (exit 75, as under SLURM)."""
    out = tmp_path_factory.mktemp("resume") / "preempted"
    real_make_loop = train_ssl_tf2.Trainer._make_loop

    def interrupting_make_loop(self, *iterators):
        loop = real_make_loop(self, *iterators)

        def first_call_then_signal(n):
            result = loop(n)
            os.kill(os.getpid(), signal.SIGUSR1)
            return result
        return first_call_then_signal

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(train_ssl_tf2.Trainer, "_make_loop", interrupting_make_loop)
        assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(out), "--no-progress",
                          "--set", "train.epochs=2", "train.steps_per_epoch=2", "train.steps_per_loop=1"]) == 75
    assert json.loads((out / "run_info.json").read_text())["status"] == "preempted"
    return out


@pytest.fixture
def run(finished_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(finished_run, copy)
    return copy


@pytest.fixture
def unfinished(preempted_run, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(preempted_run, copy)
    return copy


def snapshot(folder):
    """Every file's bytes (hashed) and every folder, by relative path."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}


def resume(run, *extra):
    return main.main(["train", "--out", str(run), "--resume", "--no-progress", *extra])


@pytest.mark.parametrize("extra, fragments", [
    (["--method", "mixmatch", "--set", "train.batch_size=3"], ["--method mixmatch", "--method supervised"]),
    (["--preset", "cpu"], ["--preset cpu", "--preset smoke"]),
    (["--data", "/elsewhere/isic"], ["--data /elsewhere/isic", "(none)"]),
    (["--format", "isic"], ["--format isic", "--format synthetic"]),
    (["--set", "train.batch_size=3"], ["train.batch_size", "4", "3", "train.patience"]),
    (["--set", "train.steps_per_epoch=5"], ["train.steps_per_epoch", "train.epochs"]),
    (["--set", "data.labeled_fraction=0.5"], ["data.labeled_fraction", "0.25", "0.5"]),
    (["--set", "seed=1"], ["seed", "start a new run"]),
    (["--set", "train.epochs=1"], ["train.epochs", "only upwards", "has 2, asked 1"]),
    (["--set", "train.bogus=1"], ["train.bogus"]),
])
def test_refusal_exits_2_names_both_values_and_leaves_the_run_untouched(run, capsys, extra, fragments):
    before = snapshot(run)
    assert resume(run, *extra) == 2
    err = capsys.readouterr().err
    assert all(f in err for f in fragments), err
    assert snapshot(run) == before


def test_config_file_that_disagrees_is_refused(run, tmp_path, capsys):
    other = tmp_path / "other.yaml"
    other.write_text(yaml.safe_dump({"train": {"lr": 0.5}}))
    before = snapshot(run)
    assert resume(run, "--config", str(other)) == 2
    err = capsys.readouterr().err
    assert "train.lr" in err and "0.5" in err and "0.001" in err
    assert snapshot(run) == before


def test_epochs_cannot_grow_under_a_decaying_schedule(run, capsys):
    """A cosine run's LR horizon is steps_per_epoch * epochs: more epochs would re-stretch it."""
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["train"]["schedule"] = "cosine"
    (run / "config.yaml").write_text(yaml.safe_dump(saved, sort_keys=False))
    before = snapshot(run)
    assert resume(run, "--set", "train.epochs=3") == 2
    err = capsys.readouterr().err
    assert "train.epochs" in err and "cosine" in err
    assert snapshot(run) == before


# A fresh interpreter: the finished run must be answered before TensorFlow is imported.
PROBE = textwrap.dedent("""
    import sys, main
    rc = main.main(sys.argv[1:])
    print("RESULT", rc, "tensorflow" in sys.modules)
""")


def test_finished_run_resumed_as_it_is_exits_0_before_tensorflow_untouched(run, tmp_path):
    before = snapshot(run)
    # The same method, preset and settings given again (as a requeued batch job does) are fine.
    proc = subprocess.run([sys.executable, "-c", PROBE, "train", "--method", "supervised", "--preset", "smoke",
                           "--out", str(run), "--resume", "--set", "train.batch_size=4", "train.patience=3"],
                          capture_output=True, text=True, cwd=tmp_path, env=python_env(), timeout=SUBPROCESS_TIMEOUT_S)
    assert "RESULT 0 False" in proc.stdout, (proc.stdout + proc.stderr)[-3000:]
    assert f"run {run} already finished (completed, epoch 2/2); nothing to train" in proc.stdout
    assert "--resume --set train.epochs=N" in proc.stdout
    assert snapshot(run) == before


def test_early_stopped_run_needs_patience_to_train_on(run, capsys):
    info = json.loads((run / "run_info.json").read_text())
    info["status"] = "early_stopped"
    (run / "run_info.json").write_text(json.dumps(info))
    before = snapshot(run)
    assert resume(run, "--set", "train.epochs=5") == 0
    out = capsys.readouterr().out
    assert "already finished (early_stopped, epoch 2/5)" in out and "train.patience=P" in out
    assert snapshot(run) == before


def test_more_epochs_train_one_more_epoch_and_evaluate_again(run, capsys):
    before = json.loads((run / "metrics.json").read_text())
    assert resume(run, "--set", "train.epochs=3", "train.patience=4") == 0
    assert "resumed from" in capsys.readouterr().out
    history = run_dir.read_history(run)
    assert [int(r["epoch"]) for r in history] == [1, 2, 3]
    assert int(history[-1]["step"]) == 6                       # 2 steps per epoch, continued
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["train"]["epochs"] == 3 and saved["train"]["patience"] == 4
    info = json.loads((run / "run_info.json").read_text())
    assert info["status"] == "completed" and len(info["sessions"]) == 2
    assert info["sessions"][-1]["changed"] == {"train.epochs": [2, 3], "train.patience": [0, 4]}
    after = json.loads((run / "metrics.json").read_text())
    assert after["n_cases"] == before["n_cases"] and 0.0 <= after["dice"] <= 1.0


@pytest.mark.parametrize("key_value", ["train.batch_size=2", "train.steps_per_epoch=3", "data.shuffle_buffer=8",
                                       "train.lr=0.01", "train.epochs=1"])
def test_unfinished_run_refuses_changes_to_what_was_trained(unfinished, capsys, key_value):
    """Mid-run, a new batch size or steps per epoch would move the data-stream position and the
    epoch boundaries under the saved step; the run folder stays byte-identical."""
    before = snapshot(unfinished)
    assert resume(unfinished, "--set", key_value) == 2
    key = key_value.split("=")[0]
    assert key in capsys.readouterr().err
    assert snapshot(unfinished) == before


def test_unfinished_run_resumed_with_allowed_changes_equals_the_uninterrupted_run(unfinished, finished_run):
    """Preempted after step 1 with steps_per_loop=1, resumed with steps_per_loop=2 and another
    eval_batch_size: the same losses and validation Dice as the run never interrupted (which ran
    steps_per_loop=2 throughout), so both keys really leave the training as it was."""
    assert resume(unfinished, "--set", "train.steps_per_loop=2", "train.eval_batch_size=4") == 0
    cut, straight = run_dir.read_history(unfinished), run_dir.read_history(finished_run)
    assert [r["step"] for r in cut] == [r["step"] for r in straight] == ["2", "4"]
    for key in ("loss", "loss_dice", "loss_bce", "val_dice"):
        assert [float(r[key]) for r in cut] == pytest.approx([float(r[key]) for r in straight], rel=1e-5, abs=1e-6)
    info = json.loads((unfinished / "run_info.json").read_text())
    assert info["status"] == "completed"
    assert info["sessions"][-1]["changed"] == {"train.steps_per_loop": [1, 2], "train.eval_batch_size": [8, 4]}
