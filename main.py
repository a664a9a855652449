"""The command line from a checkout; the same as the installed `semiseg` command (semiseg/cli.py).

    python main.py train --method supervised --preset cpu
    python main.py --version

It stays at the top of the repository so that `python main.py ...` (the README, the slurm/ scripts)
works without installing anything.
"""
import sys

from semiseg.cli import *  # noqa: F401,F403  (build_parser, cmd_*, exit codes: the API main.py had)
from semiseg.cli import main

if __name__ == "__main__":
    sys.exit(main())
