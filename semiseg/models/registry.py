"""The network registry: model name -> builder. A leaf: it imports nothing of semiseg (nor Keras).

    python -c "import semiseg.models.unet as u; print(sorted(u.MODELS))"

Builders register with `@register_model(name)`; `semiseg.models.unet.build_model` looks them up
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
