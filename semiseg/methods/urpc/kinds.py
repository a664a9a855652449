"""URPC's perturbation kinds and which auxiliary head gets which: read by the config rules (no
TensorFlow) and by the network builder, so a leaf of both.

    python -c "from semiseg.methods.urpc.kinds import perturbation_kinds; print(perturbation_kinds('feature_noise,dropout', 3))"
"""
from __future__ import annotations

from semiseg.errors import ConfigError

# What may stand in front of an auxiliary head (SSL4MIS's three kinds, and none).
PERTURBATION_KINDS = ("feature_noise", "feature_dropout", "dropout", "none")


def perturbation_kinds(text: str, n_heads: int) -> list[str]:
    """The kind of each of `n_heads` auxiliary heads, finest first (the list's last kind repeats)."""
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    if not kinds:
        raise ConfigError("urpc.perturbations: empty; name one kind per auxiliary head "
                          f"({', '.join(PERTURBATION_KINDS)}), e.g. feature_noise,feature_dropout,dropout")
    return [kinds[min(i, len(kinds) - 1)] for i in range(n_heads)]


def unknown_kinds(text: str) -> list[str]:
    """The names in `text` that are no kind."""
    return [k for k in perturbation_kinds(text, len(text.split(","))) if k not in PERTURBATION_KINDS]
