"""Networks: builders that return `keras.Model`s, picked by registered name.

    python -c "import models_tf2, config; print(models_tf2.build_model(config.ModelConfig(), 64, 1).count_params())"

Models know nothing of files, data formats or training. Every builder ends in a 1x1 convolution
with dtype float32, so under a mixed-precision policy the logits (and the losses computed on them)
stay float32 while the body runs in float16/bfloat16.
"""
from __future__ import annotations


import keras
from keras import layers

from semiseg.models.fused_batchnorm import batch_normalization
from semiseg.models.registry import MODELS, register_model  # noqa: E402,F401  (re-exported; a leaf)


def build_model(model_cfg, image_size: int, channels: int, name: str | None = None,
                out_channels: int = 1) -> keras.Model:
    """Build the network that `model_cfg.name` names, for square `image_size` inputs, ending in
    `out_channels` float32 logit maps (1: binary, sigmoid; C: multi-class, softmax;
    semiseg.config.output_channels)."""
    key = model_cfg.name
    if key not in MODELS:
        from semiseg.models import transformer  # noqa: F401  registers 'hybrid'; only loaded when asked for
    if key not in MODELS:
        raise ValueError(f"model.name: unknown model '{key}' (known: {', '.join(sorted(MODELS))})")
    return MODELS[key](model_cfg, image_size, channels, name=name or key, out_channels=out_channels)


def _conv_block(x, filters: int, cfg, prefix: str):
    """Two 3x3 conv -> BN -> activation, the block of the seed project's PancreasSeg."""
    for i in (1, 2):
        # No conv bias in front of BatchNorm: BN's beta does the same job.
        x = layers.Conv2D(filters, 3, padding="same", use_bias=not cfg.batchnorm,
                          kernel_initializer="he_normal", name=f"{prefix}_conv{i}")(x)
        if cfg.batchnorm:
            # TF's fused kernel (Keras BN's weights and behaviour): ~13% of a training step saved.
            x = batch_normalization(momentum=cfg.bn_momentum, synchronized=cfg.sync_batchnorm,
                                    name=f"{prefix}_bn{i}")(x)
        if cfg.activation == "leaky_relu":
            x = layers.LeakyReLU(0.01, name=f"{prefix}_act{i}")(x)
        else:
            x = layers.ReLU(name=f"{prefix}_act{i}")(x)
    return x


@register_model("unet")
def build_unet(cfg, image_size: int, channels: int, name: str = "unet", out_channels: int = 1) -> keras.Model:
    """The seed project's U-Net ("PancreasSeg"): `depth` max-pool down blocks, a bottleneck,
    `depth` transposed-conv up blocks with skip concatenations, filters base * 2**level.

    Dropout sits in the bottleneck and the decoder (where over-fitting to few labels shows);
    it is the only stochastic layer, so Mean Teacher's student noise and MC sampling use it.
    """
    inputs = keras.Input((image_size, image_size, channels), name="image")
    x, skips = inputs, []
    for level in range(cfg.depth):
        x = _conv_block(x, cfg.base_filters * 2 ** level, cfg, f"down{level}")
        skips.append(x)
        x = layers.MaxPooling2D(2, name=f"pool{level}")(x)
    x = _conv_block(x, cfg.base_filters * 2 ** cfg.depth, cfg, "bottleneck")
    if cfg.dropout > 0:
        x = layers.Dropout(cfg.dropout, name="bottleneck_dropout")(x)
    for level in reversed(range(cfg.depth)):
        filters = cfg.base_filters * 2 ** level
        x = layers.Conv2DTranspose(filters, 2, strides=2, name=f"up{level}_tconv")(x)
        x = layers.Concatenate(name=f"up{level}_concat")([x, skips[level]])
        x = _conv_block(x, filters, cfg, f"up{level}")
        if cfg.dropout > 0 and level > 0:
            x = layers.Dropout(cfg.dropout / 2, name=f"up{level}_dropout")(x)
    logits = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


def unet_forward_flops(cfg, image_size: int, channels: int) -> float:
    """Forward FLOPs of one image through `build_unet` (convolutions as 2*H*W*k*k*Cin*Cout, the
    count the benchmarks' yardstick uses); the benchmarks divide measured time by it."""
    flops, size, cin = 0.0, image_size, channels
    for level in range(cfg.depth):
        f = cfg.base_filters * 2 ** level
        flops += 2 * size * size * 9 * (cin * f + f * f)
        cin, size = f, size // 2
    f = cfg.base_filters * 2 ** cfg.depth
    flops += 2 * size * size * 9 * (cin * f + f * f)
    cin = f
    for level in reversed(range(cfg.depth)):
        f = cfg.base_filters * 2 ** level
        size *= 2
        flops += 2 * size * size * cin * f              # 2x2 stride-2 transposed conv: 1 input pixel per output
        flops += 2 * size * size * 9 * (2 * f * f + f * f)
        cin = f
    flops += 2 * size * size * cin
    return flops
