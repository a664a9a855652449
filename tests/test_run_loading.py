"""Loading a finished run (semiseg/runs/load.py) needs no training code.

    python -m pytest tests/test_run_loading.py -q

In a fresh Python process, `semiseg.runs.load` and every `semiseg.evaluation` module load the best
model and the latest checkpoint of a run (and, for MIRA-U, its uncertainty teacher), and no
semiseg.training or semiseg.methods module is imported. After one epoch the best model and the
latest checkpoint hold the same weights, so their predictions must agree: the checkpoint was
restored into the right networks. MIRA-U's run is checked in tests/test_mira_u.py's end-to-end
run (slow), with the same helper.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from semiseg import cli as main

REPO = Path(__file__).resolve().parents[1]

_SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np
    from semiseg.runs import load
    from semiseg.evaluation import evaluate, metrics, predict
    run, uncertainty = sys.argv[1], sys.argv[2] == "1"
    out, outputs = {}, {}
    for checkpoint in ("best", "latest"):
        cfg, model, name = load.load_run_model(run, checkpoint)
        size, channels = cfg.data.image_size, load.model_channels(model)
        images = np.random.default_rng(0).uniform(size=(2, size, size, channels)).astype("float32")
        outputs[checkpoint] = np.asarray(model(images, training=False), dtype="float32")
        out[checkpoint] = name
    out["max_abs_difference"] = float(np.abs(outputs["best"] - outputs["latest"]).max())
    out["output_std"] = float(outputs["best"].std())
    predictor = predict.Predictor(run, checkpoint="latest", uncertainty=uncertainty)
    picture = np.random.default_rng(1).uniform(size=(20, 24, predictor.channels)).astype("float32")
    out["predict_shape"] = list(predictor.predict(picture).shape)
    if uncertainty:
        out["sigma_max"] = float(predictor.uncertainty_slices(picture[None]).max())
    # The methods' specs (semiseg/methods/<name>/__init__.py: config sections, network builders) are
    # not training code; their trainer modules and semiseg.training are.
    out["training_modules"] = sorted(m for m in sys.modules if m.startswith("semiseg.training")
                                     or (m.startswith("semiseg.methods.") and m.endswith(".trainer")))
    print(json.dumps(out))
""")


def load_in_fresh_process(run, uncertainty: bool = False) -> dict:
    """What loading `run` gives in a new interpreter (see _SCRIPT)."""
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, str(run), "1" if uncertainty else "0"], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def check_loaded(out: dict, network: str) -> None:
    assert out["training_modules"] == []
    assert out["best"] == out["latest"] == network
    assert out["output_std"] > 0.0                       # a real prediction, not a constant
    assert out["max_abs_difference"] < 1e-5, out         # latest restored == best after one epoch
    assert out["predict_shape"] == [20, 24]


def test_supervised_run_loads_without_training_code(one_epoch_run):
    check_loaded(load_in_fresh_process(one_epoch_run), "student")


def test_mean_teacher_run_loads_its_teacher_without_training_code(tmp_path):
    run = tmp_path / "mt"
    assert main.main(["train", "--method", "mean_teacher", "--preset", "smoke", "--out", str(run), "--no-progress",
                      "--set", "train.epochs=1"]) == 0
    network = json.loads((run / "export.json").read_text())["network"]
    assert network in ("student", "teacher")
    check_loaded(load_in_fresh_process(run), network)


def test_every_method_has_its_networks_for_loading():
    """A method trains the networks its spec builds, the ones loading builds to restore its
    checkpoints: one builder per method package, covering every method."""
    from semiseg import config, methods
    from semiseg.methods import get_method
    from semiseg.models import networks
    for name in methods.names():
        assert get_method(name).build_networks.__func__ is not None
        assert methods.spec(name).build_networks is not None
    cfg = config.resolve("smoke", overrides=["mira_u.student_swin_depth=1"], method="mira_u")
    built = get_method("mira_u").build_networks(cfg, 32, 1)
    assert sorted(built) == ["student", "student_ema", "teacher"]
    with pytest.raises(config.ConfigError, match="unknown method 'not_a_method'"):
        networks.method_networks("not_a_method", cfg, 32, 1)


def test_mira_u_run_loads_its_custom_layers_in_a_fresh_process(tmp_path):
    """A MIRA-U run folder as training leaves it (config.yaml, export.json, best_model.keras,
    teacher_best.keras, a checkpoint of every network under model_variables), made here from the
    networks training builds without the minutes of training; the real run is checked in
    tests/test_mira_u.py (slow). Before runs/load.py, a fresh `predict` could not read the
    hybrid student's Swin layers: Keras knows them only once semiseg.models.transformer is imported."""
    import tensorflow as tf
    from semiseg import config
    from semiseg.models import networks
    from semiseg.runs import run_dir
    cfg = config.resolve("smoke", overrides=["mira_u.student_swin_depth=1"], method="mira_u")
    run = tmp_path / "mira"
    run.mkdir()
    config.save_yaml(cfg, run / "config.yaml")
    nets = networks.method_networks("mira_u", cfg, cfg.data.image_size, 1)
    nets["student_ema"].save(run / "best_model.keras")
    nets["teacher"].save(run / run_dir.TEACHER_BEST_FILE)
    tf.train.Checkpoint(model_variables=networks.model_variables(nets)).save(str(run / "checkpoints" / "ckpt"))
    run_dir.write_export_record(run, {"network": "student_ema", "checkpoint_key": "student_ema"})
    out = load_in_fresh_process(run, uncertainty=True)
    check_loaded(out, "student_ema")
    assert 0.0 < out["sigma_max"] <= 0.5                 # the teacher's MC dropout really sampled
