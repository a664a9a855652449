"""Cross pseudo supervision's spec: its config section, value rules and networks (the Trainer: trainer.py).

    python main.py train --method cps --preset smoke
    python main.py train --method cps --preset cpu --set cps.cutmix=true
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError
from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, AT_LEAST_1, FRACTION

# Network 2's weights are drawn again from seeds derived from `seed` and this offset (initialise.py).
SECOND_NETWORK_SEED_OFFSET = 7919


@dataclass
class CPSConfig:
    weight: float = 1.5                # lambda, the CPS term's weight (the paper's for VOC; 6 for Cityscapes;
                                       # SSL4MIS: 0.1 ramped)
    rampup_epochs: float = 0.0         # sigmoid ramp exp(-5(1-t/T)^2) of the weight; 0 = constant (the paper)
    on_labeled: bool = True            # the CPS term on labelled images too (the paper: on both sets)
    cutmix: bool = False               # the paper's CutMix variant: the CPS term on box-mixed unlabelled images
    cutmix_boxes: int = 3              # boxes per mask (the paper's code), toggled where they overlap
    cutmix_min_area: float = 0.25      # each mask's total box area, a fraction of the image drawn uniformly
    cutmix_max_area: float = 0.5       # in [min, max] (the paper's code: 0.25 - 0.5)
    probe_cases: int = 32              # hidden-truth cases scoring network 2's pseudo labels per epoch; 0 = off


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """Two networks of the configured architecture: network 1 ('student') as every method builds it,
    network 2 ('student2') re-initialised from seeds derived from cfg.seed, so the two always start
    different (the paper's two differently initialised networks) and reproducibly so."""
    from semiseg.methods.cps.initialise import reinitialise
    from semiseg.models.networks import configured_network
    first = configured_network(cfg, image_size, channels, "student")
    second = configured_network(cfg, image_size, channels, "student2")
    reinitialise(second, cfg.seed + SECOND_NETWORK_SEED_OFFSET)
    return {"student": first, "student2": second}


def validate(cfg) -> None:
    c = cfg.cps
    if c.cutmix_min_area > c.cutmix_max_area:
        raise ConfigError(f"cps.cutmix_min_area: {c.cutmix_min_area} must not exceed cps.cutmix_max_area = "
                          f"{c.cutmix_max_area}")


SPEC = register(MethodSpec(
    name="cps", summary="two differently initialised networks, each trained on the other's hard pseudo labels",
    paper="Chen et al., CVPR 2021", build_networks=build_networks, networks=("student", "student2"),
    uses_unlabeled=True, config=CPSConfig, validate=validate,
    ranges={"weight": AT_LEAST_0, "rampup_epochs": AT_LEAST_0, "cutmix_boxes": AT_LEAST_1,
            "cutmix_min_area": FRACTION, "cutmix_max_area": FRACTION, "probe_cases": AT_LEAST_0},
    # The paper's constant weight in every shared preset (rampup_epochs 0): CPS has no ramp of its own.
    preset_sections={"smoke": {"rampup_epochs": 0.0}, "smoke_multiclass": {"rampup_epochs": 0.0},
                     "cpu": {"rampup_epochs": 0.0}, "bench": {"rampup_epochs": 0.0}, "bench_tuned": {"weight": 0.15}},
    # x0.1 ~ SSL4MIS's 0.1, x1 the paper's VOC value, x4 = 6 the paper's Cityscapes value.
    unsup_weight="cps.weight", tune_factors=(0.1, 1.0, 4.0)))
