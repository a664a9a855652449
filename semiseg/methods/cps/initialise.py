"""Draw a network's random initial weights again from seeds of our own: CPS's second network.

    from semiseg.methods.cps.initialise import reinitialise
    n = reinitialise(network2, seed=cfg.seed + 7919)      # variables drawn again

Cross pseudo supervision needs two networks of one architecture that start apart (the paper
initialises them differently; SSL4MIS uses Kaiming for one and Xavier for the other). Keras
initialisers without a seed draw from the global Python RNG at layer construction, so the two
networks differ already, but only as a side effect of construction order. Here every weight
whose initialiser is random (it has a `seed`) is drawn again with the same initialiser (so the
same distribution and scale: he_normal stays he_normal) from the seed (seed, layer index, weight),
independent of the global RNG: the second network differs from the first by construction and is
the same in every run of a seed. Constant initialisers (biases, BN's gamma and beta, moving
statistics) are left as built: they are equal in both networks, as in SSL4MIS.
"""
from __future__ import annotations

import keras


def _random_initializers(layer):
    """(weight attribute, initialiser) pairs of `layer` whose initialiser draws random numbers."""
    for attr, init in sorted(vars(layer).items()):
        if attr.endswith("_initializer") and isinstance(init, keras.initializers.Initializer) \
                and "seed" in init.get_config():
            weight = getattr(layer, attr[:-len("_initializer")], None)
            if isinstance(weight, keras.Variable):
                yield attr, init, weight


def reinitialise(model, seed: int) -> int:
    """Draw every randomly initialised weight of `model` again from seeds derived from `seed`
    (deterministic, global RNG untouched); returns how many weights were drawn."""
    count = 0
    for index, layer in enumerate(model._flatten_layers(include_self=False)):
        for attr, init, weight in _random_initializers(layer):
            # One integer seed per weight: the same in every run of `seed`, different per weight.
            weight_seed = (seed * 1_000_003 + index * 101 + count) % (2 ** 31 - 1)
            fresh = type(init).from_config({**init.get_config(), "seed": weight_seed})
            weight.assign(fresh(tuple(weight.shape), dtype=weight.dtype))
            count += 1
    return count
