"""MixMatch's spec: its config section, value rules and networks (the Trainer: trainer.py).

    python main.py train --method mixmatch --preset smoke
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, AT_LEAST_1, DECAY, POSITIVE


@dataclass
class MixMatchConfig:
    temperature: float = 0.5
    alpha: float = 0.75
    k: int = 2
    lambda_u: float = 75.0             # maximum weight of the unlabelled L2 loss (the paper: 75 on CIFAR-10,
                                       # range 75-100; the L2 is per pixel over the 2 classes' probabilities)
    rampup_epochs: float = 10.0
    ramp: str = "linear"               # linear (the paper) | sigmoid exp(-5(1-t/T)^2)
    guess_mode: str = "train"          # train (the paper's code): guesses from the network in training mode
                                       # (batch statistics, dropout) without updating BN moving statistics;
                                       # inference: moving statistics, no dropout
    ema_decay: float = 0.999           # the paper evaluates an EMA of the weights; 0 = no EMA network
    photometric_views: bool = False    # false (the paper's weak views): the K views are random flips of the
                                       # weakly augmented batch; true adds the strong photometric jitter
                                       # (gamma, contrast, blur, noise, cutout), this project's first choice
    mix_labeled: bool = True           # true (the paper): the labelled batch is mixed too (X' = MixUp(X, W));
                                       # false: the paper's ablation "MixUp on unlabeled only" (its Table 4),
                                       # L_sup on the labelled images as they are
    probe_cases: int = 32              # hidden-truth cases scoring the sharpened guesses per epoch; 0 = off


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """The student and an EMA of its weights, the network the paper evaluates (built whatever
    mixmatch.ema_decay, so checkpoints and train.export=ema mean one thing)."""
    from semiseg.models.networks import configured_network
    return {role: configured_network(cfg, image_size, channels, role) for role in ("student", "ema")}


SPEC = register(MethodSpec(
    name="mixmatch", summary="sharpened guesses over K views, MixUp of labelled and unlabelled, L2 on the mixed",
    paper="Berthelot et al., NeurIPS 2019", build_networks=build_networks, networks=("student", "ema"),
    uses_unlabeled=True, config=MixMatchConfig,
    ranges={"temperature": POSITIVE, "alpha": POSITIVE, "k": AT_LEAST_1, "lambda_u": AT_LEAST_0, "ema_decay": DECAY,
            "rampup_epochs": AT_LEAST_0, "probe_cases": AT_LEAST_0},
    choices={"ramp": ("linear", "sigmoid"), "guess_mode": ("train", "inference")},
    preset_sections={"smoke": {"rampup_epochs": 1.0}, "smoke_multiclass": {"rampup_epochs": 1.0},
                     "cpu": {"rampup_epochs": 5.0}, "bench": {"rampup_epochs": 5.0, "ema_decay": 0.99},
                     # bench_tuned: chosen on validation (10% labels, seed 0; bench/results/label_efficiency/
                     # tuning.json): the paper's own ablation without MixUp of the labelled batch, whose
                     # mixing cost ~4 Dice points on the 28-image labelled set (docs/benchmarks.md).
                     "bench_tuned": {"lambda_u": 0.75, "mix_labeled": False}},
    # Downwards only: lambda_u = 75 (the paper's) already collapsed the student to a constant
    # prediction on the embedded benchmark (validation Dice 0.51 from the first epoch; 750: 0.0).
    unsup_weight="mixmatch.lambda_u", tune_factors=(0.01, 0.1, 1.0)))
