"""Splits: the cases of a data set cut into labeled / unlabeled / val / test, per case, and saved.

    python main.py train --preset smoke --set data.labeled_fraction=0.25    # RUN_DIR/splits.json

Splits are made per case (never slices of one patient on two sides) from the source's case list,
reproducibly from the seed, and saved to the run's splits.json, which `--resume` and `evaluate`
read back instead of splitting again.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from semiseg.data.sources import Case, DataError
from semiseg.runs import atomic_write

SPLITS = ("labeled", "unlabeled", "val", "test")


def make_splits(cases: list[Case], data_cfg, seed: int) -> dict:
    """Case-level split into labeled / unlabeled / val / test.

    Cases with labels are shuffled with numpy's PCG64 (same result on every machine) and cut into
    test, val and train; a data set's own subsets (Case.subset) are respected. Of the training cases
    `labeled_fraction` keep their labels (at least one); the rest become unlabelled, their labels
    kept only as hidden truth for scoring pseudo targets. Cases without labels are unlabelled.
    """
    labeled_pool = sorted(c.case_id for c in cases if c.label is not None and c.subset is None)
    fixed = {s: sorted(c.case_id for c in cases if c.subset == s and c.label is not None) for s in ("train", "val", "test")}
    no_label = sorted(c.case_id for c in cases if c.label is None)
    # Two generators: the data set's split seed cuts test and validation (the same for every run seed,
    # so methods and seeds are scored on one test set), the run seed draws the labelled subset.
    split_rng = np.random.default_rng(data_cfg.split_seed)
    order = [labeled_pool[i] for i in split_rng.permutation(len(labeled_pool))]
    n_test = int(round(data_cfg.test_fraction * len(order))) if not fixed["test"] else 0
    n_val = int(round(data_cfg.val_fraction * len(order))) if not fixed["val"] else 0
    test = fixed["test"] + order[:n_test]
    val = fixed["val"] + order[n_test:n_test + n_val]
    train = fixed["train"] + order[n_test + n_val:]
    train = [train[i] for i in np.random.default_rng(seed).permutation(len(train))]
    if not train:
        raise DataError("no labelled training cases left after the val/test split; lower data.val_fraction/test_fraction")
    n_labeled = max(1, int(round(data_cfg.labeled_fraction * len(train))))
    labeled, hidden = sorted(train[:n_labeled]), sorted(train[n_labeled:])
    if not val:
        raise DataError("the validation split is empty: model selection needs it (raise data.val_fraction or add cases)")
    return {"seed": seed, "split_seed": data_cfg.split_seed, "labeled_fraction": data_cfg.labeled_fraction,
            "labeled": labeled, "unlabeled": sorted(hidden + no_label), "hidden_truth": hidden,
            "val": sorted(val), "test": sorted(test)}


def save_splits(splits: dict, path) -> None:
    atomic_write.write_text(path, json.dumps(splits, indent=1))


def run_splits(cases: list[Case], data_cfg, seed: int, run_dir=None) -> dict:
    """The run's splits: RUN_DIR/splits.json when it exists (--resume and evaluate: the run's own
    split, always), else a new split of `cases`."""
    path = Path(run_dir) / "splits.json" if run_dir else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    return make_splits(cases, data_cfg, seed)
