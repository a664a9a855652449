"""What configuration, run loading and the benchmarks know of a method without importing TensorFlow.

Each method is a package `semiseg/methods/<name>/`: its `__init__.py` holds the method's config
section (a dataclass), the section's value rules, its networks by role and this spec, and registers
the spec; its `trainer.py` holds the Trainer subclass (TensorFlow). Configuration resolution
(`config.py`), `--help`, `analysis/` and loading a finished run read the spec only, so they stay
free of TensorFlow and of training code.

    python -c "from semiseg import methods; print(methods.spec('mean_teacher'))"
"""
from __future__ import annotations

import typing
from dataclasses import dataclass, field

SPECS: dict[str, "MethodSpec"] = {}


@dataclass(frozen=True)
class MethodSpec:
    name: str
    summary: str                        # one line for `train --help` and the README's method table
    paper: str                          # the reference the method follows
    # (cfg, image_size, channels) -> {role: keras model}; 'student' is the network the optimizer
    # trains. Builders import the model code inside the call (this module stays TensorFlow-free).
    build_networks: typing.Callable
    networks: typing.Tuple[str, ...]    # the roles build_networks returns (what train.export may name)
    uses_unlabeled: bool                # its step draws unlabelled images: train.unlabeled_ratio >= 1
    config: typing.Optional[type] = None   # its section's dataclass; the section is named after the method
    ranges: dict = field(default_factory=dict)     # section field -> semiseg.rules pair
    choices: dict = field(default_factory=dict)    # section field -> allowed values
    # (cfg) -> None, raising ConfigError for rules between fields (e.g. image size vs patch size).
    validate: typing.Optional[typing.Callable] = None
    # False: its networks ignore model.*; or (cfg) -> bool where a setting decides (MIRA-U's student).
    uses_model_config: typing.Union[bool, typing.Callable] = True
    # Values this method's section takes in the shared presets: {preset name: {field: value}}.
    preset_sections: dict = field(default_factory=dict)
    presets: dict = field(default_factory=dict)    # presets of its own: {name: full override mapping}
    unsup_weight: str = ""              # dotted key of the unlabelled loss's weight (the tuning budget's knob)
    tune_factors: typing.Tuple[float, ...] = (0.1, 1.0, 10.0)   # its 3 tried values, as factors of the default


def register(spec: MethodSpec) -> MethodSpec:
    """Called by each method package's __init__ at import."""
    SPECS[spec.name] = spec
    return spec
