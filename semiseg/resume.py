"""`train --resume`: what a run folder fixes, what a resumed session may change, and when a run has
nothing left to train. No TensorFlow here, so a refused or finished resume ends before it loads.

    python main.py train --out runs/mt --resume                          # continue where it stopped
    python main.py train --out runs/mt --resume --set train.epochs=30    # train a finished run longer

The run's config.yaml fixes method, preset, data and every setting. A --method/--preset/--data/
--format/--config given again must agree with it. --set may change only RESUMABLE_KEYS: settings of
the outer loop that leave the steps already trained and the position in the data stream as they
were. The stream position is `step * train.batch_size` records (data_loader_tf2.train_dataset), the
epoch boundaries are multiples of steps_per_epoch, and the LR schedule's horizon is
steps_per_epoch * epochs (train_ssl_tf2.Trainer._lr_schedule), so batch size, steps per epoch and
anything that shapes the data or the step are refused. train.epochs may only grow, and only with
the constant schedule: a cosine or poly schedule would stretch its decay over the new horizon and
raise the learning rate of every step to come (a run that had decayed to its floor would restart
at a mid-schedule rate), which is a different training run, not a longer one.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path

from semiseg import config
from semiseg.config import ConfigError
from semiseg.runs.run_dir import RunDirError, read_history

# key -> what it governs, i.e. why changing it on resume leaves the trained steps and the stream as they were
RESUMABLE_KEYS = {
    "train.epochs": "more epochs (upwards only; constant schedule only)",
    "train.patience": "early stopping of the epochs to come",
    "train.min_delta": "early stopping of the epochs to come",
    "train.checkpoint_every": "checkpoint cadence",
    "train.keep_checkpoints": "checkpoints kept",
    "train.end_time_margin_s": "how early before the job's wall limit to checkpoint and stop",
    "train.eval_batch_size": "validation/test batch size (scores do not depend on it)",
    "train.steps_per_loop": "steps per tf.function call (the same steps, grouped differently)",
    "data.cache_dir": "where the slice cache lives (its content is keyed by the data settings)",
}
FINISHED = ("completed", "early_stopped")


@dataclass
class ResumePlan:
    cfg: config.Config
    run: Path
    changes: dict = field(default_factory=dict)     # dotted key -> [run's value, new value]
    nothing_to_train: str = ""                      # the message when the run is already finished


def plan_resume(args) -> ResumePlan:
    """Read RUN/config.yaml, check the flags against it, apply the allowed --set changes, and say
    whether anything is left to train. Raises ConfigError / RunDirError; writes nothing."""
    if not args.out:
        raise RunDirError("--resume needs --out RUN_DIR (the run to continue)")
    run = Path(args.out)
    if not (run / "config.yaml").exists():
        raise RunDirError(f"cannot resume: {run / 'config.yaml'} not found")
    saved = config.load_saved_config(run / "config.yaml")
    run_info = _read_run_info(run)
    _check_flags(saved, args, run, run_info)
    cfg, changes = _apply_sets(saved, args.set or [], run)
    plan = ResumePlan(cfg, run, changes)
    plan.nothing_to_train = _finished_message(run, cfg, changes, run_info)
    return plan


def _read_run_info(run: Path) -> dict:
    path = run / "run_info.json"
    try:
        return json.loads(path.read_text()) if path.exists() else {}
    except (OSError, ValueError) as err:
        raise RunDirError(f"cannot resume: {path} is unreadable ({err})") from None


def _check_flags(saved, args, run: Path, run_info: dict) -> None:
    """Flags that pick what a run is must agree with the run; the same value again is fine."""
    def refuse(flag, given, recorded):
        raise ConfigError(f"{flag} {given}: run {run} was trained with {flag} {recorded or '(none)'}; "
                          f"--resume continues a run as it was (omit {flag}, or start a new run)")
    if getattr(args, "method", "") and args.method != saved.method:
        refuse("--method", args.method, saved.method)
    if getattr(args, "preset", "") and args.preset != saved.preset:
        refuse("--preset", args.preset, saved.preset)
    if getattr(args, "data", None) and not _same_path(args.data, saved.data.path):
        refuse("--data", args.data, saved.data.path)
    detected = (run_info.get("data") or {}).get("format")
    if getattr(args, "format", None) and args.format not in (saved.data.format, detected):
        refuse("--format", args.format, saved.data.format)
    if getattr(args, "config", ""):
        from_file = config.apply_mapping(copy.deepcopy(saved), config.load_yaml(args.config))
        for key, (old, new) in _diff(saved, from_file).items():
            raise ConfigError(f"--config {args.config}: {key} is {new!r} there but {old!r} in run {run}; "
                              f"--resume continues a run as it was (omit --config; allowed changes go "
                              f"through --set: {', '.join(RESUMABLE_KEYS)})")


def _same_path(a: str, b: str) -> bool:
    return a == b or (bool(b) and Path(a).expanduser().resolve() == Path(b).expanduser().resolve())


def _diff(old_cfg, new_cfg) -> dict:
    old, new = config.flat_dict(config.to_dict(old_cfg)), config.flat_dict(config.to_dict(new_cfg))
    return {k: [old[k], new[k]] for k in old if old[k] != new[k]}


def _apply_sets(saved, sets: list, run: Path):
    """The run's config with the --set overrides; a change outside RESUMABLE_KEYS is refused."""
    cfg = config.apply_mapping(copy.deepcopy(saved), config.parse_set(sets))
    changes = _diff(saved, cfg)
    for key, (old, new) in changes.items():
        if key not in RESUMABLE_KEYS:
            raise ConfigError(
                f"{key}: cannot change on --resume (run {run} has {old!r}, asked {new!r}): it would change "
                f"what was already trained or the position in the data stream. Keys a resume may change: "
                f"{', '.join(RESUMABLE_KEYS)}; to change {key}, start a new run")
    if "train.epochs" in changes:
        old, new = changes["train.epochs"]
        if new < old:
            raise ConfigError(f"train.epochs: only upwards on --resume (run {run} has {old}, asked {new})")
        if cfg.train.schedule != "constant":
            raise ConfigError(
                f"train.epochs: cannot grow on --resume with train.schedule={cfg.train.schedule} (run {run}: "
                f"{old} -> {new}): the schedule decays over steps_per_epoch * epochs, so a longer horizon "
                f"would raise the learning rate of every step to come; start a new run with more epochs")
    config.validate(cfg)
    return cfg, changes


def _finished_message(run: Path, cfg, changes: dict, run_info: dict) -> str:
    """'' when there is training left; else what to tell the user (the run is left untouched)."""
    history = read_history(run)
    epoch = int(float(history[-1]["epoch"])) if history else 0
    status = run_info.get("status")
    if status not in FINISHED and not (epoch >= cfg.train.epochs and (run / "metrics.json").exists()):
        return ""       # unfinished (or its last epoch done but never evaluated): resume it
    status = status if status in FINISHED else "completed"
    more_epochs = epoch < cfg.train.epochs
    if status == "completed" and more_epochs:
        return ""
    if status == "early_stopped" and more_epochs and "train.patience" in changes:
        return ""
    how = "--resume --set train.epochs=N"
    if status == "early_stopped":
        how += " train.patience=P (more than the epochs without improvement so far, or 0 = off)"
    return (f"run {run} already finished ({status}, epoch {epoch}/{cfg.train.epochs}); nothing to train; "
            f"to train longer: {how}")
