"""How good is each network of a finished run, in each mode it could produce targets in?

    python bench/target_modes.py RUN [RUN ...]          # e.g. runs of bench/label_efficiency.py
    python bench/target_modes.py RUN --json out.json

A semi-supervised method trains its student towards targets that one of its networks computes on the
unlabelled images: Mean Teacher's teacher in training mode (BatchNorm on the batch's statistics,
dropout on) on a noised view, FixMatch's network in inference mode on a weak view, MixMatch's
training-mode guesses. When the targets are worse than what the same network gives in inference
mode, the method trains on degraded targets. This restores the run's latest checkpoint and scores
every network on the run's unlabelled training images (against their hidden truth: the embedded
data set, or data.hide_labels=true) and on its validation split, in four modes:

    inference       model(x, training=False): BN moving statistics, no dropout (what evaluation uses)
    batch_bn        BN on the batch's statistics (moving statistics untouched), dropout off
    batch_bn+drop   ... and dropout on (Mean Teacher's teacher_bn=batch target, noise aside)
    +noise          ... on Mean Teacher's noised view (its noise settings; a fixed draw)

Batches hold 16 images, the size of the benchmark's training batch (8 labelled + 8 unlabelled), so
the batch statistics are those of a training-sized batch. Prints a table; --json writes it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

MODES = ("inference", "batch_bn", "batch_bn+drop", "+noise")
BATCH = 16


class _dropout_off:
    """Dropout layers of `model` pass their input through inside the block (rate 0 at trace time)."""

    def __init__(self, model):
        import keras
        self.layers = [layer for layer in model._flatten_layers() if isinstance(layer, keras.layers.Dropout)]

    def __enter__(self):
        self.rates = [layer.rate for layer in self.layers]
        for layer in self.layers:
            layer.rate = 0.0

    def __exit__(self, *exc):
        for layer, rate in zip(self.layers, self.rates):
            layer.rate = rate


def mode_fn(model, mode: str, cfg):
    """images -> foreground probabilities [B,H,W] of `model` in `mode` (traced per mode)."""
    import contextlib
    import tensorflow as tf
    from semiseg.methods.mean_teacher.trainer import PROBE_NOISE_SEED, noised_view
    from semiseg.models.batchnorm import frozen_bn_statistics
    from semiseg.models.outputs import probabilities

    def predict(images):
        images = tf.cast(images, tf.float32)
        if mode == "inference":
            return probabilities(tf.cast(model(images, training=False), tf.float32))[..., -1]
        # The noised view as Mean Teacher's probe draws it (its fixed seed).
        view = noised_view(images, cfg.mean_teacher, tf.constant(PROBE_NOISE_SEED, tf.int64)) if mode == "+noise" \
            else images
        dropout = contextlib.nullcontext() if mode in ("batch_bn+drop", "+noise") else _dropout_off(model)
        with frozen_bn_statistics(model), dropout:
            return probabilities(tf.cast(model(view, training=True), tf.float32))[..., -1]
    return tf.function(predict)


def score_run(run: Path) -> dict:
    from semiseg.data import loader
    from semiseg.evaluation import evaluate as evaluation
    from semiseg.models.outputs import main_output
    from semiseg.runs import load
    from semiseg.training import probe

    cfg = load.load_run_config(run)
    bundle = loader.prepare_data(cfg, run_dir=run, log=lambda m: None, progress=False)
    networks, latest = load.latest_networks(run, cfg)
    unlabeled = probe.probe_case_ids(cfg, bundle, 10 ** 6)
    scores = {"run": str(run), "checkpoint": Path(latest).name, "method": cfg.method,
              "unlabeled_cases": len(unlabeled), "networks": {}}
    for name, network in networks.items():
        model = main_output(network)
        rows = {}
        for mode in MODES:
            fn = mode_fn(model, mode, cfg)
            rows[mode] = {"unlabeled": evaluation.mean_case_dice(fn, bundle, None, BATCH, unlabeled) if unlabeled
                          else float("nan"),
                          "val": evaluation.mean_case_dice(fn, bundle, "val", BATCH)}
        scores["networks"][name] = rows
    return scores


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    results = []
    for run in args.runs:
        result = score_run(run)
        results.append(result)
        print(f"{run} ({result['checkpoint']}, {result['unlabeled_cases']} unlabelled cases with hidden truth)")
        print(f"  {'network':10s} " + " ".join(f"{m + ' unl/val':>24s}" for m in MODES))
        for name, rows in result["networks"].items():
            print(f"  {name:10s} " + " ".join(f"{rows[m]['unlabeled']:>11.3f}/{rows[m]['val']:<12.3f}" for m in MODES))
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
