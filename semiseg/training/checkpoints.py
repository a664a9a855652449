"""Checkpoints of a training stage: save with named errors, restore the chief's newest on every worker.

    save_checkpoint(manager, step)               # RUN/checkpoints/ckpt-STEP, or WriteError naming it
    restore_latest(strategy, ckpt, folder)       # -> the restored step (0: none)
"""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import tensorflow as tf

from semiseg.runs import atomic_write
from semiseg.training import distribute


def restore_latest(strategy, ckpt: tf.train.Checkpoint, folder: Path) -> int:
    """Restore the chief's newest checkpoint in `folder` on every worker; returns its number (its
    step; 0: none). The chief's choice is broadcast: workers that see the file system
    differently (a lagging network file system) would otherwise resume at different steps and
    run different collectives, a hang."""
    latest = tf.train.latest_checkpoint(str(folder))
    number = distribute.chief_int(strategy, int(latest.rsplit("-", 1)[1]) if latest else 0)
    if number:
        ckpt.restore(str(Path(folder) / f"ckpt-{number}")).assert_existing_objects_matched()
    return number


def save_checkpoint(manager: tf.train.CheckpointManager, step: int) -> None:
    """manager.save, its errors named by the checkpoint's path. A failed save leaves the previous
    checkpoint as `latest`: TF writes the shards under a temporary name and updates the
    `checkpoint` index file (atomically) only after they are complete."""
    path = Path(manager.directory) / f"ckpt-{step}"
    try:
        manager.save(checkpoint_number=step)
    except (OSError, tf.errors.OpError) as err:
        # The shards' temporary folder: give its space back (a full disk is the likely cause).
        shutil.rmtree(f"{path}_temp", ignore_errors=True)
        reason = err.strerror if isinstance(err, OSError) else _op_error_reason(err)
        raise atomic_write.WriteError(path, f"{reason} (the previous checkpoint, "
                                      f"{manager.latest_checkpoint or 'none'}, is kept)",
                                      getattr(err, "errno", None)) from err


def _op_error_reason(err: tf.errors.OpError) -> str:
    """The message of a TF op error without its '{{function_node ...}}' prefix and '[Op:SaveV2]' tail."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", err.message.strip())
    return re.sub(r"\s*\[Op:\w+\]$", "", text).splitlines()[0] if text else type(err).__name__
