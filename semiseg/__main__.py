"""`python -m semiseg train ...` == `semiseg train ...` == `python main.py train ...`."""
import sys

from semiseg.cli import main

sys.exit(main(prog="python -m semiseg"))   # argv[0] would say __main__.py
