"""Data pipeline from a checkout: re-exports semiseg.data.loader (`prepare_data`, `DataBundle`, ...).

    python main.py preprocess --data PATH --preset NAME   # build the slice cache once
"""
from semiseg.data.loader import *  # noqa: F401,F403  (the public API, unchanged)
