"""Value rules for configuration fields: (test, wording) pairs that `config.validate` checks and names
in its errors. Shared by the core sections (semiseg.config) and the methods' own sections (each
method's spec in semiseg/methods/<name>/), which is why they live apart from both.

    from semiseg.rules import AT_LEAST_0, FRACTION
    ranges = {"threshold": FRACTION, "weight": AT_LEAST_0}      # a method's MethodSpec.ranges
"""
from __future__ import annotations

AT_LEAST_0 = (lambda v: v >= 0, ">= 0")
AT_LEAST_1 = (lambda v: v >= 1, ">= 1")
POSITIVE = (lambda v: v > 0, "> 0")
FRACTION = (lambda v: 0 <= v <= 1, "in [0, 1]")
DECAY = (lambda v: 0 <= v < 1, "in [0, 1)")       # EMA decays, dropout rates, momenta
