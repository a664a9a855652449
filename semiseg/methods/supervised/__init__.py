"""The supervised baseline's spec: one network, labelled slices only, no section of its own.

    python main.py train --method supervised --preset smoke
"""
from semiseg.methods.spec import MethodSpec, register


def build_networks(cfg, image_size: int, channels: int) -> dict:
    from semiseg.models.networks import configured_network
    return {"student": configured_network(cfg, image_size, channels, "student")}


SPEC = register(MethodSpec(
    name="supervised", summary="the U-Net (model.*) on labelled slices only: the baseline every method must beat",
    paper="Ronneberger et al., MICCAI 2015 (U-Net)", build_networks=build_networks, networks=("student",),
    uses_unlabeled=False))
