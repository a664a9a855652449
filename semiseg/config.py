"""Configuration: nested dataclasses, named presets, YAML load/save and strict `--set` overrides.

A run's configuration is resolved in this order, later wins:
    defaults  ->  --preset NAME  ->  --config FILE.yaml  ->  --set section.key=value ...
and the resolved result is written to RUN_DIR/config.yaml, which `--resume` and `evaluate` read back.

    python config.py --preset cpu --set train.lr=3e-4     # print the resolved YAML
    python config.py --list-presets

Unknown keys and values that do not fit a field's type are errors that name the key; nothing is
silently ignored (nanoGPT's strict overrides, without its exec).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from semiseg import rules


@dataclass
class DataConfig:
    format: str = "synthetic"          # synthetic | isic | ph2 | msd | acdc | folders | auto
    path: str = ""                     # data root; empty with format=synthetic = the embedded set
    cache_dir: str = ""                # slice-cache root; empty = $SEMISEG_CACHE or ~/.cache/semiseg
    image_size: int = 64               # slices/images are resized to image_size x image_size
    channels: int = 0                  # 0 = as the data come (1 for grey/CT, 3 for RGB)
    labeled_fraction: float = 0.1      # fraction of the *training* cases whose labels are used
    val_fraction: float = 0.15         # of the labelled cases, per case (never per slice)
    test_fraction: float = 0.15
    split_seed: int = 0                # fixes which cases validate and test; the run seed draws only the
                                       # labelled subset (and the initialisation), so seeds share one test set
    hide_labels: bool = False          # real data: keep held-back labels only to score pseudo targets
    shuffle_buffer: int = 1024         # records; the labelled set of a small study fits entirely
    shuffle_buffer_mb: float = 256.0   # and at most this many MB of cached records per stream; 0 = no bound
    shard_policy: str = "record"       # how input pipelines (one per worker) split a training stream:
                                       # record = exact (results independent of the worker count; every
                                       # worker reads all files, decodes only its share) | file = each
                                       # worker reads only its share of the cache files (results then
                                       # depend on the worker count)
    synthetic_cases: int = 400         # embedded data set: number of 2D images
    synthetic_size: int = 96           # embedded data set: native image size before resizing
    synthetic_difficulty: float = 1.5  # embedded data set: scales the shares of its rare appearance families
                                       # and artefacts (0 = plain lesions only, 1 = the table in docs/data.md).
                                       # At 1.5 the mix, not blur, is what 10% labels cover poorly: supervised
                                       # scored 12 Dice points below all labels there (3 seeds), 5 at 1.0.
    synthetic_seed: int = 0            # the data set's identity; run seeds vary splits and init, not the data
    synthetic_kind: str = "2d"         # 2d: dermoscopy-like lesions (binary) | 3d: CT-like volumes (synthetic_cases
                                       # volumes of synthetic_size^2 x 24 voxels, organ 1 + lesion 2; multi-class)
    # Volumes (NIfTI): how 3D scans become 2D training slices.
    slice_axis: int = 2                # after reorientation to RAS+ : 2 = axial
    modality: str = "auto"             # auto (from dataset.json) | ct | mri
    ct_window: typing.List[float] = field(default_factory=lambda: [-125.0, 275.0])  # HU, abdomen
    label_set: typing.List[int] = field(default_factory=lambda: [1, 2])  # one class: these labels merge into
                                       # the foreground; K classes: exactly K labels, label_set[i] -> class i+1
    # The segmented structures, background (class 0) implicit. One name = binary (sigmoid, one output
    # channel); K >= 2 names = K + 1 classes (softmax). Names label per-class metric columns.
    classes: typing.List[str] = field(default_factory=lambda: ["foreground"])
    split_file: str = ""               # YAML/JSON with train/val/test (optionally labeled) patient or case
                                       # ids that fixes the split exactly; empty = split by the fractions
    labeled_cases: int = 0             # labelled training patients (groups) to draw; 0 = labeled_fraction
    foreground_only: bool = False      # keep slices with foreground plus background_ratio of the rest
    background_ratio: float = 0.1
    unlabeled_test_images: bool = True  # MSD imagesTs serve as unlabelled training data


@dataclass
class ModelConfig:
    name: str = "unet"                 # registered builder in models_tf2.py
    base_filters: int = 16             # 16/32/64 in the seed project
    depth: int = 4                     # down-sampling blocks
    dropout: float = 0.1
    batchnorm: bool = True
    sync_batchnorm: bool = False       # synchronise BN statistics across replicas
    bn_momentum: float = 0.9           # moving-statistics momentum; Keras' 0.99 lags for hundreds of
                                       # steps, so short runs (and EMA teachers in inference mode)
                                       # evaluate with stale statistics. 0.9 = PyTorch's default.
    activation: str = "relu"           # relu | leaky_relu


@dataclass
class TrainConfig:
    epochs: int = 20
    steps_per_epoch: int = 0           # 0 = ceil(training slices / batch_size), same for every method
    batch_size: int = 8                # GLOBAL labelled images per step (all replicas together)
    unlabeled_ratio: int = 1           # unlabelled images per labelled image in a step (SSL methods)
    labeled_forward: str = "separate"  # SSL methods' student pass. separate (ours, a deviation): the labelled
                                       # images in a training-mode forward of their own, so the supervised
                                       # loss sees BN statistics of labelled images only; joint (the papers'
                                       # code): one forward of labelled and unlabelled images, BN statistics
                                       # over both. separate won on the label-efficiency benchmark for most
                                       # methods (docs/benchmarks.md)
    labeled_augment: str = "method"    # augmentation of the labelled images: method (each method's paper:
                                       # strong for MIRA-U, weak for the others) | weak (flips, rotation,
                                       # scale) | strong (weak + photometric) | none. One value for every
                                       # method makes a comparison equal in this too
    lr: float = 1e-3
    lr_scaling: str = "none"           # none | linear: lr * batch_size / lr_reference_batch
    lr_reference_batch: int = 0        # the (global) batch train.lr was tuned at; needed by linear
    schedule: str = "constant"         # constant | cosine | poly
    warmup_epochs: float = 0.0
    optimizer: str = "adam"            # adam (AdamW when weight_decay > 0) | sgd (momentum, e.g. nnU-Net's)
    momentum: float = 0.9              # sgd only
    fused_update: bool = True          # each variable's optimizer update as one TF kernel (ResourceApplyAdam,
                                       # ...; semiseg.training.fused_optimizers): Keras' equations and
                                       # variables, fewer ops; false = Keras' own update ops
    weight_decay: float = 0.0
    clip_norm: float = 5.0             # global-norm gradient clipping; 0 = off
    lambda_dice: float = 0.5           # L_sup = lambda_dice * Dice + lambda_bce * BCE
    lambda_bce: float = 0.5
    patience: int = 0                  # early stopping on validation Dice; 0 = off
    min_delta: float = 0.0
    steps_per_loop: int = 10           # optimizer steps per tf.function call (Orbit-style)
    checkpoint_every: int = 0          # steps between 'latest' checkpoints; 0 = every epoch
    keep_checkpoints: int = 2
    precision: str = "auto"            # auto | float32 | mixed_float16 | mixed_bfloat16; auto: bfloat16 where
                                       # the hardware runs it natively (AVX512_BF16/AMX CPUs, GPUs >= 8.0),
                                       # else float32 (semiseg.precision); run_info.json records it
    distribution: str = "auto"         # auto | none | mirrored | multi_worker
    collective: str = "auto"           # multi-worker all-reduce: auto (NCCL with GPUs, else ring) | nccl | ring
    jit_compile: bool = False          # XLA on the replica step; CPU: one replica only, and slower, so off
    eval_batch_size: int = 16
    export: str = "auto"               # which network is exported as best_model.keras: auto | student | teacher
    end_time_margin_s: float = 300.0   # stop + checkpoint this long before SLURM_JOB_END_TIME; 0 = ignore it


from semiseg import methods as _methods  # noqa: E402  (method specs: no TensorFlow)
from semiseg.errors import ConfigError  # noqa: E402  (defined with the other errors)

# Every method's spec (semiseg/methods/<name>/__init__.py), by name: its section, rules, networks.
METHODS = _methods.specs()

# The configuration: the core sections, then one section per method that declares one, named after
# the method (mean_teacher.*, mixmatch.*, ...). Built from the specs, so a new method's section
# joins config files, --set, presets and validation without an edit here.
Config = dataclasses.make_dataclass("Config", [
    ("method", str, field(default="supervised")),
    ("preset", str, field(default="")),
    ("seed", int, field(default=0)),
    ("data", DataConfig, field(default_factory=DataConfig)),
    ("model", ModelConfig, field(default_factory=ModelConfig)),
    ("train", TrainConfig, field(default_factory=TrainConfig)),
    *[(name, spec.config, field(default_factory=spec.config)) for name, spec in METHODS.items() if spec.config],
])
Config.__module__ = __name__
Config.__doc__ = "A run's whole configuration: method, preset, seed, data, model, train and the methods' sections."


# The seed project's pancreas runs (MSD Task07, 281 labelled CT volumes; pass --data PATH). The seed
# trained on 225 and validated on 56 volumes with no held-out test set; here 56 (20%) validate, 28
# (10%) are held out for test, so 197 train: "all labels" is 197 volumes and the seed's 30 labelled
# volumes are labeled_fraction 30/197.
_PANCREAS = {
    "data": {"format": "msd", "image_size": 256, "labeled_fraction": 30 / 197, "val_fraction": 0.2,
             "test_fraction": 0.1, "modality": "ct"},
    "model": {"base_filters": 32, "depth": 4},
    "train": {"epochs": 100, "batch_size": 8, "lr_reference_batch": 8, "patience": 15},
}

# Tiny images and a handful of steps, for wiring checks (the tests); smoke_multiclass shares it.
_SMOKE = {
    "data": {"image_size": 32, "synthetic_cases": 48, "synthetic_size": 48, "labeled_fraction": 0.25,
             "shuffle_buffer": 64},
    "model": {"base_filters": 4, "depth": 2},
    # float32, not auto: the tests compare values, which must not depend on the CPU's bfloat16 support.
    "train": {"epochs": 2, "steps_per_epoch": 3, "batch_size": 4, "steps_per_loop": 3, "eval_batch_size": 8,
              "precision": "float32"},
}

# Presets are plain override mappings, so they read like the YAML a user would write.
PRESETS: dict[str, dict] = {
    # Seconds: tiny images and a handful of steps; used by the tests and for wiring checks.
    "smoke": _SMOKE,
    # Seconds, multi-class: the embedded CT-like volumes (organ 1, lesion 2 inside it) as two classes,
    # so the C = 3 path (softmax, per-class metrics, label-map predictions) runs without any download.
    "smoke_multiclass": {
        **_SMOKE,
        "data": {"format": "synthetic", "synthetic_kind": "3d", "synthetic_cases": 8, "synthetic_size": 48,
                 "image_size": 32, "classes": ["organ", "lesion"], "label_set": [1, 2], "labeled_fraction": 0.34,
                 "shuffle_buffer": 64},
    },
    # The README's first real run on a CPU: 12 epochs x 40 steps at 64x64 (measured times: docs/benchmarks.md).
    "cpu": {
        "data": {"image_size": 64, "labeled_fraction": 0.1},
        "model": {"base_filters": 16, "depth": 4},
        "train": {"epochs": 12, "batch_size": 8, "steps_per_epoch": 40, "lr": 2e-3, "schedule": "cosine"},
    },
    # The label-efficiency benchmark (bench/label_efficiency.py): the cpu preset's data, network, batch
    # and schedule for every method, trained to convergence: early stopping after 10 epochs without a
    # better validation Dice, a 40-epoch cap (1600 steps) that is also the cosine schedule's horizon.
    # Each method's section values for it (ramps scaled to the cap, EMA decays for a 1600-step run) are
    # in its spec (semiseg/methods/<name>/__init__.py, preset_sections["bench"]), with the reasons.
    "bench": {
        "data": {"image_size": 64, "labeled_fraction": 0.1},
        "model": {"base_filters": 16, "depth": 4},
        "train": {"epochs": 40, "patience": 10, "batch_size": 8, "steps_per_epoch": 40, "lr": 2e-3,
                  "schedule": "cosine"},
    },
    # `bench` with each method's unlabelled-loss weight as the benchmark's tuning budget chose it on
    # validation (10% labels, seed 0, train.labeled_forward=separate: bench/results/label_efficiency/
    # tuning.json; a test keeps the two equal); the values are in the methods' specs
    # (preset_sections["bench_tuned"]), applied on top of everything `bench` sets.
    "bench_tuned": {},
    # One family, fair by construction: every pancreas_* preset trains the same network (the seed's
    # supervised U-Net, base 32), batch, schedule and budget (100 epochs, early stopping after 15);
    # they differ only in the labelled fraction and the method's own section. The seed project ran
    # Mean Teacher and MixMatch smaller to fit its GPUs (base 16, batch 4; MixMatch 150 epochs): add
    # --set model.base_filters=16 train.batch_size=4 train.lr_reference_batch=4 to reproduce those runs.
    "pancreas_supervised": {**_PANCREAS, "data": {**_PANCREAS["data"], "labeled_fraction": 1.0}},
    "pancreas_mean_teacher": {**_PANCREAS, "mean_teacher": {"ema_decay": 0.99, "consistency": 50.0}},
    "pancreas_mixmatch": {**_PANCREAS, "mixmatch": {"temperature": 0.5, "alpha": 0.75, "k": 2}},
}

# ACDC with the semi-supervised literature's protocol, as SSL4MIS (github.com/HiLab-git/SSL4MIS) runs it
# for its ACDC table (the 3 and 7 labelled-patient columns that BCP, ABD and UniMatch re-runs report):
# its 70/10/20 patient split and labelled patients (data.split_file acdc_ssl4mis, shipped), RV/MYO/LV
# as classes 1/2/3, 2D slices resized to 256x256, 24 images a step of which 12 labelled (here
# batch_size 12 + unlabeled_ratio 1), 30k iterations (150 epochs x 200 steps: validation every 200
# iterations, as there), SGD lr 0.01 with momentum 0.9 and weight decay 1e-4, poly decay (power 0.9),
# a U-Net of 16-256 channels, loss 0.5 CE + 0.5 Dice, Mean Teacher EMA 0.99 with consistency 0.1 ramped
# up over the whole run (SSL4MIS: 200 ramp units of 150 iterations). Pass --data PATH/ACDC.
# Deviations: MRI slices are scaled per volume between the 0.5/99.5 percentiles (SSL4MIS: min-max),
# the poly schedule ends at 1% of lr (SSL4MIS: 0), the U-Net's dropout is 0.1 throughout (SSL4MIS:
# 0.05-0.5 by depth), and supervised runs train on the 12 labelled images a step only.
for _patients in (3, 7):
    PRESETS[f"acdc_{_patients}"] = {
        "data": {"format": "acdc", "split_file": "acdc_ssl4mis", "labeled_cases": _patients, "image_size": 256,
                 "classes": ["RV", "MYO", "LV"], "label_set": [1, 2, 3], "modality": "mri"},
        "model": {"base_filters": 16, "depth": 4},
        "train": {"epochs": 150, "steps_per_epoch": 200, "batch_size": 12, "unlabeled_ratio": 1,
                  "optimizer": "sgd", "lr": 0.01, "momentum": 0.9, "weight_decay": 1e-4, "schedule": "poly",
                  "clip_norm": 0.0, "lambda_dice": 0.5, "lambda_bce": 0.5},
        "mean_teacher": {"ema_decay": 0.99, "consistency": 0.1, "rampup_epochs": 150.0},
    }


def _merge_method_presets() -> None:
    """Each method's values in the shared presets, and its own presets (MethodSpec.preset_sections,
    .presets): a method sets what it needs without an edit here."""
    for name, spec in METHODS.items():
        for preset, values in spec.preset_sections.items():
            if preset not in PRESETS:
                raise ConfigError(f"method {name}: preset_sections names preset '{preset}', which does not exist "
                                  f"(known: {', '.join(sorted(PRESETS))})")
            PRESETS[preset] = {**PRESETS[preset], name: {**PRESETS[preset].get(name, {}), **values}}
        for preset, mapping in spec.presets.items():
            if preset in PRESETS:
                raise ConfigError(f"method {name}: its preset '{preset}' is already defined")
            PRESETS[preset] = mapping


_merge_method_presets()
# Presets that are another preset plus their own values, built once the methods' sections are in.
for _derived, _base in (("bench_tuned", "bench"),):
    _own = PRESETS[_derived]
    PRESETS[_derived] = {key: {**value, **_own.get(key, {})} if isinstance(value, dict) else value
                         for key, value in PRESETS[_base].items()}
    PRESETS[_derived].update({key: value for key, value in _own.items() if key not in PRESETS[_base]})


def _field_types(cls) -> dict[str, typing.Any]:
    return typing.get_type_hints(cls)


def _coerce(value, typ, key: str):
    """Coerce a YAML/--set value to the dataclass field's type, or raise ConfigError naming key."""
    origin = typing.get_origin(typ)
    if origin in (list, typing.List):
        (item_type,) = typing.get_args(typ) or (str,)
        if isinstance(value, str):
            value = yaml.safe_load(value) if value.strip().startswith("[") else [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        return [_coerce(v, item_type, key) for v in value]
    if typ is bool:
        if isinstance(value, bool):
            return value
        text = str(value).strip().lower()
        if text in ("1", "true", "yes", "on"):
            return True
        if text in ("0", "false", "no", "off"):
            return False
        raise ConfigError(f"{key}: expected true/false, got {value!r}")
    if typ in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}")
        try:
            number = float(value) if isinstance(value, str) else value
            if typ is int:
                if float(number) != int(float(number)):
                    raise ValueError
                return int(float(number))
            return float(number)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected {typ.__name__}, got {value!r}") from None
    if typ is str:
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {value!r}")
        return "" if value is None else str(value)
    raise ConfigError(f"{key}: unsupported field type {typ}")


def apply_mapping(cfg, mapping: dict, prefix: str = ""):
    """Apply a nested mapping of overrides to dataclass `cfg` in place; unknown keys are errors."""
    if not isinstance(mapping, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {mapping!r}")
    types = _field_types(type(cfg))
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if key not in types:
            known = ", ".join(sorted(types))
            raise ConfigError(f"unknown config key '{dotted}' (known here: {known})")
        current = getattr(cfg, key)
        if dataclasses.is_dataclass(current):
            apply_mapping(current, value, dotted + ".")
        else:
            setattr(cfg, key, _coerce(value, types[key], dotted))
    return cfg


def parse_set(assignments: typing.Iterable[str]) -> dict:
    """Turn ['train.lr=3e-4', 'seed=1'] into a nested mapping (values still strings)."""
    nested: dict = {}
    for item in assignments:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, value = item.split("=", 1)
        parts = [p for p in dotted.strip().split(".") if p]
        if not parts:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {dotted}: '{part}' is not a section")
        node[parts[-1]] = value
    return nested


def add_set_argument(parser: argparse.ArgumentParser, help: str = "section.key=value overrides, e.g. "
                     "train.lr=3e-4 data.labeled_fraction=0.3; repeatable, later wins per key") -> None:
    """The one `--set` option of every semiseg command line. `extend`, not plain nargs: a repeated
    `--set a=1 --set b=2` (as sbatch scripts build it) keeps both, where argparse's default would
    silently keep only the last occurrence; `--set a=1 b=2` still works."""
    parser.add_argument("--set", nargs="*", action="extend", default=[], metavar="KEY=VALUE", help=help)


def flat_dict(mapping: dict, prefix: str = "") -> dict:
    """{'train': {'lr': 0.001}} -> {'train.lr': 0.001}: the dotted keys of --set, for comparing configs."""
    flat = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(flat_dict(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def save_yaml(cfg: Config, path) -> None:
    """Write atomically: a crash never leaves a half-written config.yaml."""
    from semiseg.runs import atomic_write
    atomic_write.write_text(path, yaml.safe_dump(to_dict(cfg), sort_keys=False))


def load_yaml(path) -> dict:
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as err:
        raise ConfigError(f"cannot read config file {path}: {err.strerror}") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {path} is not valid YAML: {err}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: expected a mapping at the top level")
    return data


# Settings added after runs had been saved without them, with the value those runs trained with (not
# today's default, where the two differ): a run folder's config.yaml is read through `saved_run_mapping`,
# so --resume, evaluate and the analysis scripts see what an older run really did.
KEYS_ADDED_LATER = {"train.labeled_forward": "joint", "train.fused_update": False, "train.labeled_augment": "method",
                    "mixmatch.mix_labeled": True, "mira_u.student": "hybrid",
                    "mira_u.pseudo_label": "shrink", "mean_teacher.teacher_forward": "joint",
                    "bayesian_pl.label_rule": "confidence"}
# train.* settings that only a method training on unlabelled images reads: a supervised run's value
# says nothing, so comparisons neither split supervised rows by them nor pair baselines on them.
UNLABELED_ONLY_KEYS = ("train.labeled_forward",)


def saved_run_mapping(mapping: dict) -> dict:
    """A run's saved config mapping with every KEYS_ADDED_LATER key it lacks filled in (a copy)."""
    filled = {key: dict(value) if isinstance(value, dict) else value for key, value in mapping.items()}
    for dotted, value in KEYS_ADDED_LATER.items():
        section, key = dotted.split(".")
        if isinstance(filled.get(section), dict) and key not in filled[section]:
            filled[section][key] = value
    return filled


def load_saved_config(path) -> Config:
    """RUN/config.yaml as the Config the run trained with (see KEYS_ADDED_LATER)."""
    return from_dict(saved_run_mapping(load_yaml(path)))


def resolve(preset: str = "", config_file: str = "", overrides: typing.Iterable[str] = (), method: str = "") -> Config:
    """defaults -> preset -> YAML file -> --set overrides (later wins)."""
    cfg = Config()
    if preset:
        if preset not in PRESETS:
            raise ConfigError(f"unknown preset '{preset}' (known: {', '.join(sorted(PRESETS))})")
        apply_mapping(cfg, PRESETS[preset])
        cfg.preset = preset
    if config_file:
        apply_mapping(cfg, load_yaml(config_file))
    if method:
        cfg.method = method
    apply_mapping(cfg, parse_set(overrides))
    validate(cfg)
    return cfg


def from_dict(mapping: dict) -> Config:
    cfg = apply_mapping(Config(), mapping)
    validate(cfg)
    return cfg


MODEL_NAMES = ("unet", "hybrid")                  # models_tf2.MODELS (test-checked)
DATA_FORMATS = ("synthetic", "isic", "ph2", "msd", "acdc", "folders", "auto")   # data_sources.SOURCES + auto

# Valid range of every int/float field, checked at resolution: (test, wording). A test asserts
# that each numeric field of every section has an entry, so a new field cannot skip its check.
# Each method's section adds its own (MethodSpec.ranges), prefixed with its name.
_AT_LEAST_0, _AT_LEAST_1, _POSITIVE, _FRACTION, _DECAY = rules.AT_LEAST_0, rules.AT_LEAST_1, rules.POSITIVE, rules.FRACTION, rules.DECAY
RANGES: dict[str, tuple] = {
    "seed": _AT_LEAST_0,
    "data.image_size": _AT_LEAST_1, "data.channels": _AT_LEAST_0,
    "data.labeled_fraction": (lambda v: 0 < v <= 1, "in (0, 1]"),
    "data.val_fraction": _DECAY, "data.test_fraction": _DECAY,
    "data.shuffle_buffer": _AT_LEAST_1, "data.shuffle_buffer_mb": _AT_LEAST_0, "data.synthetic_cases": _AT_LEAST_1,
    "data.synthetic_size": (lambda v: v >= 16, ">= 16 (the generator's minimum)"), "data.synthetic_difficulty": _AT_LEAST_0,
    "data.synthetic_seed": _AT_LEAST_0, "data.split_seed": _AT_LEAST_0, "data.slice_axis": (lambda v: v in (0, 1, 2), "0, 1 or 2"),
    "data.background_ratio": _FRACTION, "data.labeled_cases": (lambda v: v >= 0, ">= 0 (0 = labeled_fraction)"),
    "model.base_filters": _AT_LEAST_1, "model.depth": _AT_LEAST_1, "model.dropout": _DECAY,
    "model.bn_momentum": _DECAY,
    "train.epochs": _AT_LEAST_1, "train.steps_per_epoch": (lambda v: v >= 0, ">= 0 (0 = one pass over the data)"),
    "train.batch_size": _AT_LEAST_1, "train.unlabeled_ratio": _AT_LEAST_0, "train.lr": _POSITIVE,
    "train.warmup_epochs": _AT_LEAST_0, "train.momentum": _DECAY, "train.weight_decay": _AT_LEAST_0,
    "train.clip_norm": (lambda v: v >= 0, ">= 0 (0 = off)"), "train.lambda_dice": _AT_LEAST_0,
    "train.lambda_bce": _AT_LEAST_0, "train.patience": (lambda v: v >= 0, ">= 0 (0 = off)"),
    "train.min_delta": _AT_LEAST_0, "train.steps_per_loop": _AT_LEAST_1,
    "train.checkpoint_every": (lambda v: v >= 0, ">= 0 (0 = every epoch)"), "train.keep_checkpoints": _AT_LEAST_1,
    "train.eval_batch_size": _AT_LEAST_1, "train.end_time_margin_s": _AT_LEAST_0,
    "train.lr_reference_batch": _AT_LEAST_0,
    **{f"{name}.{key}": rule for name, spec in METHODS.items() for key, rule in spec.ranges.items()},
}
CHOICES: dict[str, tuple] = {
    "method": tuple(METHODS), "model.name": MODEL_NAMES, "data.format": DATA_FORMATS,
    "data.modality": ("auto", "ct", "mri"), "data.synthetic_kind": ("2d", "3d"), "model.activation": ("relu", "leaky_relu"),
    "train.lr_scaling": ("none", "linear"), "train.schedule": ("constant", "cosine", "poly"),
    "train.optimizer": ("adam", "sgd"), "train.labeled_forward": ("joint", "separate"),
    "train.labeled_augment": ("method", "weak", "strong", "none"), "train.precision": ("auto", "float32", "mixed_float16", "mixed_bfloat16"),
    "train.distribution": ("auto", "none", "mirrored", "multi_worker"),
    "train.export": ("auto",) + tuple(dict.fromkeys(r for spec in METHODS.values() for r in spec.networks)),
    "train.collective": ("auto", "nccl", "ring"), "data.shard_policy": ("record", "file"),
    **{f"{name}.{key}": allowed for name, spec in METHODS.items() for key, allowed in spec.choices.items()},
}
# model.* settings the hybrid network cannot honour, with the values it accepts (the default, and
# the value that says what the network really does) and why.
_HYBRID_FIXED = {
    "dropout": ((ModelConfig.dropout, 0.0), "it has no dropout layer (as MIRA-U's student)"),
    "batchnorm": ((True,), "its convolution blocks always use BatchNorm (as MIRA-U's student)"),
    "activation": (("relu",), "its convolution blocks use ReLU (as MIRA-U's student)"),
}


def cache_home(data_cfg) -> Path:
    """Where semiseg keeps what it generates: data.cache_dir, else $SEMISEG_CACHE, else
    ~/.cache/semiseg (the slice caches and the embedded data set live side by side under it)."""
    return Path(data_cfg.cache_dir or os.environ.get("SEMISEG_CACHE") or Path.home() / ".cache" / "semiseg")


def get(cfg, dotted: str):
    """The value of a dotted key ('train.lr', 'seed')."""
    node = cfg
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def validate(cfg: Config) -> None:
    """Every rule a resolved configuration must meet: each field's range or choices, then the
    rules between fields. A violation is a ConfigError naming the key and what is allowed."""
    for key, (ok, wording) in RANGES.items():
        value = get(cfg, key)
        if not ok(value):
            raise ConfigError(f"{key}: must be {wording}, got {value!r}")
    for key, allowed in CHOICES.items():
        value = get(cfg, key)
        if value not in allowed:
            raise ConfigError(f"{key}: must be one of {', '.join(allowed)}, got {value!r}")
    _validate_data(cfg)
    _validate_train(cfg)
    _validate_networks(cfg)


def _check(ok: bool, key: str, msg: str) -> None:
    if not ok:
        raise ConfigError(f"{key}: {msg}")


def _validate_data(cfg: Config) -> None:
    d = cfg.data
    _check(d.val_fraction + d.test_fraction < 1, "data.val_fraction/test_fraction",
           f"must sum to less than 1, got {d.val_fraction} + {d.test_fraction}")
    _check(len(d.ct_window) == 2 and d.ct_window[0] < d.ct_window[1], "data.ct_window",
           f"must be [low, high] with low < high (HU), got {d.ct_window}")
    _check(len(d.label_set) >= 1 and all(v >= 1 for v in d.label_set), "data.label_set",
           f"must list one or more foreground labels >= 1 (0 is background), got {d.label_set}")
    names = list(d.classes)
    _check(len(names) >= 1 and all(names), "data.classes",
           f"must name one or more structures (non-empty names; background is implicit), got {d.classes}")
    # Names become metric columns (dice_RV) and file headers: no spaces or separators.
    _check(all(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", n) for n in names), "data.classes",
           f"names may hold letters, digits, '_' and '-' only (they name metric columns), got {d.classes}")
    _check(len(set(names)) == len(names), "data.classes", f"names must be unique, got {d.classes}")
    _check(all(n.lower() != "background" for n in names), "data.classes",
           f"class 0 is the implicit background: do not list it, got {d.classes}")
    # One name keeps today's meaning (every label_set value is foreground); K names need one label each.
    _check(len(names) == 1 or len(d.label_set) == len(names), "data.label_set",
           f"data.classes names {len(names)} structures {names}: label_set must list exactly {len(names)} "
           f"labels (label_set[i] -> class i+1), got {d.label_set}")
    _check(len(names) == 1 or len(d.label_set) == len(set(d.label_set)), "data.label_set",
           f"lists a label twice: {d.label_set} (with several classes each label is one class)")
    _check(len(names) == 1 or d.format != "synthetic" or d.synthetic_kind == "3d", "data.classes",
           f"the embedded 2D set has one structure (0/255 masks); {len(names)} classes need data.synthetic_kind=3d "
           f"(organ 1, lesion 2: --preset smoke_multiclass) or a multi-label data set")


def num_classes(data_cfg) -> int:
    """C, the number of classes including background: 2 for binary, K + 1 for K named structures."""
    return len(data_cfg.classes) + 1


def is_multiclass(data_cfg) -> bool:
    """K >= 2 named structures: softmax over C channels (binary stays one sigmoid channel)."""
    return len(data_cfg.classes) >= 2


def output_channels(data_cfg) -> int:
    """Network output channels: 1 (sigmoid) for binary, C (softmax logits) for multi-class."""
    return num_classes(data_cfg) if is_multiclass(data_cfg) else 1


def _validate_train(cfg: Config) -> None:
    t, info = cfg.train, METHODS[cfg.method]
    if info.uses_unlabeled:
        _check(t.unlabeled_ratio >= 1, "train.unlabeled_ratio",
               f"method {cfg.method} trains on unlabelled images: must be >= 1, got {t.unlabeled_ratio}")
    exportable = ("auto",) + info.networks
    _check(t.export in exportable, "train.export",
           f"method {cfg.method} has no '{t.export}' network: must be one of {', '.join(exportable)}")
    _check(t.lambda_dice + t.lambda_bce > 0, "train.lambda_dice/lambda_bce",
           "at least one supervised loss weight must be > 0")
    # Only the cosine schedule has a warm-up phase (train_ssl_tf2.Trainer._lr_schedule).
    _check(t.warmup_epochs == 0 or t.schedule == "cosine", "train.warmup_epochs",
           f"only train.schedule=cosine warms up; got warmup_epochs={t.warmup_epochs} with schedule={t.schedule}")
    # batch_size is global, so the replica count alone says nothing about how far the batch moved
    # from the one lr was tuned at: linear scaling is relative to that reference batch.
    _check(t.lr_scaling != "linear" or t.lr_reference_batch >= 1, "train.lr_reference_batch",
           "train.lr_scaling=linear scales lr by batch_size / lr_reference_batch: set it to the batch "
           f"train.lr was tuned at (>= 1), got {t.lr_reference_batch}")
    _check(t.warmup_epochs < t.epochs or t.warmup_epochs == 0, "train.warmup_epochs",
           f"must be less than train.epochs={t.epochs}, got {t.warmup_epochs}")


def _validate_networks(cfg: Config) -> None:
    """Image size vs each network's down-sampling, model.* settings a network would ignore, and the
    method's own rules between fields (MethodSpec.validate)."""
    size, m, spec = cfg.data.image_size, cfg.model, METHODS[cfg.method]
    if spec.validate is not None:
        spec.validate(cfg)
    uses_model = spec.uses_model_config(cfg) if callable(spec.uses_model_config) else spec.uses_model_config
    if not uses_model:      # its networks are built from its own section (MIRA-U's hybrid student)
        return
    if m.name == "hybrid":
        _check(size % 16 == 0, "data.image_size", f"{size} must be a multiple of 16 (model.name=hybrid)")
        for key, (accepted, why) in _HYBRID_FIXED.items():
            value = getattr(m, key)
            _check(value in accepted, f"model.{key}", f"model.name=hybrid cannot honour {value!r}: {why}; "
                   f"allowed: {' or '.join(repr(a) for a in accepted)}")
        return
    _check(size % (2 ** m.depth) == 0, "data.image_size",
           f"{size} must be divisible by 2**model.depth = {2 ** m.depth}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="Print a resolved semiseg configuration as YAML.")
    parser.add_argument("--preset", default="")
    parser.add_argument("--config", default="")
    parser.add_argument("--method", default="")
    add_set_argument(parser)
    parser.add_argument("--list-presets", action="store_true")
    args = parser.parse_args(argv)
    if args.list_presets:
        print("\n".join(sorted(PRESETS)))
        return 0
    try:
        cfg = resolve(args.preset, args.config, args.set, args.method)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    yaml.safe_dump(to_dict(cfg), sys.stdout, sort_keys=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
