"""Bayesian pseudo labels' spec (SegPL-VI): its config section, value rules and network (the Trainer: trainer.py).

    python main.py train --method bayesian_pl --preset smoke
    python main.py train --method bayesian_pl --preset cpu --set bayesian_pl.prior_mu=0.7 bayesian_pl.prior_sigma=0.15
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError
from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, FRACTION, POSITIVE


@dataclass
class BayesianPLConfig:
    prior_mu: float = 0.5              # Gaussian prior of the threshold T (the README's default; its example
    prior_sigma: float = 0.16          # config uses 0.7 / 0.15)
    kl_weight: float = 0.1             # weight of KL(q(T) || p(T)), ramped with the pseudo-label term (EMSSL: 0.1 * alpha(t))
    lambda_u: float = 1.0              # weight of the pseudo-label loss (EMSSL: alpha = 1 times beta = 1)
    rampup_start: float = 0.4          # the ramp starts at this fraction of train.epochs (EMSSL: warmup_start 0.4)
    rampup_length: float = 0.1         # and rises linearly to 1 over this fraction of train.epochs (EMSSL: warmup 0.1)
    threshold_temperature: float = 0.0  # 0: hard mask 1(c > T), T learned by the KL term only (EMSSL);
                                       # > 0: soft mask sigmoid((c - T) / temperature), a gradient into T
    label_rule: str = "confidence"     # confidence (ours, any number of classes): label = argmax, pixels kept
                                       # where confidence > T; cut (EMSSL's binary code): every pixel
                                       # labelled 1(p > T), so T moves the foreground's edge; binary only
    probe_cases: int = 32              # hidden-truth cases scoring the masked pseudo labels per epoch; 0 = off


def validate(cfg) -> None:
    """Rules between fields: the cut rule is EMSSL's binary one and has no soft form here."""
    s = cfg.bayesian_pl
    if s.label_rule == "cut" and len(cfg.data.classes) > 1:
        raise ConfigError(f"bayesian_pl.label_rule=cut labels one foreground channel 1(p > T); data.classes has "
                          f"{len(cfg.data.classes)} classes: use label_rule=confidence")
    if s.label_rule == "cut" and s.threshold_temperature > 0:
        raise ConfigError("bayesian_pl.threshold_temperature > 0 relaxes the confidence mask; with "
                          "bayesian_pl.label_rule=cut set it to 0")


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """One network (model.*): it labels its own unlabelled images. The threshold's posterior is two
    learned scalars in the trainer's state, not a network."""
    from semiseg.models.networks import configured_network
    return {"student": configured_network(cfg, image_size, channels, "student")}


SPEC = register(MethodSpec(
    name="bayesian_pl", summary="self-training on its own hard pseudo labels, kept above a confidence threshold "
                                "sampled from a learned Gaussian posterior (variational, KL to a prior)",
    paper="Xu et al., MICCAI 2022 (SegPL-VI)", build_networks=build_networks, networks=("student",),
    uses_unlabeled=True, config=BayesianPLConfig, validate=validate,
    ranges={"prior_mu": FRACTION, "prior_sigma": POSITIVE, "kl_weight": AT_LEAST_0, "lambda_u": AT_LEAST_0,
            "rampup_start": FRACTION, "rampup_length": FRACTION, "threshold_temperature": AT_LEAST_0,
            "probe_cases": AT_LEAST_0},
    choices={"label_rule": ("confidence", "cut")},
    # The ramp is in fractions of the run, so the shared presets need no values of their own; smoke
    # starts it at once, so that its two epochs train on pseudo labels.
    preset_sections={"smoke": {"rampup_start": 0.0, "rampup_length": 0.5},
                     "smoke_multiclass": {"rampup_start": 0.0, "rampup_length": 0.5}},
    unsup_weight="bayesian_pl.lambda_u"))
