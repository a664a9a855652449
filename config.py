"""Configuration from a checkout: re-exports semiseg.config (dataclasses, presets, YAML, --set).

    python config.py --preset cpu --set train.lr=3e-4     # print the resolved YAML
    python config.py --list-presets
"""
import sys

from semiseg.config import *  # noqa: F401,F403  (the public API, unchanged)
from semiseg.config import METHODS, main
from semiseg.methods.spec import MethodSpec as MethodInfo  # noqa: F401  (the spec replaced MethodInfo)

# The methods' sections moved into their packages (semiseg/methods/<name>/); the old names still work.
MeanTeacherConfig, MixMatchConfig, MiraUConfig = (METHODS[name].config for name in ("mean_teacher", "mixmatch", "mira_u"))

if __name__ == "__main__":
    sys.exit(main())
