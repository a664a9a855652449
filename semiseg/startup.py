"""Quiet start-up: TensorFlow's C++ INFO/WARNING lines stay out of semiseg's output.

    python main.py train --method supervised --preset smoke     # the first line is semiseg's

TensorFlow 2.21 logs its oneDNN notice and "Could not find cuda drivers" through absl before
absl is initialised, so TF_CPP_MIN_LOG_LEVEL does not silence them. `quiet_tensorflow_import()`
hooks the first `import tensorflow`, whoever makes it: while TensorFlow loads, file descriptor 2 goes
to a temporary file; afterwards every line that is not a C++ INFO/WARNING line (Python warnings,
errors, C++ ERROR/FATAL lines) is written back to stderr. A user who set TF_CPP_MIN_LOG_LEVEL
themselves gets TensorFlow's own behaviour.
"""
from __future__ import annotations

import importlib.abc
import os
import re
import sys
import tempfile

# "I0000 00:00:1796052335.439702    6758 port.cc:153] ..." (absl/glog format), and absl's notice.
_CPP_NOISE = re.compile(r"^([IW]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+ \S+:\d+\] |"
                        r"WARNING: All log messages before absl::InitializeLog\(\) is called)")


def filter_cpp_log(text: str) -> str:
    """`text` without TensorFlow's C++ INFO/WARNING lines."""
    return "".join(line for line in text.splitlines(keepends=True) if not _CPP_NOISE.match(line))


class _QuietLoader(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        sys.stderr.flush()
        saved = os.dup(2)
        with tempfile.TemporaryFile(mode="w+b") as log:
            os.dup2(log.fileno(), 2)
            try:
                self.loader.exec_module(module)
            finally:
                sys.stderr.flush()
                os.dup2(saved, 2)
                os.close(saved)
                log.seek(0)
                sys.stderr.write(filter_cpp_log(log.read().decode(errors="replace")))
                sys.stderr.flush()


class _QuietFinder(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "tensorflow":
            return None
        sys.meta_path.remove(self)          # once: the real finders locate the package
        from importlib.util import find_spec
        spec = find_spec(name)
        if spec is not None and spec.loader is not None:
            spec.loader = _QuietLoader(spec.loader)
        return spec


def quiet_tensorflow_import() -> None:
    """Silence TensorFlow's start-up C++ log unless the user chose a TF_CPP_MIN_LOG_LEVEL."""
    if "TF_CPP_MIN_LOG_LEVEL" in os.environ or "tensorflow" in sys.modules:
        return
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"     # the rest of TF's C++ log (CUDA probes) as before
    if not any(isinstance(f, _QuietFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, _QuietFinder())
