"""URPC's spec: its config section, value rules and network (the Trainer: trainer.py).

    python main.py train --method urpc --preset smoke
    python main.py train --method urpc --preset cpu --set urpc.consistency=1

The network is the configured U-Net with one auxiliary output per decoder stage above full
resolution (semiseg/methods/urpc/network.py), each behind its own perturbation and up-sampled to
the input size; it returns [main, aux_1, ..., aux_{depth-1}] in training, the main output alone
where it is validated, exported and used for prediction.
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError
from semiseg.methods.spec import MethodSpec, register
from semiseg.methods.urpc.kinds import PERTURBATION_KINDS, unknown_kinds
from semiseg.rules import AT_LEAST_0, AT_LEAST_1, DECAY, FRACTION


@dataclass
class URPCConfig:
    consistency: float = 0.1           # maximum weight of the rectified pyramid consistency (SSL4MIS)
    rampup_epochs: float = 20.0        # sigmoid ramp exp(-5(1-t/T)^2); SSL4MIS ramps over its whole run
                                       # (200 units of 150 iterations = its 30k iterations): the default
                                       # run's 20 epochs here, each preset's run length in its section
    # One kind per auxiliary head, finest (1/2 resolution) first, comma-separated: SSL4MIS puts feature
    # noise at 1/2, feature dropout at 1/4 and dropout at 1/8. Heads beyond the list take its last kind.
    perturbations: str = "feature_noise,feature_dropout,dropout"
    dropout_rate: float = 0.5          # `dropout` kind: element-wise dropout rate (SSL4MIS p=0.5)
    feature_dropout_low: float = 0.7   # `feature_dropout`: zero where the channel-mean activation is at
    feature_dropout_high: float = 0.9  # least U(low, high) * its per-image maximum (SSL4MIS: U(0.7, 0.9))
    feature_noise: float = 0.3         # `feature_noise`: x + x * u, u ~ U(-r, r) per feature (SSL4MIS r=0.3)
    head_kernel: int = 3               # auxiliary heads' convolution kernel (SSL4MIS: 3x3 for every head)
    upsample: str = "nearest"          # auxiliary logits to the input size: nearest (SSL4MIS's interpolate
                                       # default) | bilinear
    probe_cases: int = 32              # hidden-truth cases scoring the scales' mean (the target) per epoch


def validate(cfg) -> None:
    u, m = cfg.urpc, cfg.model
    bad = unknown_kinds(u.perturbations)
    if bad:
        raise ConfigError(f"urpc.perturbations: unknown kind(s) {', '.join(bad)} (known: {', '.join(PERTURBATION_KINDS)})")
    if u.feature_dropout_low > u.feature_dropout_high:
        raise ConfigError(f"urpc.feature_dropout_low: {u.feature_dropout_low} must be <= urpc.feature_dropout_high "
                          f"= {u.feature_dropout_high}")
    if m.name != "unet":
        raise ConfigError(f"model.name: urpc taps the decoder stages of the U-Net (model.name=unet), got {m.name!r}")
    if m.depth < 2:
        raise ConfigError(f"model.depth: urpc needs at least one decoder stage below full resolution "
                          f"(model.depth >= 2), got {m.depth}")


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """One network: the configured U-Net with URPC's auxiliary outputs (main output first)."""
    from semiseg.methods.urpc.network import build_urpc_network
    return {"student": build_urpc_network(cfg, image_size, channels, "student")}


_RUN_LENGTH_RAMPS = {"smoke": {"rampup_epochs": 1.0}, "smoke_multiclass": {"rampup_epochs": 1.0},
                     "cpu": {"rampup_epochs": 12.0}, "bench": {"rampup_epochs": 40.0},
                     # SSL4MIS's own protocol: 30k iterations = 150 epochs of 200 steps here.
                     "acdc_3": {"rampup_epochs": 150.0}, "acdc_7": {"rampup_epochs": 150.0}}

SPEC = register(MethodSpec(
    name="urpc", summary="perturbed auxiliary outputs at each decoder scale; each pulled to their mean, "
                         "rectified by its KL uncertainty",
    paper="Luo et al., MICCAI 2021 (uncertainty rectified pyramid consistency)", build_networks=build_networks,
    networks=("student",), uses_unlabeled=True, config=URPCConfig, validate=validate,
    ranges={"consistency": AT_LEAST_0, "rampup_epochs": AT_LEAST_0, "dropout_rate": DECAY,
            "feature_dropout_low": FRACTION, "feature_dropout_high": FRACTION, "feature_noise": AT_LEAST_0,
            "head_kernel": AT_LEAST_1, "probe_cases": AT_LEAST_0},
    choices={"upsample": ("nearest", "bilinear"), "head_kernel": (1, 3, 5)},
    preset_sections=_RUN_LENGTH_RAMPS, unsup_weight="urpc.consistency"))
