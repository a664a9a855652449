"""`train --dry-run`: what a training run would be, measured on a throwaway trainer; no run folder.

    python main.py train --method mean_teacher --preset pancreas_mean_teacher --data data/Task07_Pancreas --dry-run

The configuration is resolved and the data checked (and its slice cache built or reused) exactly as
`train` does; then a trainer is built as for the run, and the report gives the splits (cases),
steps per epoch and in total, each network's parameter count, a memory estimate and a time
estimate from a few real training steps on this machine. Nothing of the trainer is kept.

Memory estimate (per replica), stated with its parts:
  state       = weights of every network + one gradient per trainable weight + the optimizer's
                slots (counted from the built optimizer: Adam 2 per weight, SGD with momentum 1),
                at their dtypes (a float32 weight is 4 bytes);
  activations = sum of the output elements of every layer of each trained network, per image,
                x the images one replica puts through it per step (labelled + unlabelled)
                x 4 bytes (2 under mixed precision) x 2 (the forward value kept for the backward
                pass and its gradient). Internal tensors of composite layers (attention inside a
                transformer block) are not layer outputs: for such networks this part is low.
Where TensorFlow reports GPU memory, the peak measured during the timed steps is printed as well;
on a CPU, the process's peak resident memory (which includes TensorFlow and tf.data buffers).
Time estimate: mean time of `steps` optimizer steps after one untimed (traced) step, times the
total steps; validation, checkpoints and MIRA-U's stage 1 are not included.
"""
from __future__ import annotations

import resource
import sys
import time

import numpy as np


def _bytes(variables) -> int:
    return int(sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in variables))


def layer_output_elements(model) -> int:
    """Output elements per image, summed over the layers of a functional model (0 if not functional)."""
    import keras
    total = 0
    for layer in getattr(model, "layers", []):
        try:
            outputs = keras.tree.flatten(layer.output)
        except (AttributeError, ValueError):      # a layer never called symbolically (subclassed model)
            continue
        total += sum(int(np.prod(o.shape[1:])) for o in outputs if o.shape and None not in o.shape[1:])
    return total


def _element_bytes() -> int:
    """Bytes of an activation under the global policy (set from train.precision, `auto` resolved)."""
    import keras
    return 2 if keras.mixed_precision.global_policy().compute_dtype in ("float16", "bfloat16") else 4


def memory_estimate(trainer) -> dict:
    """Bytes per replica: {'weights', 'gradients', 'optimizer', 'activations', 'total'}."""
    weights = _bytes([v for m in trainer.models.values() for v in m.weights])
    gradients = _bytes(trainer.trainable_variables())
    optimizer = _bytes(trainer.optimizer.variables)
    trained = {id(v) for v in trainer.trainable_variables()}
    element = _element_bytes()
    images = trainer.images_per_step() // trainer.n_replicas
    activations = sum(layer_output_elements(m) for m in trainer.models.values()
                      if any(id(v) in trained for v in m.trainable_variables)) * images * element * 2
    parts = {"weights": weights, "gradients": gradients, "optimizer": optimizer, "activations": activations}
    return {**parts, "total": sum(parts.values())}


def time_steps(trainer, steps: int) -> float:
    """Seconds per optimizer step: one traced step untimed, then `steps` timed in one loop call."""
    import tensorflow as tf
    loop = trainer._make_loop(*trainer._iterators(0))
    loop(tf.constant(1))                # tracing and the input pipeline's start: not a step's time
    t0 = time.perf_counter()
    logs = loop(tf.constant(steps))
    float(logs["loss"])                 # wait for the device
    return (time.perf_counter() - t0) / steps


def _mb(n: float) -> str:
    return f"{n / 2 ** 20:,.0f} MB" if n >= 2 ** 20 else f"{n / 2 ** 10:,.0f} kB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def this_machine() -> str:
    """'2 CPU cores' or '1 x NVIDIA H200': what the timed steps ran on."""
    import os

    import tensorflow as tf
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return f"{os.cpu_count()} CPU cores"
    names = [tf.config.experimental.get_device_details(g).get("device_name", "GPU") for g in gpus]
    return ", ".join(f"{names.count(n)} x {n}" for n in dict.fromkeys(names))


def _peak_rss_bytes() -> int:
    # ru_maxrss is in kilobytes on Linux, in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def report(cfg, bundle, strategy, info: dict, method_cls, steps: int = 3, log=print) -> dict:
    """Build a throwaway trainer, time `steps` steps, print the report; returns its numbers."""
    from semiseg.data.loader import SPLITS
    from semiseg.training import throughput as training
    t = cfg.train
    trainer = method_cls(cfg, bundle, strategy, info, log=lambda m: None)
    splits = {s: len(bundle.splits[s]) for s in SPLITS}
    slices = {s: bundle.n_slices(s) for s in SPLITS}
    params = {name: int(m.count_params()) for name, m in trainer.models.items()}
    memory = memory_estimate(trainer)
    training.reset_gpu_peak()
    seconds = time_steps(trainer, max(1, steps))
    gpu_peak = training.gpu_peak_mb()
    total_steps = trainer.total_steps
    result = {"splits": splits, "slices": slices, "steps_per_epoch": trainer.steps_per_epoch, "epochs": t.epochs,
              "total_steps": total_steps, "parameters": params, "memory_bytes": memory,
              "seconds_per_step": seconds, "timed_steps": max(1, steps), "estimated_seconds": seconds * total_steps,
              "gpu_peak_mb": gpu_peak, "peak_rss_bytes": _peak_rss_bytes()}
    devices = this_machine()
    state = memory["weights"] + memory["gradients"] + memory["optimizer"]
    lines = [
        f"dry run: {cfg.method} (preset {cfg.preset or '-'}), data {bundle.fmt}; nothing written (no run folder; "
        f"the slice cache is at {bundle.cache_dir})",
        "splits (cases): " + ", ".join(f"{s} {n}" for s, n in splits.items())
        + "  |  slices: " + ", ".join(f"{s} {n}" for s, n in slices.items()),
        f"steps per epoch: {trainer.steps_per_epoch} (global batch {t.batch_size} labelled"
        + (f" + {trainer.global_unlabeled_batch} unlabelled" if trainer.uses_unlabeled else "")
        + f", {trainer.n_replicas} replica(s), per-replica batch {trainer.per_replica_batch})",
        f"total steps: {total_steps:,} ({t.epochs} epochs x {trainer.steps_per_epoch}"
        + (f"; early stopping, train.patience={t.patience}, may end sooner)" if t.patience else ")"),
        "parameters: " + ", ".join(f"{name} {n:,}" for name, n in params.items()),
        f"memory estimate per replica: {_mb(memory['total'])} = weights, gradients and optimizer slots "
        f"{_mb(state)} + activations of one step {_mb(memory['activations'])} (layer outputs x "
        f"{trainer.images_per_step() // trainer.n_replicas} images x {_element_bytes()} "
        f"bytes x 2)"
        + (f"; measured GPU peak {gpu_peak:,.0f} MB" if gpu_peak is not None
           else f"; this process's peak resident memory {_mb(result['peak_rss_bytes'])}"),
        f"time estimate: {seconds * 1000:,.0f} ms/step x {total_steps:,} steps = {_duration(seconds * total_steps)} "
        f"(estimate from {max(1, steps)} timed steps on this machine, {devices}, after one traced step; "
        f"validation and checkpoints not included"
        + ("; nor MIRA-U's stage 1" if cfg.method == "mira_u" and not cfg.mira_u.teacher_checkpoint else "") + ")",
    ]
    for line in lines:
        log(line)
    return result
