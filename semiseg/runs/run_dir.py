"""The run folder: creation without overwriting, provenance, history rows, atomic writes.

    python -c "import run_dir; print(run_dir.default_run_name('supervised', 'cpu'))"

A run folder holds config.yaml, splits.json, export.json, history.csv, checkpoints/, metrics.json,
per_case.csv, run_info.json and best_model.keras. A new run never reuses an existing folder;
`--resume` continues one. Every file goes through `atomic_write`, so a run killed mid-write (or out
of disk) keeps the previous complete version of each file.

export.json, written when training (re)starts, says which network the run selects and exports and
why, so that `evaluate`/`predict` (also `--checkpoint latest` of an unfinished run) use the same
one: {"network": "teacher", "checkpoint_key": "teacher", "validated": [...], "reason": "..."}.
"""
from __future__ import annotations

import datetime as dt
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path

from semiseg.runs import atomic_write

REPO = Path(__file__).resolve().parents[2]     # the checkout (git_state); an installed copy has no .git


from semiseg.errors import RunDirError  # noqa: E402  (defined with the other errors)


def default_run_name(method: str, preset: str) -> str:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return f"{method}-{preset or 'custom'}-{stamp}"


def create_run_dir(out: str | None, method: str, preset: str, runs_root: str = "runs") -> Path:
    """Create a fresh run folder; an existing --out is an error (it is never modified)."""
    if out:
        path = Path(out)
        if path.exists():
            raise RunDirError(f"run folder {path} already exists: pass --resume to continue it, "
                              f"or choose another --out (nothing in it was changed)")
        path.mkdir(parents=True)
        return path
    base = Path(runs_root) / default_run_name(method, preset)
    for k in range(1000):
        path = base if k == 0 else base.with_name(f"{base.name}-{k}")
        try:
            path.mkdir(parents=True)
            return path
        except FileExistsError:
            continue
    raise RunDirError(f"cannot find a free run folder name next to {base}")


def atomic_write_text(path, text: str) -> None:
    """Kept for callers of this name: atomic_write.write_text."""
    atomic_write.write_text(path, text)


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if hasattr(value, "item"):          # numpy scalars
        return _json_safe(value.item())
    return value


def write_json(path, payload) -> None:
    """JSON with NaN/inf as null and NumPy scalars as plain numbers, written atomically."""
    atomic_write.write_text(path, json.dumps(_json_safe(payload), indent=1) + "\n")


EXPORT_FILE = "export.json"
# MIRA-U runs: the teacher at its best epoch, whose MC-dropout spread `predict --uncertainty` reads.
TEACHER_BEST_FILE = "teacher_best.keras"


def write_export_record(run: Path, record: dict) -> None:
    write_json(Path(run) / EXPORT_FILE, record)


def read_export_record(run: Path) -> dict | None:
    """RUN/export.json, or None for runs made before it existed; a broken one is a RunDirError."""
    path = Path(run) / EXPORT_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(f"{path} is unreadable ({err}); delete it to fall back to train.export") from None
    if not isinstance(record, dict) or not all(isinstance(record.get(k), str) for k in ("network", "checkpoint_key")):
        raise RunDirError(f"{path} lacks the strings 'network' and 'checkpoint_key'; delete it to fall back "
                          f"to train.export")
    return record


def git_state() -> dict:
    def git(*args):
        try:
            return subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True,
                                  timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    commit = git("rev-parse", "HEAD")
    return {"commit": commit or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no")) if commit else None}


def provenance(argv: list[str], devices: list[str], strategy_info: dict | None = None) -> dict:
    """What made this run: command, code version, library versions, host, devices."""
    import keras
    import numpy
    import tensorflow as tf
    return {
        "command": " ".join(["python", "main.py", *argv]),
        "argv": list(argv),
        "python_executable": sys.executable,
        "cwd": os.getcwd(),
        "git": git_state(),
        "python": platform.python_version(),
        "tensorflow": tf.__version__, "keras": keras.__version__, "numpy": numpy.__version__,
        "host": socket.gethostname(),
        "platform": platform.platform(),
        "devices": devices,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
        "strategy": strategy_info or {},
    }


def start_run_info(run: Path, info: dict, changed: dict | None = None) -> dict:
    """Record a (re)start: a resumed run appends to `sessions`, keeping the first start; `changed`
    (dotted key -> [old, new]) records the settings a resumed session changed."""
    path = run / "run_info.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    now = dt.datetime.now().isoformat(timespec="seconds")
    session = {"start": now, "command": info["command"], "host": info["host"],
               **({"precision": info["precision"]} if "precision" in info else {})}
    if changed:
        session["changed"] = changed
    sessions = previous.get("sessions", []) + [session]
    merged = {**previous, **info, "start_time": previous.get("start_time", now), "sessions": sessions,
              "status": "running", "end_time": None}
    write_json(path, merged)
    return merged


def run_fields(run: Path, cfg, data_format: str, data_set: str, network: str) -> dict:
    """What a run is, flat for tables (metrics.json, run_info.json, analysis/collect.py): the run
    folder's name, method, preset, seed, labelled fraction, data set and the exported network."""
    return {"run": Path(run).name, "method": cfg.method, "preset": cfg.preset or None, "seed": cfg.seed,
            "labeled_fraction": cfg.data.labeled_fraction, "data_format": data_format, "data_set": data_set,
            "network": network}


def update_run_info(run: Path, **fields) -> None:
    """Add or replace top-level keys of run_info.json (atomic)."""
    path = run / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update(fields)
    write_json(path, info)


def finish_run_info(run: Path, status: str, **extra) -> None:
    path = run / "run_info.json"
    info = json.loads(path.read_text()) if path.exists() else {}
    info.update(extra)
    info["status"] = status
    info["end_time"] = dt.datetime.now().isoformat(timespec="seconds")
    if info.get("sessions"):
        info["sessions"][-1]["end"] = info["end_time"]
        info["sessions"][-1]["status"] = status
    write_json(path, info)


# history.csv columns measured, not computed: they differ between two runs of the same steps.
TIMING_COLUMNS = ("time_s", "images_per_s", "step_ms", "gpu_mem_peak_mb")


def append_history(run: Path, row: dict) -> None:
    """Rewrite history.csv with one more row (atomic). Rows from epochs at or after `row['epoch']`
    are dropped first: after a resume from an older checkpoint the file matches the model."""
    path = run / "history.csv"
    rows = read_history(run)
    rows = [r for r in rows if int(float(r["epoch"])) < int(row["epoch"])] + [row]
    columns: list[str] = []
    for r in rows:
        columns += [k for k in r if k not in columns]
    atomic_write.write_text(path, atomic_write.csv_text([{k: _fmt(v) for k, v in r.items()} for r in rows], columns))


def _fmt(value):
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def read_history(run: Path) -> list[dict]:
    return atomic_write.read_csv_rows(Path(run) / "history.csv")
