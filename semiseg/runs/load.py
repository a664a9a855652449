"""Loading a finished run: its config, its exported network (best model or latest checkpoint), and
the provenance that says which network that is (RUN/export.json). No training code is imported:
`predict`, `evaluate` and notebooks load runs through here.

    python main.py evaluate runs/mt --checkpoint latest
    python -c "from semiseg.runs.load import load_run_model; cfg, model, name = load_run_model('runs/mt')"

'best' is RUN/best_model.keras as saved. 'latest' is the newest checkpoint in RUN/checkpoints,
restored into freshly built networks of the run's method (semiseg.models.networks, the same
builders training used) and the network export.json names is returned.
"""
from __future__ import annotations

import json
from pathlib import Path

from semiseg import config
from semiseg.runs.run_dir import EXPORT_FILE, RunDirError, read_export_record


def load_keras_model(path):
    """A saved .keras network of a run, its semiseg layers included. Keras finds a custom layer only
    once its class is registered, which happens when semiseg.models.transformer is imported: a fresh
    process (`predict` on a MIRA-U or hybrid run) has not imported it yet."""
    import keras
    from semiseg.models import transformer  # noqa: F401  (registers SwinBlock, ... with Keras)
    return keras.saving.load_model(path, compile=False)


def load_run_config(run_dir) -> config.Config:
    run = Path(run_dir)
    if not run.is_dir():
        raise RunDirError(f"run folder {run} does not exist")
    if not (run / "config.yaml").exists():
        raise RunDirError(f"{run} is not a run folder (no config.yaml)")
    return config.load_saved_config(run / "config.yaml")


def exported_network(run: Path, cfg, names) -> tuple[str, str]:
    """(network name, checkpoint attribute) of the network the run exports: RUN/export.json, which
    training writes when it starts; runs made before that record existed fall back to
    `exported_network_name`."""
    record = read_export_record(run)
    if record is None:
        name = exported_network_name(run, cfg, names)
        return name, name
    if record["checkpoint_key"] not in names:
        raise RunDirError(f"{run / EXPORT_FILE}: checkpoint_key {record['checkpoint_key']!r} is not a network of "
                          f"{cfg.method} ({', '.join(names)})")
    return record["network"], record["checkpoint_key"]


def exported_network_name(run: Path, cfg, names) -> str:
    """The rule for runs without RUN/export.json: metrics.json's 'model' when written, else
    train.export, else 'student' (the network the optimizer trains)."""
    metrics_path = run / "metrics.json"
    if metrics_path.exists():
        try:
            name = json.loads(metrics_path.read_text()).get("model")
        except (OSError, ValueError):
            name = None
        if name in names:
            return name
    if cfg.train.export in names:
        return cfg.train.export
    return "student" if "student" in names else next(iter(names))


def _run_channels(run: Path, cfg) -> int:
    """Input channels of the run's networks: the config's, else the exported model's input, else
    the data loader's rule for channels=0 (grey for synthetic/msd, RGB otherwise)."""
    if cfg.data.channels:
        return int(cfg.data.channels)
    if (run / "best_model.keras").exists():
        return int(load_keras_model(run / "best_model.keras").inputs[0].shape[-1])
    return 1 if cfg.data.format in ("synthetic", "msd") else 3


def load_run_model(run_dir, checkpoint: str = "best"):
    """(cfg, keras model, network name) of a run: 'best' = best_model.keras; 'latest' = the newest
    checkpoint in RUN_DIR/checkpoints restored into freshly built networks of the run's method."""
    run = Path(run_dir)
    cfg = load_run_config(run)
    if checkpoint == "best":
        path = run / "best_model.keras"
        if not path.exists():
            raise RunDirError(f"{run} has no best_model.keras yet (training has not finished an epoch); "
                              f"try --checkpoint latest")
        model = load_keras_model(path)
        record = read_export_record(run)
        return cfg, model, record["network"] if record else exported_network_name(run, cfg, ["student", "teacher"])
    if checkpoint != "latest":
        raise RunDirError(f"--checkpoint must be best or latest, got {checkpoint!r}")
    from semiseg.models.outputs import main_output
    networks, _ = latest_networks(run, cfg)
    name, key = exported_network(run, cfg, list(networks))
    return cfg, main_output(networks[key]), name


def latest_networks(run: Path, cfg) -> tuple[dict, str]:
    """({role: network} of every network of the run's method, built in the precision the run trained
    in and restored from its newest checkpoint; that checkpoint's path)."""
    import keras
    import tensorflow as tf
    from semiseg.models.networks import method_networks, model_variables
    latest = tf.train.latest_checkpoint(str(run / "checkpoints"))
    if latest is None:
        raise RunDirError(f"{run / 'checkpoints'}: no checkpoint found")
    channels = _run_channels(run, cfg)
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(run_precision(run, cfg))   # build the networks as trained
    try:
        networks = method_networks(cfg.method, cfg, cfg.data.image_size, channels)
    finally:
        keras.mixed_precision.set_global_policy(previous)
    # expect_partial: the optimizer and counters in the checkpoint are not needed here. Restored
    # through model_variables: through the networks alone some variables would be missed.
    tf.train.Checkpoint(model_variables=model_variables(networks)).restore(latest).expect_partial()
    return networks, latest


def run_precision(run: Path, cfg) -> str:
    """The dtype policy a run trained with: run_info.json's resolved `precision` (config.yaml may say
    "auto", which another machine would resolve differently), else config.yaml's value resolved here."""
    try:
        recorded = json.loads((Path(run) / "run_info.json").read_text()).get("precision")
    except (OSError, ValueError):
        recorded = None
    if recorded:
        return recorded
    from semiseg import precision
    return precision.resolve(cfg.train.precision)[0]


def model_channels(model) -> int:
    return int(model.inputs[0].shape[-1])
