"""FixMatch's spec: its config section, value rules and networks (the Trainer: trainer.py; CutMix: cutmix.py).

    python main.py train --method fixmatch --preset smoke
    python main.py train --method fixmatch --preset cpu --set fixmatch.threshold=0.9 fixmatch.cutmix=false
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError
from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, FRACTION


@dataclass
class FixMatchConfig:
    threshold: float = 0.95            # tau: a pixel's pseudo label counts where its confidence (largest
                                       # class probability; binary max(p, 1-p)) is >= tau (the paper's 0.95)
    lambda_u: float = 1.0              # weight of the unlabelled loss (the paper's 1)
    cutmix: bool = True                # paste a box of another unlabelled image (and its pseudo label and
                                       # confidence) into each strong view
    cutmix_area_min: float = 0.02      # the box's area as a fraction of the image ~ U(min, max), aspect
    cutmix_area_max: float = 0.4       # ratio ~ U(0.3, 1/0.3): UniMatch's segmentation CutMix box
    photometric: bool = True           # strong view: photometric strong augmentation (jitter, blur, noise,
                                       # cutout) before CutMix; false leaves CutMix (or nothing) as the view
    dice_weight: float = 1.0           # L_u = masked CE + dice_weight * masked Dice; SemSim's FixMatch term
                                       # (and its supervised loss) use Dice: 0 = the paper's CE alone
    weak_mode: str = "eval"            # eval: pseudo labels from the student in inference mode (moving BN
                                       # statistics, no dropout: the segmentation re-implementations);
                                       # train: the paper's code: labelled, weak and strong images in one
                                       # training-mode forward (batch statistics, dropout), weak logits detached
    probe_cases: int = 32              # hidden-truth cases scoring the weak-view pseudo labels per epoch; 0 = off


def validate(cfg, section=None, name: str = "fixmatch") -> None:
    """Rules between fields; `section`/`name`: a method whose section extends FixMatch's (SemSim)."""
    fm = section or cfg.fixmatch
    if fm.cutmix_area_min > fm.cutmix_area_max:
        raise ConfigError(f"{name}.cutmix_area_min={fm.cutmix_area_min} must be <= "
                          f"{name}.cutmix_area_max={fm.cutmix_area_max}")


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """One network: the student labels its own weak views (no teacher)."""
    from semiseg.models.networks import configured_network
    return {"student": configured_network(cfg, image_size, channels, "student")}


SPEC = register(MethodSpec(
    name="fixmatch", summary="confident weak-view pseudo labels (>= 0.95) train the strong (photometric + CutMix) view",
    paper="Sohn et al., NeurIPS 2020", build_networks=build_networks, networks=("student",),
    uses_unlabeled=True, config=FixMatchConfig, validate=validate,
    ranges={"threshold": FRACTION, "lambda_u": AT_LEAST_0, "cutmix_area_min": FRACTION, "cutmix_area_max": FRACTION,
            "dice_weight": AT_LEAST_0, "probe_cases": AT_LEAST_0},
    choices={"weak_mode": ("eval", "train")},
    # No ramp to scale: the confidence threshold is FixMatch's own curriculum. The shared presets keep
    # the paper's values.
    preset_sections={"smoke": {}, "smoke_multiclass": {}, "cpu": {}, "bench": {}, "bench_tuned": {"lambda_u": 0.1}},
    unsup_weight="fixmatch.lambda_u"))
