"""Configuration from a checkout: re-exports semiseg.config (dataclasses, presets, YAML, --set).

    python config.py --preset cpu --set train.lr=3e-4     # print the resolved YAML
    python config.py --list-presets
"""
import sys

from semiseg.config import *  # noqa: F401,F403  (the public API, unchanged)
from semiseg.config import main

if __name__ == "__main__":
    sys.exit(main())
