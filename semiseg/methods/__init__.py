"""Semi-supervised methods, one module each, registered by name; `get_method(name)` loads them.

    python main.py train --method mean_teacher --preset smoke
"""
from __future__ import annotations

from semiseg.errors import ConfigError
from semiseg.training.registry import METHODS


def get_method(name: str) -> type:
    """The Trainer subclass registered as `name`. Importing the method modules here (not in the
    registry, not in the Trainer) keeps the imports one-way: methods -> trainer -> registry."""
    from semiseg.methods import mean_teacher, mira_u, mixmatch, supervised  # noqa: F401  (registration by import)
    if name not in METHODS:        # exit 2 in main.py; config.validate catches it earlier
        raise ConfigError(f"--method: unknown method '{name}' (known: {', '.join(sorted(METHODS))})")
    return METHODS[name]
