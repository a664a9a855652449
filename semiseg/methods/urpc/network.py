"""URPC's network: the configured U-Net plus a perturbed, up-sampled auxiliary output per decoder stage.

    python main.py describe --method urpc --preset cpu     # parameter count (U-Net + 3 auxiliary heads)

As SSL4MIS's UNet_URPC (Decoder_URPC): decoder stage `up{level}` (1/2**level of the input size) feeds
a head `perturbation -> conv (urpc.head_kernel) -> up-sampling by 2**level` for level = 1..depth-1; the
U-Net's own full-resolution logits are the main output. Outputs: [main, aux_1 (1/2), aux_2 (1/4), ...],
the main one first, so validation, export and prediction (which keep the first output only) never see
the heads. The perturbations act only when the network is called with training=True.

Perturbations (SSL4MIS's, one kind per head, `urpc.perturbations`):
  dropout          element-wise dropout, rate urpc.dropout_rate (Keras Dropout: scaled by 1/(1-rate))
  feature_dropout  a = mean over channels of x; zero every position with a >= u * max_position(a),
                   u ~ U(feature_dropout_low, feature_dropout_high), one draw per batch (as SSL4MIS)
  feature_noise    x + x * n, n ~ U(-r, r) of shape [H, W, C], one draw shared by the batch (as SSL4MIS)
Draws come from Keras SeedGenerators (checkpointed with the network's variables); under a
distribution strategy every replica draws the same numbers, which for the batch-shared draws of
feature noise and feature dropout is exactly one draw for the global batch.
"""
from __future__ import annotations

import keras
from keras import layers, ops

from semiseg.methods.urpc.kinds import perturbation_kinds
from semiseg.models.networks import configured_network


@keras.saving.register_keras_serializable(package="semiseg_urpc")
class FeatureDropout(layers.Layer):
    """SSL4MIS's FeatureDropout: drops the most activated positions (channel mean >= u * the image's max)."""

    def __init__(self, low: float = 0.7, high: float = 0.9, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.low, self.high, self.seed = low, high, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training:
            return x
        attention = ops.mean(x, axis=-1, keepdims=True)                          # [B,H,W,1]
        peak = ops.max(attention, axis=(1, 2, 3), keepdims=True)                 # per image
        u = keras.random.uniform((), self.low, self.high, seed=self.seed_generator)
        keep = ops.cast(attention < peak * ops.cast(u, attention.dtype), x.dtype)
        return x * keep

    def get_config(self):
        return {**super().get_config(), "low": self.low, "high": self.high, "seed": self.seed}


@keras.saving.register_keras_serializable(package="semiseg_urpc")
class FeatureNoise(layers.Layer):
    """SSL4MIS's FeatureNoise: x + x * n, n ~ U(-r, r) per feature position, shared by the batch."""

    def __init__(self, uniform_range: float = 0.3, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.uniform_range, self.seed = uniform_range, seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, x, training=False):
        if not training:
            return x
        r = self.uniform_range
        noise = keras.random.uniform(tuple(x.shape[1:]), -r, r, seed=self.seed_generator)
        return x + x * ops.cast(noise, x.dtype)[None]

    def get_config(self):
        return {**super().get_config(), "uniform_range": self.uniform_range, "seed": self.seed}


def perturbation(kind: str, section, name: str):
    """The layer of one kind (None for `none`)."""
    if kind == "dropout":
        return layers.Dropout(section.dropout_rate, name=name)
    if kind == "feature_dropout":
        return FeatureDropout(section.feature_dropout_low, section.feature_dropout_high, name=name)
    if kind == "feature_noise":
        return FeatureNoise(section.feature_noise, name=name)
    return None


def decoder_stage(unet, level: int):
    """The output of U-Net decoder stage `level` (its second conv-BN-activation, before the U-Net's
    own decoder dropout): semiseg.models.unet names it `up{level}_act2`."""
    return unet.get_layer(f"up{level}_act2").output


def build_urpc_network(cfg, image_size: int, channels: int, name: str = "student") -> keras.Model:
    unet = configured_network(cfg, image_size, channels, name)
    u, depth = cfg.urpc, cfg.model.depth
    out_channels = int(unet.outputs[0].shape[-1])
    aux = []
    for level, kind in zip(range(1, depth), perturbation_kinds(u.perturbations, depth - 1)):
        x = decoder_stage(unet, level)
        layer = perturbation(kind, u, f"urpc_aux{level}_{kind}")
        if layer is not None:
            x = layer(x)
        # float32 logits (as the U-Net's own head) so mixed precision keeps the losses in float32.
        x = layers.Conv2D(out_channels, u.head_kernel, padding="same", dtype="float32", name=f"urpc_aux{level}_logits")(x)
        aux.append(layers.UpSampling2D(2 ** level, interpolation=u.upsample, dtype="float32",
                                       name=f"urpc_aux{level}_up")(x))
    return keras.Model(unet.inputs[0], [unet.outputs[0], *aux], name=name)
