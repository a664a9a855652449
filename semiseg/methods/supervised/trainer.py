"""The supervised baseline: the Trainer's own supervised loss on labelled slices, nothing else.

    python main.py train --method supervised --preset smoke
"""
from semiseg.training.registry import register_method
from semiseg.training.trainer import Trainer


@register_method("supervised")
class Supervised(Trainer):
    """The supervised U-Net baseline: L_sup on labelled slices only."""
