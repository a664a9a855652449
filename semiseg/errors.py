"""The error classes every stage raises and the CLI maps to exit codes (2 bad input, 74 write failed).

    python -c "from semiseg.errors import DataError; print(DataError.__mro__)"

They live here, in a module that imports nothing of semiseg, so that any stage can raise them
without importing another stage (data sources and volume readers both raise DataError). Their
base classes stay those of their first home, so `except ValueError` / `except OSError` clauses
keep catching them.
"""
from __future__ import annotations

from pathlib import Path


class ConfigError(ValueError):
    """A bad key or value in a preset, YAML file or --set override."""


class DataError(ValueError):
    """A problem with the input data; the message names the file and what is wrong."""


class RunDirError(RuntimeError):
    """The run folder cannot be used as asked (exists, or missing for --resume)."""


class WriteError(OSError):
    """A file could not be written; the previous version (if any) is untouched."""

    def __init__(self, path, reason: str, errno: int | None = None):
        super().__init__(errno, f"cannot write {path}: {reason}")
        self.path, self.reason = Path(path), reason

    def __str__(self) -> str:
        return self.strerror

    def __reduce__(self):       # crosses process pools intact (OSError would pickle only its args)
        return type(self), (self.path, self.reason, self.errno)
