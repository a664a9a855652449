"""A training checkpoint that cannot be written, and RUN/export.json, on one real Mean Teacher run.

In a child process: `train --method mean_teacher --preset smoke` for one epoch (checkpoints
ckpt-2, ckpt-3), then `--resume` under RLIMIT_FSIZE (SIGXFSZ ignored: writes past the limit fail
with EFBIG, as on a full disk) so that the first mid-epoch checkpoint (ckpt-4) fails. Then, with
the limit lifted, the run is evaluated with `--checkpoint latest`: export.json says the teacher,
so the teacher is scored and named (the old rule guessed 'student' for an unfinished run).
"""
import json
import subprocess
import os
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import contextlib, io, json, resource, signal, sys
    from pathlib import Path
    from semiseg import cli as main
    run = Path(sys.argv[1])
    out = {}
    fast = ["--no-progress", "--set", "model.base_filters=16", "train.steps_per_loop=1", "train.checkpoint_every=1"]
    out["train_rc"] = main.main(["train", "--method", "mean_teacher", "--preset", "smoke", "--out", str(run),
                                 *fast, "train.epochs=1"])
    (run / "best_model.keras").unlink()     # as if training had stopped before its first export
    (run / "metrics.json").unlink()

    # A checkpoint of this model is ~1.9 MB; config.yaml, run_info.json, export.json stay far below 64 KiB.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (65536, resource.RLIM_INFINITY))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        out["resume_rc"] = main.main(["train", "--out", str(run), "--resume", "--no-progress", "--set", "train.epochs=2"])
    out["resume_stderr"] = stderr.getvalue()
    resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))

    import tensorflow as tf
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    reader = tf.train.load_checkpoint(latest)
    out["latest"] = latest
    out["latest_tensors"] = sum(int(reader.get_tensor(k) is not None) for k in reader.get_variable_to_shape_map())
    out["checkpoint_files"] = sorted(p.name for p in (run / "checkpoints").iterdir())

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        out["evaluate_rc"] = main.main(["evaluate", str(run), "--checkpoint", "latest"])
    out["evaluate_stdout"] = stdout.getvalue()
    out["metrics"] = json.loads((run / "eval" / "test_latest" / "metrics.json").read_text())

    # What each network of the latest checkpoint scores on the test split
    from semiseg.data import loader as data_loader_tf2
    from semiseg.evaluation import evaluate as evaluation, predict
    from semiseg.methods import get_method
    from semiseg.runs import load as run_load
    cfg = run_load.load_run_config(run)
    nets = get_method("mean_teacher").build_networks(cfg, cfg.data.image_size, 1)
    tf.train.Checkpoint(**nets).restore(latest).expect_partial()
    bundle = data_loader_tf2.prepare_data(cfg, run_dir=run, log=lambda m: None)
    out["dice"] = {k: evaluation.evaluate(m, bundle, "test", 8)["dice"] for k, m in nets.items()}
    out["predictor_network"] = predict.Predictor(run, checkpoint="latest").network
    (run / "export.json").rename(run / "export.json.bak")          # a run made before the record
    out["fallback_network"] = run_load.load_run_model(run, "latest")[2]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def outcome(tmp_path_factory):
    folder = tmp_path_factory.mktemp("write_errors")
    script = folder / "scenario.py"
    script.write_text(_SCRIPT)
    run = folder / "mt"
    proc = subprocess.run([sys.executable, str(script), str(run)], capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run, json.loads(proc.stdout.strip().splitlines()[-1])


def test_failed_checkpoint_save_keeps_the_previous_one_and_names_the_path(outcome):
    run, out = outcome
    assert out["train_rc"] == 0
    assert out["resume_rc"] == 74          # main.EXIT_WRITE_FAILED: an error message, no traceback
    message = out["resume_stderr"].strip()
    ckpt = run / "checkpoints"
    assert message.startswith(f"error: cannot write {ckpt / 'ckpt-4'}: ") and "File too large" in message
    assert f"the previous checkpoint, {ckpt / 'ckpt-3'}, is kept" in message
    assert "Traceback" not in message and len(message.splitlines()) == 1
    # latest still points to the complete checkpoint of step 3, and every tensor of it reads back
    assert out["latest"] == str(ckpt / "ckpt-3") and out["latest_tensors"] > 50
    assert out["checkpoint_files"] == ["checkpoint", "ckpt-2.data-00000-of-00001", "ckpt-2.index",
                                       "ckpt-3.data-00000-of-00001", "ckpt-3.index"]   # no ckpt-4_temp left


def test_export_record_written_at_start_names_the_teacher(outcome):
    run, out = outcome
    record = json.loads((run / "export.json.bak").read_text())
    assert (record["network"], record["checkpoint_key"], record["validated"]) == ("teacher", "teacher",
                                                                                  ["teacher", "student"])
    assert record["reason"].startswith("train.export=auto: the first network mean_teacher validates")


def test_latest_checkpoint_of_an_unfinished_run_scores_the_exported_teacher(outcome):
    _, out = outcome
    assert out["evaluate_rc"] == 0
    assert "(teacher network, latest checkpoint)" in out["evaluate_stdout"]
    assert out["metrics"]["model"] == "teacher"
    assert out["dice"]["teacher"] != out["dice"]["student"]
    assert out["metrics"]["dice"] == pytest.approx(out["dice"]["teacher"], abs=1e-9)
    assert out["predictor_network"] == "teacher"
    assert out["fallback_network"] == "student"         # no record: today's rule, unchanged
