"""SemSim's spec: its config section (FixMatch's fields plus its own), value rules and networks (the Trainer: trainer.py).

    python main.py train --method semsim --preset smoke
    python main.py train --method semsim --preset cpu --set semsim.intra_weight=0.5
"""
from __future__ import annotations

from dataclasses import dataclass

from semiseg.errors import ConfigError
from semiseg.methods.fixmatch import SPEC as FIXMATCH_SPEC
from semiseg.methods.fixmatch import FixMatchConfig
from semiseg.methods.fixmatch import validate as validate_fixmatch
from semiseg.methods.spec import MethodSpec, register
from semiseg.rules import AT_LEAST_0, AT_LEAST_1, POSITIVE


@dataclass
class SemSimConfig(FixMatchConfig):
    intra_weight: float = 0.25         # lambda_intra: affinity-refined strong vs weak predictions (the article)
    cross_weight: float = 0.25         # lambda_cross: prototype prediction vs weak pseudo labels (the article)
    feature_layer: str = "up1_act2"    # the U-Net layer whose output is the student's feature map (second
                                       # output): the decoder block at 1/2 resolution
    affinity_size: int = 16            # features and predictions are average-pooled to this side for the
                                       # affinity (N = size^2 positions: an N x N matrix per image) and the
                                       # prototypes; the feature map's side must be a multiple of it
                                       # (a smaller feature map is used at its own size)
    grid: int = 2                      # local prototypes on a grid x grid partition (the article's 2 x 2)
    affinity_temperature: float = 1.0  # M = softmax(cos / t) over positions; 1 = the article's plain softmax
    prototype_temperature: float = 0.1  # q = softmax(cos(feature, prototype) / t) over classes
    probe_cases: int = 32              # hidden-truth cases scoring the weak-view pseudo labels per epoch; 0 = off


def validate(cfg) -> None:
    s = cfg.semsim
    validate_fixmatch(cfg, s, "semsim")
    if s.affinity_size % s.grid:
        raise ConfigError(f"semsim.affinity_size={s.affinity_size} must be a multiple of semsim.grid={s.grid}")
    if cfg.data.image_size % s.affinity_size:
        raise ConfigError(f"semsim.affinity_size={s.affinity_size} must divide data.image_size={cfg.data.image_size}")


def build_networks(cfg, image_size: int, channels: int) -> dict:
    """The configured U-Net with a second output: the feature map of `semsim.feature_layer` (logits
    first, so validation, export and prediction use the segmentation output only)."""
    import keras
    from semiseg.models.networks import configured_network
    net = configured_network(cfg, image_size, channels, "unet")
    names = [layer.name for layer in net.layers]
    if cfg.semsim.feature_layer not in names:
        raise ConfigError(f"semsim.feature_layer: no layer '{cfg.semsim.feature_layer}' in model '{cfg.model.name}' "
                          f"(decoder layers: {', '.join(n for n in names if n.startswith('up'))})")
    features = net.get_layer(cfg.semsim.feature_layer).output
    # net.input (one tensor), not net.inputs (a list): Keras warns when a list-built model gets a tensor.
    return {"student": keras.Model(net.input, [net.outputs[0], features], name="student")}


SPEC = register(MethodSpec(
    name="semsim", summary="FixMatch + affinity-refined (intra-image) and local-prototype (cross-image) consistency",
    paper="SemSim: semantic similarity for semi-supervised medical image segmentation (FixMatch base)",
    build_networks=build_networks, networks=("student",), uses_unlabeled=True, config=SemSimConfig, validate=validate,
    ranges={**FIXMATCH_SPEC.ranges, "intra_weight": AT_LEAST_0, "cross_weight": AT_LEAST_0, "affinity_size": AT_LEAST_1,
            "grid": AT_LEAST_1, "affinity_temperature": POSITIVE, "prototype_temperature": POSITIVE},
    choices=dict(FIXMATCH_SPEC.choices),
    preset_sections={"smoke": {}, "smoke_multiclass": {}, "cpu": {}, "bench": {}, "bench_tuned": {"lambda_u": 0.1}},
    unsup_weight="semsim.lambda_u"))
