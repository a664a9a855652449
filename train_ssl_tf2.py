"""Training from a checkout: re-exports semiseg.training.trainer (`Trainer`, `METHODS`,
`register_method`, ...) and `get_method` (now in semiseg.methods), as this module offered them.

    python main.py train --method supervised --preset cpu
"""
from semiseg.training.trainer import *  # noqa: F401,F403  (the public API, unchanged)
from semiseg.methods import get_method  # noqa: F401
from semiseg.methods.supervised.trainer import Supervised  # noqa: F401
from semiseg.training.ema import ema_update  # noqa: F401  (moved out of the trainer module)
from semiseg.training.ramps import linear_rampup, sigmoid_rampup  # noqa: F401  (moved out of the trainer module)
