"""The method registry: method name -> Trainer subclass. A leaf: it imports nothing of semiseg.

    python -c "import semiseg.methods as m; print(m.get_method('mixmatch'))"

Method modules register themselves with `@register_method(name)`; `semiseg.methods.get_method`
imports them all and then looks here, so neither the Trainer nor this registry imports a method.
"""
from __future__ import annotations

METHODS: dict[str, type] = {}


def register_method(name: str):
    def wrap(cls):
        cls.method_name = name
        METHODS[name] = cls
        return cls
    return wrap
