"""The network registry: model name -> builder. A leaf: it imports nothing of semiseg (nor Keras).

    python -c "import semiseg.models.unet as u; print(sorted(u.MODELS))"

Builders register with `@register_model(name)` and are called as
`builder(model_cfg, image_size, channels, name=..., out_channels=...)`: out_channels is 1 for a
binary task (one sigmoid logit map) and C for C classes (softmax logits); the last layer returns
float32 logits with that many channels. `semiseg.models.unet.build_model` looks them up
and imports `semiseg.models.transformer` only when a name is not yet known, so the transformer
module never has to import the U-Net module back.
"""
from __future__ import annotations

from typing import Callable

MODELS: dict[str, Callable] = {}


def register_model(name: str):
    def wrap(fn):
        MODELS[name] = fn
        return fn
    return wrap
