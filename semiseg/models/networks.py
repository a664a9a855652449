"""A method's networks, by role, and their variables as a training checkpoint holds them.

    python main.py describe --method mira_u --preset smoke      # parameter count of each network

Training (`Trainer.build_networks`) and loading a finished run (semiseg.runs.load, `--checkpoint
latest`) build a method's networks through `method_networks`, which calls the builder the method's
spec registers (semiseg/methods/<name>/__init__.py), so a checkpoint is restored into exactly the
networks that wrote it without importing any training code.
"""
from __future__ import annotations

from semiseg.config import output_channels
from semiseg.models.unet import build_model


def configured_network(cfg, image_size: int, channels: int, name: str):
    """The network model.* configures, with 1 (binary) or C (multi-class) output channels."""
    return build_model(cfg.model, image_size, channels, name, out_channels=output_channels(cfg.data))


def method_networks(method: str, cfg, image_size: int, channels: int) -> dict:
    """{role: network} as the method's spec builds them; 'student' is the one the optimizer trains."""
    from semiseg import methods
    return methods.spec(method).build_networks(cfg, image_size, channels)


def model_variables(models: dict) -> dict:
    """Every variable of each network by name, as lists a tf.train.Checkpoint saves and restores.

    Through the model object alone, tf.train.Checkpoint misses Keras 3 layers held in Python lists
    (the ViT teacher's blocks, the hybrid student's cross-attention: measured, 18 of the smoke
    teacher's 47 variables and 48 of the student's 212) and Keras' SeedGenerator states (Dropout's
    RNG). Missed, a resumed run silently continues from freshly initialised weights and RNG."""
    return {name: [v.value for v in m.variables] for name, m in models.items()}
