"""Read semiseg run folders (config, history, metrics, per-case scores, previews) for analysis.

Only files are read: no TensorFlow, no training code. Used by the other analysis scripts:

    python analysis/runs.py runs/sweep        # list the runs found, one line each

A run folder is any folder holding `config.yaml`; a path given on the command line is either a
run folder or a folder searched recursively for them (a sweep).
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import yaml


@dataclass
class Run:
    """One run folder's files; missing optional files are None."""
    path: Path
    config: dict
    history: pd.DataFrame | None
    metrics: dict | None
    per_case: pd.DataFrame | None

    @property
    def name(self) -> str:
        return self.path.name

    def config_value(self, dotted_key: str):
        """config['a']['b'] for 'a.b'; a clear error naming the file when it is absent."""
        node = self.config
        for part in dotted_key.split("."):
            if not isinstance(node, dict) or part not in node:
                raise KeyError(f"{self.path / 'config.yaml'}: missing key {dotted_key!r}")
            node = node[part]
        return node

    @property
    def method(self) -> str:
        return str(self.config_value("method"))

    @property
    def seed(self):
        return self.config.get("seed")

    @property
    def labeled_fraction(self) -> float:
        return float(self.config_value("data.labeled_fraction"))

    @property
    def label(self) -> str:
        """A short legend label: method, labeled percentage and seed."""
        parts = [self.method]
        if isinstance(self.config.get("data"), dict) and "labeled_fraction" in self.config["data"]:
            parts.append(f"{percent(self.labeled_fraction)} labeled")
        if self.seed is not None:
            parts.append(f"seed {self.seed}")
        return ", ".join(parts)

    def distance_unit(self) -> str:
        return (self.metrics or {}).get("distance_unit", "px")

    def preview_dir(self, split: str = "test") -> Path:
        return self.path / "previews" / split

    def load_preview(self, case_id: str, split: str = "test") -> dict:
        """Arrays of previews/<split>/<case_id>.npz: image, label, prob, maybe uncertainty."""
        path = self.preview_dir(split) / f"{case_id}.npz"
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no preview for case {case_id!r}")
        with np.load(path) as data:
            arrays = {key: data[key] for key in data.files}
        missing = {"image", "label", "prob"} - set(arrays)
        if missing:
            raise ValueError(f"{path}: missing arrays {sorted(missing)}; found {sorted(arrays)}")
        return arrays


# Keys that say which run this is or how it was executed, not what was trained: they never split a
# comparison into groups. Everything else that differs between runs does (see `setting_keys`).
RUN_IDENTITY_KEYS = ("method", "seed", "data.labeled_fraction", "data.path", "data.cache_dir",
                     "train.steps_per_loop", "train.eval_batch_size", "train.checkpoint_every",
                     "train.keep_checkpoints", "train.end_time_margin_s", "train.progress",
                     # the same update equations as one kernel or several: float32 rounding apart
                     "train.fused_update")


def flat_config(config: dict) -> dict:
    """{'train.lr': 0.001, ...} from a run's nested config mapping; lists become their text (one
    comparable value, one CSV cell)."""
    from semiseg.config import flat_dict        # no TensorFlow
    return {key: str(value) if isinstance(value, (list, tuple)) else value for key, value in flat_dict(config).items()}


def run_settings(run: "Run") -> dict:
    """What was trained: the flat config without RUN_IDENTITY_KEYS and without the sections of
    other methods (a supervised run's config.yaml carries mean_teacher.* defaults it never used), and
    without the settings only SSL methods read (UNLABELED_ONLY_KEYS) for a method that trains on none."""
    from semiseg.config import METHODS, UNLABELED_ONLY_KEYS          # tables of names, no TensorFlow
    others = {name for name in METHODS if name != run.method}
    unused = () if run.method in METHODS and METHODS[run.method].uses_unlabeled else UNLABELED_ONLY_KEYS
    return {key: value for key, value in flat_config(run.config).items()
            if key not in RUN_IDENTITY_KEYS and key.split(".", 1)[0] not in others and key not in unused}


def setting_keys(runs: list["Run"]) -> list[str]:
    """The settings whose values differ between the runs that have them: data set, network,
    schedule, a method's weight... Comparisons group by them, never merging. A key of a method's own
    section differs if that method's runs disagree on it, a run that lacks it counting as a value of
    its own; other keys only some runs have differ if those runs disagree on it."""
    from semiseg.config import METHODS      # a table of names, no TensorFlow
    settings = [run_settings(run) for run in runs]
    sections = [{key.split(".", 1)[0] for key in each} for each in settings]
    keys = set().union(*settings) if settings else set()

    def values(key):
        section = key.split(".", 1)[0]
        if section not in METHODS:
            return {repr(each[key]) for each in settings if key in each}
        # A run of the method that lacks one of its settings was saved before the setting existed (and
        # KEYS_ADDED_LATER does not know its value): unknown counts as different, never merged.
        return {repr(each.get(key, "<unset>")) for each, has in zip(settings, sections) if section in has}
    return sorted(key for key in keys if len(values(key)) > 1)


def variant(run: "Run", keys: list[str]) -> str:
    """'train.lr=0.002, mean_teacher.consistency=3' for this run's values of `keys` ('' if none)."""
    settings = run_settings(run)
    return ", ".join(f"{key}={settings[key]}" for key in keys if key in settings)


def percent(fraction: float) -> str:
    """0.1 -> '10%' (labeled fractions are stored as fractions of 1)."""
    return f"{100 * fraction:g}%"


# history.csv columns renamed when the methods got one naming scheme (docs/outputs.md): runs made
# before read with today's names. loss_cons was Mean Teacher's unlabelled term, but one of MIRA-U's
# parts of loss_unsup (a run that already has loss_unsup).
RENAMED_HISTORY_COLUMNS = {"loss_u": "loss_unsup", "cons_weight": "unsup_weight", "lambda_u_weight": "unsup_weight",
                           "beta": "unsup_weight", "pseudo_target_dice": "pseudo_dice", "loss_ce": "loss_unsup_ce"}


def current_history_names(table: pd.DataFrame) -> pd.DataFrame:
    """A history table with the columns of older runs under today's names."""
    columns = set(table.columns)
    renames = {old: new for old, new in RENAMED_HISTORY_COLUMNS.items() if old in columns and new not in columns}
    if "loss_cons" in columns:
        renames["loss_cons"] = "loss_unsup_cons" if "loss_unsup" in columns else "loss_unsup"
    return table.rename(columns=renames)


def summary(doc: str) -> str:
    """A module docstring's first paragraph on one line: an argparse description that does not stop
    mid-sentence."""
    return " ".join(doc.strip().split("\n\n")[0].split())


def _read_yaml(path: Path) -> dict:
    with open(path) as stream:
        try:
            config = yaml.safe_load(stream)
        except yaml.YAMLError as error:
            raise ValueError(f"{path}: not valid YAML ({error})") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path}: expected a YAML mapping, got {type(config).__name__}")
    return config


def _read_csv(path: Path, required: tuple[str, ...]) -> pd.DataFrame | None:
    if not path.is_file():
        return None
    table = pd.read_csv(path)
    missing = [column for column in required if column not in table.columns]
    if missing:
        raise ValueError(f"{path}: missing columns {missing}; found {list(table.columns)}")
    return table


def load_run(run_dir) -> Run:
    """Load one run folder; config.yaml is required, everything else optional."""
    path = Path(run_dir)
    config_path = path / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path}: not found; {path} is not a run folder")
    metrics_path = path / "metrics.json"
    metrics = json.loads(metrics_path.read_text()) if metrics_path.is_file() else None
    per_case = _read_csv(path / "per_case.csv", ("case_id", "dice"))
    if per_case is not None:
        per_case["case_id"] = per_case["case_id"].astype(str)
    history = _read_csv(path / "history.csv", ("epoch",))
    from semiseg.config import saved_run_mapping      # no TensorFlow
    return Run(path=path, config=saved_run_mapping(_read_yaml(config_path)),
               history=None if history is None else current_history_names(history),
               metrics=metrics, per_case=per_case)


def unique_names(runs: list[Run]) -> list[str]:
    """File-name-safe names: each run's folder name, lengthened by parent folders until unique
    (a sweep laid out as method/fraction/seed0 would otherwise repeat 'seed0')."""
    parts = [run.path.resolve().parts[1:] for run in runs]  # [1:] drops the root '/'
    longest = max((len(each) for each in parts), default=1)
    for depth in range(1, longest + 1):
        names = ["_".join(each[-depth:]) for each in parts]
        if len(set(names)) == len(names):
            break
    return names if runs else []


def find_runs(paths) -> list[Run]:
    """Runs named by `paths`: each a run folder or a folder searched recursively for them."""
    runs = []
    for given in paths:
        given = Path(given)
        if (given / "config.yaml").is_file():
            runs.append(load_run(given))
            continue
        if not given.is_dir():
            raise FileNotFoundError(f"{given}: no such folder")
        found = sorted(config.parent for config in given.rglob("config.yaml"))
        if not found:
            raise FileNotFoundError(f"{given}: no run folder (a folder with config.yaml) inside")
        runs.extend(load_run(run_dir) for run_dir in found)
    return runs


EXIT_BAD_INPUT = 2   # as main.py: a missing or unreadable run folder


def run_cli(main, argv=None) -> int:
    """Run a script's `main(argv)` for the command line: 0 when done; a missing run folder or an
    unreadable file in one (every error raised here names its path) prints `error: ...` and gives
    exit code 2 instead of a traceback."""
    try:
        main(argv)
    except (OSError, ValueError, KeyError) as err:
        # str(KeyError) is the repr of its message; print the message itself.
        message = err.args[0] if isinstance(err, KeyError) and err.args else err
        print(f"error: {message}", file=sys.stderr)
        return EXIT_BAD_INPUT
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders searched recursively for run folders")
    args = parser.parse_args(argv)
    for run in find_runs(args.run_dirs):
        dice = (run.metrics or {}).get("dice")
        epochs = 0 if run.history is None else len(run.history)
        print(f"{run.path}\t{run.label}\tepochs={epochs}\ttest_dice={dice}")


if __name__ == "__main__":
    sys.exit(run_cli(main))
