"""`python -m semiseg train ...` == `semiseg train ...` == `python main.py train ...`."""
import sys

from semiseg.cli import main

sys.exit(main())
