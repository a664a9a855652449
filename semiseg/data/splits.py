"""Splits: the cases of a data set cut into labeled / unlabeled / val / test, per patient, and saved.

    python main.py train --preset smoke --set data.labeled_fraction=0.25    # RUN_DIR/splits.json
    python main.py train --preset acdc_7 --data PATH/ACDC                   # data.split_file: a fixed split

Splits are made per group of cases (Case.group: the frames of one ACDC patient; otherwise each case
is its own group), never slices or frames of one patient on two sides, reproducibly from the seeds,
and saved to the run's splits.json, which `--resume` and `evaluate` read back instead of splitting
again. `data.split_file` (YAML or JSON) fixes the split exactly instead:

    train: [patient099, patient038, ...]      # patient (group) or case ids
    val:   [patient028, ...]
    test:  [patient011, ...]
    labeled: [patient099, patient038, ...]    # optional: training patients in the order they get labels

The labelled patients are the first data.labeled_cases (or labeled_fraction of the training
patients) of `labeled`, or, without it, of the training list shuffled by the run seed. A name given
instead of a path is a split file shipped with semiseg (data/split_files/NAME.yaml, e.g.
acdc_ssl4mis). Cases the file does not name are left out of the run.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from semiseg.data.sources import Case, DataError
from semiseg.runs import atomic_write

SPLITS = ("labeled", "unlabeled", "val", "test")
SHIPPED_SPLIT_FILES = Path(__file__).parent / "split_files"
_SPLIT_FILE_KEYS = ("train", "val", "test", "labeled")
_SPLIT_FILE_NOTES = ("name", "source", "note", "description")


def _group(case: Case) -> str:
    return case.group or case.case_id


def _n_labeled(data_cfg, n_train: int, where: str) -> int:
    """Labelled groups: data.labeled_cases when set, else labeled_fraction of the training groups."""
    if data_cfg.labeled_cases > 0:
        if data_cfg.labeled_cases > n_train:
            raise DataError(f"data.labeled_cases={data_cfg.labeled_cases} but {where} has only {n_train} "
                            f"training patients/cases")
        return data_cfg.labeled_cases
    return max(1, int(round(data_cfg.labeled_fraction * n_train)))


def make_splits(cases: list[Case], data_cfg, seed: int) -> dict:
    """Split into labeled / unlabeled / val / test, by group (see the module doc).

    Groups with labels are shuffled with numpy's PCG64 (same result on every machine) and cut into
    test, val and train; a data set's own subsets (Case.subset) are respected. Of the training
    groups `labeled_fraction` (or `labeled_cases`) keep their labels (at least one); the rest become
    unlabelled, their labels kept only as hidden truth for scoring pseudo targets. Cases without
    labels are unlabelled, unless their patient is in val or test. With one case per group (every
    format but ACDC) this is the per-case split of earlier versions, case for case.
    """
    if getattr(data_cfg, "split_file", ""):
        return file_splits(cases, data_cfg, seed)
    members: dict = {}
    for c in cases:
        if c.label is not None:
            members.setdefault(_group(c), []).append(c.case_id)
    labeled_pool = sorted({_group(c) for c in cases if c.label is not None and c.subset is None})
    fixed = {s: sorted({_group(c) for c in cases if c.subset == s and c.label is not None}) for s in ("train", "val", "test")}
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
    n_labeled = _n_labeled(data_cfg, len(train), "the data set")

    def expand(groups):
        return sorted(case_id for g in groups for case_id in members[g])

    held_out = set(val) | set(test)
    no_label = sorted(c.case_id for c in cases if c.label is None and _group(c) not in held_out)
    labeled, hidden = expand(train[:n_labeled]), expand(train[n_labeled:])
    if not val:
        raise DataError("the validation split is empty: model selection needs it (raise data.val_fraction or add cases)")
    splits = {"seed": seed, "split_seed": data_cfg.split_seed, "labeled_fraction": data_cfg.labeled_fraction,
              "labeled": labeled, "unlabeled": sorted(hidden + no_label), "hidden_truth": hidden,
              "val": expand(val), "test": expand(test)}
    if data_cfg.labeled_cases > 0:
        splits["labeled_cases"] = data_cfg.labeled_cases
    return splits


def split_file_path(name: str) -> Path:
    """data.split_file as a path: the file itself, else a split file shipped with semiseg by name."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    shipped = SHIPPED_SPLIT_FILES / f"{name}.yaml"
    if "/" not in name and shipped.is_file():
        return shipped
    known = ", ".join(sorted(p.stem for p in SHIPPED_SPLIT_FILES.glob("*.yaml")))
    raise DataError(f"data.split_file: {name} is neither a file nor a shipped split ({known})")


def load_split_file(name: str) -> tuple[Path, dict]:
    """(path, {train, val, test[, labeled]: [ids]}) of a split file; DataError naming the file and key."""
    import yaml
    path = split_file_path(name)
    try:
        spec = yaml.safe_load(path.read_text())      # JSON is YAML
    except (OSError, yaml.YAMLError) as err:
        raise DataError(f"{path}: unreadable split file ({err})") from None
    if not isinstance(spec, dict):
        raise DataError(f"{path}: a split file is a mapping of train/val/test (and labeled) to id lists")
    unknown = sorted(set(spec) - set(_SPLIT_FILE_KEYS) - set(_SPLIT_FILE_NOTES))
    if unknown:
        raise DataError(f"{path}: unknown key(s) {unknown} (known: {', '.join(_SPLIT_FILE_KEYS)})")
    for key in ("train", "val"):
        if key not in spec:
            raise DataError(f"{path}: needs a '{key}' list")
    lists = {}
    for key in _SPLIT_FILE_KEYS:
        value = spec.get(key)
        if value is None:
            continue
        if not isinstance(value, list) or not all(isinstance(v, (str, int)) for v in value):
            raise DataError(f"{path}: '{key}' must be a list of patient or case ids, got {value!r}")
        lists[key] = [str(v) for v in value]
    return path, lists


def file_splits(cases: list[Case], data_cfg, seed: int) -> dict:
    """The split a split file fixes (module doc); the run seed only orders the training list when
    the file gives no `labeled` order."""
    path, spec = load_split_file(data_cfg.split_file)
    by_group: dict = {}
    for c in cases:
        by_group.setdefault(_group(c), []).append(c)
    by_case = {c.case_id: c for c in cases}

    def resolve(key, entry):
        if entry in by_group:
            return by_group[entry]
        if entry in by_case:
            return [by_case[entry]]
        example = sorted(by_group)[:3]
        raise DataError(f"{path}: {key} names '{entry}', which is neither a patient nor a case of the data set "
                        f"(its ids look like {example})")

    placed: dict = {}
    units = {}
    for key in ("train", "val", "test"):
        units[key] = []
        for entry in spec.get(key, []):
            found = resolve(key, entry)
            for c in found:
                if c.case_id in placed:
                    raise DataError(f"{path}: case {c.case_id} is named in both '{placed[c.case_id]}' and '{key}'")
                placed[c.case_id] = key
            units[key].append(found)
    for key in ("val", "test"):
        unlabelled = [c.case_id for unit in units[key] for c in unit if c.label is None]
        if unlabelled:
            raise DataError(f"{path}: {key} names cases without labels: {unlabelled[:5]}")
    train_ids = {c.case_id for unit in units["train"] for c in unit}
    if "labeled" in spec:
        order = [resolve("labeled", entry) for entry in spec["labeled"]]
        outside = [c.case_id for unit in order for c in unit if c.case_id not in train_ids]
        if outside:
            raise DataError(f"{path}: 'labeled' names cases that are not in 'train': {outside[:5]}")
    else:
        order = [units["train"][i] for i in np.random.default_rng(seed).permutation(len(units["train"]))]
    labelled_units = [u for u in order if any(c.label is not None for c in u)]
    if not labelled_units:
        raise DataError(f"{path}: no training case with a label")
    n_labeled = _n_labeled(data_cfg, len(labelled_units), str(path))
    labeled = sorted(c.case_id for u in labelled_units[:n_labeled] for c in u if c.label is not None)
    hidden = sorted(c for c in train_ids if by_case[c].label is not None and c not in labeled)
    no_label = sorted(c for c in train_ids if by_case[c].label is None)
    val = sorted(c.case_id for unit in units["val"] for c in unit)
    if not val:
        raise DataError(f"{path}: the 'val' list is empty: model selection needs it")
    splits = {"seed": seed, "split_seed": data_cfg.split_seed, "labeled_fraction": data_cfg.labeled_fraction,
              "labeled": labeled, "unlabeled": sorted(hidden + no_label), "hidden_truth": hidden,
              "val": val, "test": sorted(c.case_id for unit in units["test"] for c in unit),
              "split_file": str(path), "not_in_split_file": sorted(set(by_case) - set(placed))}
    if data_cfg.labeled_cases > 0:
        splits["labeled_cases"] = data_cfg.labeled_cases
    return splits


def save_splits(splits: dict, path) -> None:
    atomic_write.write_text(path, json.dumps(splits, indent=1))


def run_splits(cases: list[Case], data_cfg, seed: int, run_dir=None) -> dict:
    """The run's splits: RUN_DIR/splits.json when it exists (--resume and evaluate: the run's own
    split, always), else a new split of `cases`."""
    path = Path(run_dir) / "splits.json" if run_dir else None
    if path is not None and path.exists():
        return json.loads(path.read_text())
    return make_splits(cases, data_cfg, seed)
