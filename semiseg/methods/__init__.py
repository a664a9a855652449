"""Semi-supervised methods, one package each, found by folder: adding a method adds one package.

    python main.py train --method mean_teacher --preset smoke
    python -c "from semiseg import methods; print(methods.names())"

`semiseg/methods/<name>/__init__.py` is the method's spec (config section, rules, networks; no
TensorFlow), `semiseg/methods/<name>/trainer.py` its registered Trainer subclass. `spec(name)` and
`specs()` import the light halves only; `get_method(name)` imports the trainer.
"""
from __future__ import annotations

import importlib
import pkgutil

from semiseg.errors import ConfigError
from semiseg.methods.spec import SPECS, MethodSpec  # noqa: F401  (MethodSpec: the methods' API)


def names() -> tuple[str, ...]:
    """Every method package under semiseg/methods, sorted (no import: cheap enough for --help)."""
    return tuple(sorted(m.name for m in pkgutil.iter_modules(__path__) if m.ispkg and not m.name.startswith("_")))


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"--method: unknown method '{name}' (known: {', '.join(names())})")


def spec(name: str) -> MethodSpec:
    """The spec `semiseg/methods/<name>/__init__.py` registers."""
    if name not in names():
        raise _unknown(name)
    importlib.import_module(f"{__name__}.{name}")
    if name not in SPECS:
        raise ConfigError(f"semiseg/methods/{name}/__init__.py registers no MethodSpec named '{name}'")
    return SPECS[name]


def specs() -> dict[str, MethodSpec]:
    """Every method's spec, by name in sorted order."""
    return {name: spec(name) for name in names()}


def get_method(name: str) -> type:
    """The Trainer subclass registered as `name` (imports its trainer.py, and so TensorFlow)."""
    from semiseg.training.registry import METHODS
    spec(name)
    importlib.import_module(f"{__name__}.{name}.trainer")
    if name not in METHODS:
        raise ConfigError(f"semiseg/methods/{name}/trainer.py registers no Trainer named '{name}' "
                          f"(decorate its class with @register_method('{name}'))")
    return METHODS[name]
