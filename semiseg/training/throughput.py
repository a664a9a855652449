"""An epoch's speed for history.csv: images/s, ms per step and, on GPUs, the peak memory.

    reset_gpu_peak(); ...; throughput(steps, seconds, images_per_step)   # {"images_per_s", "step_ms", ...}
"""
from __future__ import annotations

import tensorflow as tf


def throughput(steps: int, seconds: float, images_per_step: int) -> dict:
    """history.csv columns of an epoch's training part (validation excluded; the first epoch
    includes tracing the step). GPU peak memory where TensorFlow reports it (GPUs only)."""
    seconds = max(seconds, 1e-9)
    speed = {"images_per_s": round(steps * images_per_step / seconds, 2),
             "step_ms": round(1000.0 * seconds / max(steps, 1), 1)}
    peak = gpu_peak_mb()
    if peak is not None:
        speed["gpu_mem_peak_mb"] = peak
    return speed


def _local_gpus() -> list:
    return tf.config.list_logical_devices("GPU")


def reset_gpu_peak() -> None:
    for device in _local_gpus():
        try:
            tf.config.experimental.reset_memory_stats(device.name)
        except (ValueError, tf.errors.OpError):
            pass


def gpu_peak_mb() -> float | None:
    """Largest peak allocation over this process's GPUs since the last reset, in MB; None on CPU
    or where the allocator does not report it."""
    peaks = []
    for device in _local_gpus():
        try:
            peaks.append(tf.config.experimental.get_memory_info(device.name)["peak"])
        except (ValueError, tf.errors.OpError):
            pass
    return round(max(peaks) / 2 ** 20, 1) if peaks else None
