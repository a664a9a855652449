"""One row per run, for pandas: the configuration keys that differ between the runs, then the metrics.

    python analysis/collect.py runs/sweep --out runs.csv
    python -c "import pandas as pd; print(pd.read_csv('runs.csv').groupby(['method', 'data.labeled_fraction']).dice.mean())"

Columns: `run` (the folder's name, lengthened by parent folders until unique), `path`; `method`,
`preset`, `seed`, `data.labeled_fraction` always, and every other config.yaml key (dotted, e.g.
`train.lr`) whose value is not the same in all runs; then the test metrics of metrics.json (`dice`,
`iou`, ..., `n_cases`, `network`), `epochs` (rows of history.csv) and `best_val_dice` (its highest
`val_dice`). A run without metrics.json (not finished, or not evaluated) keeps empty metric cells.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/collect.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd  # noqa: E402

from semiseg.runs import atomic_write  # noqa: E402
from analysis.runs import Run, find_runs, flat_config, run_cli, summary, unique_names  # noqa: E402

IDENTITY_KEYS = ("method", "preset", "seed", "data.labeled_fraction")
# metrics.json keys that repeat config.yaml or the run's name: the config columns already say them.
REPEATED_IN_CONFIG = {"run", "method", "preset", "seed", "labeled_fraction"}


def differing_keys(configs: list[dict]) -> list[str]:
    """Dotted keys whose value is not the same in every config (a key missing from one differs)."""
    keys = list(dict.fromkeys(k for config in configs for k in config))
    missing = object()
    return [k for k in keys if len({repr(config.get(k, missing)) for config in configs}) > 1]


def run_row(run: Run, name: str, config_keys: list[str], flat: dict) -> dict:
    row = {"run": name, "path": str(run.path)}
    row.update({key: flat.get(key) for key in config_keys})
    for key, value in (run.metrics or {}).items():
        if key not in REPEATED_IN_CONFIG and not isinstance(value, (dict, list)):
            row[key] = value
    history = run.history
    row["epochs"] = 0 if history is None else len(history)
    row["best_val_dice"] = (float(history["val_dice"].max()) if history is not None and "val_dice" in history
                            and len(history) else None)
    return row


def collect(runs: list[Run]) -> pd.DataFrame:
    if not runs:
        raise ValueError("no run folders given")
    flats = [flat_config(run.config) for run in runs]
    keys = list(IDENTITY_KEYS) + [k for k in differing_keys(flats) if k not in IDENTITY_KEYS]
    for run in runs:
        if run.metrics is None:
            print(f"collect: {run.path} has no metrics.json: its metric cells stay empty", file=sys.stderr)
    return pd.DataFrame([run_row(run, name, keys, flat) for run, name, flat in zip(runs, unique_names(runs), flats)])


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders searched recursively for run folders")
    parser.add_argument("--out", required=True, type=Path, metavar="CSV", help="the table to write (CSV)")
    args = parser.parse_args(argv)
    table = collect(find_runs(args.run_dirs))
    atomic_write.write_text(args.out, table.to_csv(index=False))
    print(f"{args.out}: {len(table)} runs, {len(table.columns)} columns")
    return args.out


if __name__ == "__main__":
    sys.exit(run_cli(main))
