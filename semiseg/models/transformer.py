"""MIRA-U networks: a MIM-pretrained ViT teacher with forceable MC dropout, and a hybrid
CNN / Swin-Transformer U-Net student with bidirectional cross-attention.

    python -m semiseg.models.transformer           # parameter counts of the seed's 256x256x3 configuration

The teacher (`build_mim_teacher`) is a subclassed `keras.Model`: `reconstruct(images, mask)` is the
stage-1 masked-image-modelling path, `segment(images)` the stage-2 logit map, and
`mc_dropout_stats` draws the M Monte-Carlo dropout passes as one batched forward.  The student
(`build_hybrid_student`) is a functional `keras.Model`.  Every custom layer is registered under the
package "semiseg", so both save to and load from `.keras` files.  The last layer of each network
computes in float32 so mixed precision is safe.  See docs/mira_u_networks.md.
"""
import math

import numpy as np
import tensorflow as tf
import keras
from keras import layers

from semiseg.models.outputs import probabilities
from semiseg.models.fused_batchnorm import batch_normalization

# BatchNorm moving-statistics momentum: PyTorch's 0.1 update (= Keras 0.9), what the seed's PyTorch
# networks use. Keras' default 0.99 left the teacher head's and the EMA student's inference-mode
# statistics hundreds of steps stale in the label-efficiency benchmark (val Dice 0.17 while the
# student in training mode was at 0.3-0.4), as it had for the U-Net (config.ModelConfig.bn_momentum).
BN_MOMENTUM = 0.9

register = keras.saving.register_keras_serializable(package="semiseg")


# ----------------------------------------------------------------------------- seeds and masks
def as_seed(seed):
    """Stateless random ops take an int32 pair; accept an int, a pair, or a tensor of either."""
    seed = tf.convert_to_tensor(seed)
    if seed.shape.rank == 0:
        seed = tf.stack([seed, tf.zeros_like(seed)])
    return tf.cast(tf.reshape(seed, [2]), tf.int32)


def mc_pass_seeds(seed, passes):
    """One seed per MC pass, all derived from `seed` (vary `seed` per replica so noise differs)."""
    return tf.random.experimental.stateless_split(as_seed(seed), num=passes)


def random_patch_mask(batch, num_patches, ratio, seed):
    """[batch, num_patches] float32, 1 = masked; exactly round(ratio * num_patches) per image.

    Ranking uniform noise (instead of thresholding it) makes the count exact, so every image (and
    every replica) has the same number of masked patches and a per-replica mean loss is unbiased."""
    num_masked = int(round(ratio * num_patches))
    noise = tf.random.stateless_uniform([batch, num_patches], as_seed(seed))
    ranks = tf.argsort(tf.argsort(noise, axis=-1), axis=-1)
    return tf.cast(ranks < num_masked, tf.float32)


def patchify(images, patch):
    """[B, H, W, C] -> [B, (H/p)*(W/p), p*p*C], patches row-major, pixels (row, col, channel)."""
    _, h, w, c = images.shape
    if h % patch or w % patch:
        raise ValueError(f"patchify: image size {h}x{w} is not a multiple of patch {patch}")
    x = tf.reshape(images, [-1, h // patch, patch, w // patch, patch, c])
    x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
    return tf.reshape(x, [-1, (h // patch) * (w // patch), patch * patch * c])


def unpatchify(patches, image_size, patch, channels):
    """Inverse of `patchify` (to look at reconstructions)."""
    g = image_size // patch
    x = tf.reshape(patches, [-1, g, g, patch, patch, channels])
    x = tf.transpose(x, [0, 1, 3, 2, 4, 5])
    return tf.reshape(x, [-1, image_size, image_size, channels])


def mim_l1_per_image(recon_patches, target_patches, mask):
    """[B]: mean absolute error over each image's masked patches (Algorithm 1, line 14)."""
    per_patch = tf.reduce_mean(tf.abs(tf.cast(recon_patches, tf.float32)
                                      - tf.cast(target_patches, tf.float32)), axis=-1)
    mask = tf.cast(mask, tf.float32)
    return tf.reduce_sum(per_patch * mask, -1) / tf.maximum(tf.reduce_sum(mask, -1), 1.0)


def mim_l1_loss(recon_patches, target_patches, mask):
    """Scalar L_MIM = (1/|M|) sum_m |I^_m - I_m|_1 over masked patches only; visible ones add 0."""
    per_patch = tf.reduce_mean(tf.abs(tf.cast(recon_patches, tf.float32)
                                      - tf.cast(target_patches, tf.float32)), axis=-1)
    mask = tf.cast(mask, tf.float32)
    return tf.reduce_sum(per_patch * mask) / tf.maximum(tf.reduce_sum(mask), 1.0)


# ----------------------------------------------------------------------------- shared pieces
def _attend(q, k, v, num_heads, bias=None):
    """Multi-head scaled dot-product attention on [B, N, D] tensors.

    `bias` is [heads, Nq, Nk] or, for shifted windows, [nW, heads, Nq, Nk] where B = batch * nW.
    Logits and softmax run in float32 so float16 compute cannot overflow."""
    b, nq, nk, d = tf.shape(q)[0], tf.shape(q)[1], tf.shape(k)[1], q.shape[-1]
    hd = d // num_heads

    def heads(t, n):
        return tf.transpose(tf.reshape(t, [b, n, num_heads, hd]), [0, 2, 1, 3])

    logits = tf.cast(tf.matmul(heads(q, nq), heads(k, nk), transpose_b=True), tf.float32)
    logits = logits * (hd ** -0.5)
    if bias is not None and bias.shape.rank == 4:
        windows = bias.shape[0]
        logits = tf.reshape(logits, [-1, windows, num_heads, nq, nk]) + bias[None]
        logits = tf.reshape(logits, [-1, num_heads, nq, nk])
    elif bias is not None:
        logits = logits + bias[None]
    weights = tf.cast(tf.nn.softmax(logits, axis=-1), v.dtype)
    out = tf.matmul(weights, heads(v, nk))
    return tf.reshape(tf.transpose(out, [0, 2, 1, 3]), [b, nq, d])


def _windows(x, ws):
    """[B, H, W, C] -> [B * nW, ws*ws, C] (non-overlapping ws x ws windows, row-major)."""
    _, h, w, c = x.shape
    x = tf.reshape(x, [-1, h // ws, ws, w // ws, ws, c])
    return tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [-1, ws * ws, c])


def _unwindows(x, ws, h, w):
    c = x.shape[-1]
    x = tf.reshape(x, [-1, h // ws, w // ws, ws, ws, c])
    return tf.reshape(tf.transpose(x, [0, 1, 3, 2, 4, 5]), [-1, h, w, c])


def fit_window(resolution, window_size):
    """Largest window <= window_size that tiles `resolution` (so small test images still work)."""
    return max(d for d in range(1, min(window_size, resolution) + 1) if resolution % d == 0)


# ----------------------------------------------------------------------------- teacher layers
@register
class MCDropout(layers.Layer):
    """Dropout that can be forced on for Monte-Carlo sampling while every other layer (LayerNorm,
    BatchNorm) stays in inference mode: calling `model(x, training=True)` instead would also put
    BatchNorm in batch mode and update its moving statistics.

    With `mc_seeds` ([M, 2] int32) the input is M passes stacked pass-major ([M*B, ...]); pass m's
    keep-mask is drawn statelessly from fold_in(mc_seeds[m], salt), so the batched forward of M
    passes equals M separate calls with the same seeds, works inside tf.function and under
    tf.distribute, and every layer (distinct salt) draws its own noise.  Without `mc_seeds` it is
    ordinary dropout when training and the identity otherwise."""

    def __init__(self, rate, salt=0, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.salt = float(rate), int(salt)
        self.seed_generator = keras.random.SeedGenerator(self.salt)

    def call(self, x, training=None, mc_seeds=None):
        if self.rate <= 0.0:
            return x
        if mc_seeds is not None:
            passes = mc_seeds.shape[0]
            if passes is None:
                raise ValueError(f"{self.name}: mc_seeds needs a static number of passes")
            shape = tf.concat([[tf.shape(x)[0] // passes], tf.shape(x)[1:]], 0)
            keep = tf.concat([
                tf.random.stateless_uniform(
                    shape, tf.random.experimental.stateless_fold_in(mc_seeds[m], self.salt))
                >= self.rate for m in range(passes)], 0)
            return x * tf.cast(keep, x.dtype) * tf.cast(1.0 / (1.0 - self.rate), x.dtype)
        if training:
            return keras.random.dropout(x, self.rate, seed=self.seed_generator)
        return x

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "salt": self.salt}


@register
class ViTBlock(layers.Layer):
    """Pre-norm transformer block: x + Drop(MHSA(LN x)); x + Drop(MLP(LN x))."""

    def __init__(self, dim, num_heads, mlp_ratio=1.0, dropout=0.1, salt=0, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.mlp_ratio = dim, num_heads, float(mlp_ratio)
        self.dropout, self.salt = float(dropout), int(salt)
        self.norm1 = layers.LayerNormalization(epsilon=1e-6, name="norm1")
        self.qkv = layers.Dense(3 * dim, name="qkv")
        self.proj = layers.Dense(dim, name="proj")
        self.drop_attn = MCDropout(dropout, salt=salt, name="drop_attn")
        self.norm2 = layers.LayerNormalization(epsilon=1e-6, name="norm2")
        self.fc1 = layers.Dense(int(dim * mlp_ratio), activation="gelu", name="fc1")
        self.fc2 = layers.Dense(dim, name="fc2")
        self.drop_mlp = MCDropout(dropout, salt=salt + 1, name="drop_mlp")

    def build(self, input_shape):
        for layer in (self.norm1, self.qkv, self.proj, self.norm2, self.fc1):
            layer.build(input_shape)
        self.fc2.build(tuple(input_shape[:-1]) + (int(self.dim * self.mlp_ratio),))

    def call(self, x, training=None, mc_seeds=None):
        q, k, v = tf.split(self.qkv(self.norm1(x)), 3, axis=-1)
        x = x + self.drop_attn(self.proj(_attend(q, k, v, self.num_heads)),
                               training=training, mc_seeds=mc_seeds)
        h = self.fc2(self.fc1(self.norm2(x)))
        return x + self.drop_mlp(h, training=training, mc_seeds=mc_seeds)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout, "salt": self.salt}


@register
class SegmentationHead(layers.Layer):
    """Token grid [B, g, g, D] -> logits [B, g*p, g*p, out_channels]: a 1x1 reduction, then log2(p)
    stages of (bilinear x2, 3x3 conv, BN, ReLU) halving the width, MC dropout, and a float32 1x1 conv
    (out_channels 1: binary, sigmoid; C: multi-class logits, softmax)."""

    def __init__(self, patch_size, channels=64, dropout=0.1, salt=1000, out_channels=1, **kwargs):
        super().__init__(**kwargs)
        self.patch_size, self.channels = int(patch_size), int(channels)
        self.out_channels = int(out_channels)
        self.dropout, self.salt = float(dropout), int(salt)
        stages = int(round(math.log2(patch_size)))
        self.widths = [max(channels // 2 ** (i + 1), 8) for i in range(stages)]
        self.reduce = layers.Conv2D(channels, 1, use_bias=False, name="reduce")
        self.reduce_norm = batch_normalization(momentum=BN_MOMENTUM, name="reduce_bn")
        self.ups = [layers.UpSampling2D(2, interpolation="bilinear", name=f"up{i}")
                    for i in range(stages)]
        self.convs = [layers.Conv2D(c, 3, padding="same", use_bias=False, name=f"conv{i}")
                      for i, c in enumerate(self.widths)]
        self.norms = [batch_normalization(momentum=BN_MOMENTUM, name=f"bn{i}") for i in range(stages)]
        self.drop = MCDropout(dropout, salt=salt, name="drop")
        self.out = layers.Conv2D(self.out_channels, 1, dtype="float32", name="logits")

    def build(self, input_shape):
        b, g, _, _ = input_shape
        self.reduce.build(input_shape)
        self.reduce_norm.build((b, g, g, self.channels))
        cin = self.channels
        for conv, norm, cout in zip(self.convs, self.norms, self.widths):
            g *= 2
            conv.build((b, g, g, cin))
            norm.build((b, g, g, cout))
            cin = cout
        self.out.build((b, g, g, cin))

    def call(self, x, training=None, mc_seeds=None):
        x = tf.nn.relu(self.reduce_norm(self.reduce(x), training=training))
        for up, conv, norm in zip(self.ups, self.convs, self.norms):
            x = tf.nn.relu(norm(conv(up(x)), training=training))
        return self.out(self.drop(x, training=training, mc_seeds=mc_seeds))

    def get_config(self):
        return {**super().get_config(), "patch_size": self.patch_size,
                "channels": self.channels, "dropout": self.dropout, "salt": self.salt,
                "out_channels": self.out_channels}


@register
class MIMTeacher(keras.Model):
    """Lightweight ViT teacher (MIRA-U): 8x8 patch embedding, `depth` transformer blocks, a 2-layer
    MLP decoder that reconstructs each patch's pixels (stage 1), and a light upsampling
    segmentation head (stage 2).  `model(images)` is `segment(images)`."""

    def __init__(self, image_size=256, channels=3, patch_size=8, embed_dim=256, depth=4,
                 num_heads=4, mlp_ratio=1.0, decoder_dim=256, head_channels=64, dropout=0.1,
                 out_channels=1, **kwargs):
        super().__init__(**kwargs)
        if image_size % patch_size or patch_size & (patch_size - 1) or embed_dim % num_heads:
            raise ValueError(
                f"MIMTeacher: image_size {image_size} must be a multiple of patch_size "
                f"{patch_size}, patch_size a power of two, embed_dim {embed_dim} a multiple of "
                f"num_heads {num_heads}")
        self.config_values = dict(
            image_size=image_size, channels=channels, patch_size=patch_size,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, mlp_ratio=mlp_ratio,
            decoder_dim=decoder_dim, head_channels=head_channels, dropout=dropout,
            out_channels=out_channels)
        self.image_size, self.channels, self.patch_size = image_size, channels, patch_size
        self.embed_dim = embed_dim
        self.grid = image_size // patch_size
        self.num_patches = self.grid ** 2
        self.patch_embed = layers.Conv2D(embed_dim, patch_size, strides=patch_size,
                                         name="patch_embed")
        self.blocks = [ViTBlock(embed_dim, num_heads, mlp_ratio, dropout, salt=10 * i,
                                name=f"block{i}") for i in range(depth)]
        self.encoder_norm = layers.LayerNormalization(epsilon=1e-6, name="encoder_norm")
        self.decoder_hidden = layers.Dense(decoder_dim, activation="gelu", name="mim_decoder_1")
        self.decoder_out = layers.Dense(patch_size * patch_size * channels, dtype="float32",
                                        name="mim_decoder_2")
        self.seg_head = SegmentationHead(patch_size, head_channels, dropout, out_channels=out_channels,
                                         name="seg_head")
        self.build((None, image_size, image_size, channels))

    def build(self, input_shape):
        if self.built:
            return
        init = keras.initializers.TruncatedNormal(stddev=0.02)
        self.pos_embed = self.add_weight(shape=(1, self.num_patches, self.embed_dim),
                                         initializer=init, name="pos_embed")
        self.mask_token = self.add_weight(shape=(1, 1, self.embed_dim), initializer=init,
                                          name="mask_token")
        tokens = (None, self.num_patches, self.embed_dim)
        self.patch_embed.build((None, self.image_size, self.image_size, self.channels))
        for layer in self.blocks + [self.encoder_norm, self.decoder_hidden]:
            layer.build(tokens)
        self.decoder_out.build((None, self.num_patches, self.config_values["decoder_dim"]))
        self.seg_head.build((None, self.grid, self.grid, self.embed_dim))
        self.built = True

    def encode(self, images, mask=None, training=False, mc_seeds=None):
        """Patch tokens [B, N, D]; where mask is 1 the token is replaced by the learned mask token."""
        x = self.patch_embed(images)
        x = tf.reshape(x, [-1, self.num_patches, self.embed_dim])
        if mask is not None:
            m = tf.cast(mask, x.dtype)[..., None]
            x = x * (1.0 - m) + tf.cast(self.mask_token, x.dtype) * m
        x = x + tf.cast(self.pos_embed, x.dtype)
        for block in self.blocks:
            x = block(x, training=training, mc_seeds=mc_seeds)
        return self.encoder_norm(x)

    def reconstruct(self, images, mask, training=False):
        """Stage 1: predicted pixels of every patch, [B, N, p*p*C] float32 (compare with patchify)."""
        return self.decoder_out(self.decoder_hidden(self.encode(images, mask, training)))

    def segment(self, images, training=False, mc_dropout=False, seed=None):
        """Stage 2: logits [B, H, W, out_channels] float32.  mc_dropout=True forces dropout on (with `seed`,
        an int or int32 pair) while normalisation stays in inference mode."""
        mc_seeds = None
        if mc_dropout:
            if seed is None:
                raise ValueError("MIMTeacher.segment(mc_dropout=True) needs a seed")
            mc_seeds = tf.reshape(as_seed(seed), [1, 2])
        return self.segment_passes(images, mc_seeds, training)

    def segment_passes(self, images, mc_seeds, training=False):
        """Logits for images stacked pass-major ([M*B, H, W, C]) with one seed per pass ([M, 2])."""
        tokens = self.encode(images, training=training, mc_seeds=mc_seeds)
        grid = tf.reshape(tokens, [-1, self.grid, self.grid, self.embed_dim])
        return self.seg_head(grid, training=training, mc_seeds=mc_seeds)

    def call(self, images, training=None):
        return self.segment(images, training=bool(training))

    def part_weights(self):
        """Variables by part, so stage 2 can freeze the encoder and train only the seg head."""
        encoder = [self.pos_embed, self.mask_token] + self.patch_embed.weights
        for layer in self.blocks + [self.encoder_norm]:
            encoder += layer.weights
        return {"encoder": encoder,
                "mim_decoder": self.decoder_hidden.weights + self.decoder_out.weights,
                "seg_head": self.seg_head.weights}

    def param_counts(self):
        """Parameters (trainable + BN statistics + dropout seed states) by part, and the total."""
        counts = {part: int(sum(np.prod(v.shape) for v in vs))
                  for part, vs in self.part_weights().items()}
        counts["total"] = sum(counts.values())
        return counts

    def get_config(self):
        return {**super().get_config(), **self.config_values}


def build_mim_teacher(image_size=256, channels=3, patch_size=8, embed_dim=256, depth=4,
                      num_heads=4, mlp_ratio=1.0, decoder_dim=256, head_channels=64,
                      dropout=0.1, name="mim_teacher", out_channels=1):
    """The MIRA-U teacher; the defaults are the seed's configuration (about 2.2M parameters)."""
    return MIMTeacher(image_size, channels, patch_size, embed_dim, depth, num_heads, mlp_ratio,
                      decoder_dim, head_channels, dropout, out_channels, name=name)


def _stats(probs):
    mean = tf.reduce_mean(probs, 0)
    return mean, tf.reduce_sum(tf.square(probs - mean), 0)


def mc_dropout_stats(teacher, images, passes=20, chunk=None, seed=0):
    """Per-pixel mean and std (ddof=0) of the teacher's probabilities over `passes` MC-dropout passes
    (sigmoid of one logit channel; softmax over C channels for a multi-class head, per class).

    The passes run as one batched forward of the batch tiled `passes` times, or `chunk` passes at
    a time to bound memory; chunk statistics are merged with Chan et al.'s parallel variance
    formula, so the result does not depend on `chunk`.  Returns two float32 [B, H, W, 1] maps."""
    seeds = mc_pass_seeds(seed, passes)
    chunk = passes if chunk is None else max(1, min(int(chunk), passes))
    batch = tf.shape(images)[0]
    count, mean, m2 = 0, None, None
    for start in range(0, passes, chunk):
        k = min(chunk, passes - start)
        tiled = tf.tile(images, [k, 1, 1, 1])            # pass-major, as MCDropout expects
        logits = teacher.segment_passes(tiled, seeds[start:start + k])
        probs = tf.sigmoid(tf.cast(logits, tf.float32))
        probs = tf.reshape(probs, tf.concat([[k, batch], tf.shape(probs)[1:]], 0))
        c_mean, c_m2 = _stats(probs)
        if mean is None:
            count, mean, m2 = k, c_mean, c_m2
            continue
        delta, total = c_mean - mean, count + k
        mean = mean + delta * (k / total)
        m2 = m2 + c_m2 + tf.square(delta) * (count * k / total)
        count = total
    return mean, tf.sqrt(m2 / passes)


def mc_dropout_stats_loop(teacher, images, passes=20, seed=0):
    """Reference/benchmark version of `mc_dropout_stats`: a Python loop of `passes` calls with the
    same per-pass seeds, so both return the same numbers."""
    seeds = mc_pass_seeds(seed, passes)
    probs = tf.stack([
        probabilities(teacher.segment(images, mc_dropout=True, seed=seeds[m]))
        for m in range(passes)])
    mean, m2 = _stats(probs)
    return mean, tf.sqrt(m2 / passes)


# ----------------------------------------------------------------------------- student layers
@register
class SwinBlock(layers.Layer):
    """Swin-Transformer block on a [B, H, W, C] grid (Liu et al. 2021): window self-attention,
    windows shifted by `shift` pixels in odd blocks so information crosses window borders, with a
    learned relative-position bias; then an MLP.  Both residual, pre-norm."""

    def __init__(self, dim, num_heads, window_size, shift=0, mlp_ratio=4.0, dropout=0.0,
                 relative_position_bias=True, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.window_size, self.shift = dim, num_heads, window_size, shift
        self.mlp_ratio, self.dropout = float(mlp_ratio), float(dropout)
        self.relative_position_bias = bool(relative_position_bias)
        self.norm1 = layers.LayerNormalization(epsilon=1e-5, name="norm1")
        self.qkv = layers.Dense(3 * dim, name="qkv")
        self.proj = layers.Dense(dim, name="proj")
        self.norm2 = layers.LayerNormalization(epsilon=1e-5, name="norm2")
        self.fc1 = layers.Dense(int(dim * mlp_ratio), activation="gelu", name="fc1")
        self.fc2 = layers.Dense(dim, name="fc2")
        self.drop = layers.Dropout(dropout)

    def build(self, input_shape):
        _, h, w, c = input_shape
        ws, s = self.window_size, self.shift
        if h % ws or w % ws or not 0 <= s < ws:
            raise ValueError(f"{self.name}: grid {h}x{w} not tiled by window {ws} (shift {s})")
        for layer in (self.norm1, self.qkv, self.proj, self.norm2, self.fc1):
            layer.build((None, c))
        self.fc2.build((None, int(self.dim * self.mlp_ratio)))
        n = ws * ws
        if self.relative_position_bias:
            self.bias_table = self.add_weight(
                shape=((2 * ws - 1) ** 2, self.num_heads), name="relative_position_bias",
                initializer=keras.initializers.TruncatedNormal(stddev=0.02))
            coords = np.stack(np.meshgrid(np.arange(ws), np.arange(ws), indexing="ij")).reshape(2, -1)
            rel = coords[:, :, None] - coords[:, None, :] + ws - 1     # [2, n, n], each in [0, 2ws-2]
            self.bias_index = (rel[0] * (2 * ws - 1) + rel[1]).reshape(-1)
        self.shift_mask = None
        if s:
            # Label the 3x3 regions the cyclic roll glues together; tokens from different regions
            # must not attend to each other (-100 before the softmax ~ zero weight).
            regions = np.zeros((h, w), np.int32)
            cuts = (slice(0, -ws), slice(-ws, -s), slice(-s, None))
            for i, hs in enumerate(cuts):
                for j, wsl in enumerate(cuts):
                    regions[hs, wsl] = 3 * i + j
            r = regions.reshape(h // ws, ws, w // ws, ws).transpose(0, 2, 1, 3).reshape(-1, n)
            self.shift_mask = np.where(r[:, :, None] != r[:, None, :], -100.0, 0.0).astype(np.float32)

    def _bias(self):
        bias = None
        if self.relative_position_bias:
            n = self.window_size ** 2
            bias = tf.gather(tf.cast(self.bias_table, tf.float32), self.bias_index)
            bias = tf.transpose(tf.reshape(bias, [n, n, self.num_heads]), [2, 0, 1])
        if self.shift_mask is not None:
            mask = tf.constant(self.shift_mask)[:, None]               # [nW, 1, n, n]
            bias = mask if bias is None else mask + bias[None]
        return bias

    def call(self, x, training=None):
        _, h, w, _ = x.shape
        ws, s = self.window_size, self.shift
        y = self.norm1(x)
        if s:
            y = tf.roll(y, shift=[-s, -s], axis=[1, 2])
        q, k, v = tf.split(self.qkv(_windows(y, ws)), 3, axis=-1)
        y = _unwindows(self.proj(_attend(q, k, v, self.num_heads, self._bias())), ws, h, w)
        if s:
            y = tf.roll(y, shift=[s, s], axis=[1, 2])
        x = x + self.drop(y, training=training)
        return x + self.drop(self.fc2(self.fc1(self.norm2(x))), training=training)

    def compute_output_shape(self, input_shape):
        # Given explicitly so functional building skips tracing `call` (seconds per layer).
        return input_shape

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "window_size": self.window_size, "shift": self.shift,
                "mlp_ratio": self.mlp_ratio, "dropout": self.dropout,
                "relative_position_bias": self.relative_position_bias}


@register
class PatchMerging(layers.Layer):
    """Swin downsampling: concatenate each 2x2 neighbourhood (4C), LayerNorm, linear to `dim`."""

    def __init__(self, dim, **kwargs):
        super().__init__(**kwargs)
        self.dim = dim
        self.norm = layers.LayerNormalization(epsilon=1e-5, name="norm")
        self.reduction = layers.Dense(dim, use_bias=False, name="reduction")

    def build(self, input_shape):
        self.norm.build((None, 4 * input_shape[-1]))
        self.reduction.build((None, 4 * input_shape[-1]))

    def call(self, x):
        return self.reduction(self.norm(tf.nn.space_to_depth(x, 2)))

    def compute_output_shape(self, input_shape):
        b, h, w, _ = input_shape
        return (b, h // 2, w // 2, self.dim)

    def get_config(self):
        return {**super().get_config(), "dim": self.dim}


@register
class WindowCrossAttention(layers.Layer):
    """Bidirectional cross-attention between a CNN map and a transformer map of the same shape:
    inside each window, CNN tokens query transformer tokens and transformer tokens query CNN
    tokens (windows keep the cost linear in the pixel count).  Returns both updated maps."""

    def __init__(self, dim, num_heads, window_size, **kwargs):
        super().__init__(**kwargs)
        self.dim, self.num_heads, self.window_size = dim, num_heads, window_size
        names = ("norm_cnn", "norm_vit")
        self.norms = [layers.LayerNormalization(epsilon=1e-5, name=n) for n in names]
        self.queries = [layers.Dense(dim, name=f"q_{n[5:]}") for n in names]
        self.keys_values = [layers.Dense(2 * dim, name=f"kv_{n[5:]}") for n in names]
        self.outs = [layers.Dense(dim, name=f"out_{n[5:]}") for n in names]

    def build(self, input_shape):
        for layer in self.norms + self.queries + self.keys_values + self.outs:
            layer.build((None, self.dim))

    def call(self, inputs):
        cnn, vit = inputs
        _, h, w, _ = cnn.shape
        ws = self.window_size
        tokens = [_windows(norm(x), ws) for norm, x in zip(self.norms, (cnn, vit))]
        updated = []
        for i, x in enumerate((cnn, vit)):
            other = 1 - i                              # the CNN queries the ViT and vice versa
            k, v = tf.split(self.keys_values[other](tokens[other]), 2, axis=-1)
            att = _attend(self.queries[i](tokens[i]), k, v, self.num_heads)
            updated.append(x + _unwindows(self.outs[i](att), ws, h, w))
        return updated

    def compute_output_shape(self, input_shape):
        return [tuple(input_shape[0]), tuple(input_shape[1])]

    def get_config(self):
        return {**super().get_config(), "dim": self.dim, "num_heads": self.num_heads,
                "window_size": self.window_size}


def _conv_block(x, width, name, bn):
    """Two (3x3 conv, BN, ReLU): the U-Net unit; `bn` holds BatchNormalization's keyword arguments."""
    for i in (1, 2):
        x = layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv{i}")(x)
        x = batch_normalization(**bn, name=f"{name}_bn{i}")(x)
        x = layers.ReLU(name=f"{name}_relu{i}")(x)
    return x


def build_hybrid_student(image_size=256, channels=3, base_channels=32, window_size=8,
                         num_heads=(4, 8, 16), swin_depth=2, mlp_ratio=4.0, dropout=0.0,
                         relative_position_bias=True, bn_momentum=BN_MOMENTUM, sync_batchnorm=False,
                         name="hybrid_student", out_channels=1):
    """The MIRA-U student: a U-Net whose encoder runs a CNN branch and a Swin branch side by side
    at 1/4, 1/8 and 1/16 resolution, joined at each of those stages by bidirectional windowed
    cross-attention; a conv decoder with skip connections; float32 logits [B, H, W, out_channels]
    (1: binary; C: multi-class).

    image_size must be a multiple of 16.  Each Swin stage uses the largest window <= window_size
    that tiles its grid (image_size/4, /8, /16), and shifts windows only when the grid is larger
    than the window, so 32x32 or 64x64 builds are valid for tests.  `sync_batchnorm` synchronises
    BatchNorm statistics across replicas (as the U-Net's model.sync_batchnorm)."""
    if image_size % 16:
        raise ValueError(f"build_hybrid_student: image_size {image_size} must be a multiple of 16")
    if len(num_heads) != 3:
        raise ValueError(f"build_hybrid_student: num_heads needs 3 entries, got {num_heads}")
    b = base_channels
    bn = {"momentum": bn_momentum, "synchronized": sync_batchnorm}
    inputs = keras.Input((image_size, image_size, channels), name="image")
    skips = [_conv_block(inputs, b, "enc1", bn)]
    skips.append(_conv_block(layers.MaxPooling2D(name="pool1")(skips[0]), 2 * b, "enc2", bn))
    cnn = layers.MaxPooling2D(name="pool2")(skips[1])
    # Swin patch embedding: 4x4 patches of the image to 4b channels.
    vit = layers.Conv2D(4 * b, 4, strides=4, name="swin_embed")(inputs)
    vit = layers.LayerNormalization(epsilon=1e-5, name="swin_embed_norm")(vit)
    for level, heads in enumerate(num_heads):
        width, stage = 4 * b * 2 ** level, f"stage{level + 3}"
        if level:
            cnn = layers.MaxPooling2D(name=f"pool{level + 2}")(cnn)
            vit = PatchMerging(width, name=f"{stage}_merge")(vit)
        cnn = _conv_block(cnn, width, f"{stage}_cnn", bn)
        grid = image_size // (4 * 2 ** level)
        ws = fit_window(grid, window_size)
        for i in range(swin_depth):
            shift = ws // 2 if i % 2 and grid > ws else 0
            vit = SwinBlock(width, heads, ws, shift, mlp_ratio, dropout, relative_position_bias,
                            name=f"{stage}_swin{i}")(vit)
        cnn, vit = WindowCrossAttention(width, heads, ws, name=f"{stage}_cross")([cnn, vit])
        fused = layers.Concatenate(name=f"{stage}_concat")([cnn, vit])
        fused = layers.Conv2D(width, 1, use_bias=False, name=f"{stage}_fuse")(fused)
        fused = batch_normalization(**bn, name=f"{stage}_fuse_bn")(fused)
        skips.append(layers.ReLU(name=f"{stage}_fuse_relu")(fused))
    x = skips.pop()
    for level in range(len(skips), 0, -1):
        skip = skips.pop()
        width = skip.shape[-1]
        x = layers.Conv2DTranspose(width, 2, strides=2, name=f"dec{level}_up")(x)
        x = layers.Concatenate(name=f"dec{level}_concat")([x, skip])
        x = _conv_block(x, width, f"dec{level}", bn)
    logits = layers.Conv2D(out_channels, 1, dtype="float32", name="logits")(x)
    return keras.Model(inputs, logits, name=name)


if __name__ == "__main__":
    teacher = build_mim_teacher()
    student = build_hybrid_student()
    print({"mim_teacher": teacher.param_counts(), "hybrid_student": student.count_params()})


# ----------------------------------------------------------------------------- as a plain network
from semiseg.models.registry import register_model  # noqa: E402  (the registry is a leaf: no circle)


@register_model("hybrid")
def build_hybrid(cfg, image_size: int, channels: int, name: str = "hybrid", out_channels: int = 1) -> keras.Model:
    """The MIRA-U student as an ordinary network: `--set model.name=hybrid` trains it with any method
    (the supervised baseline that tells MIRA-U's architecture from its semi-supervision apart).
    Base channels = model.base_filters; two Swin blocks per stage and no dropout, as in MIRA-U;
    model.bn_momentum and model.sync_batchnorm as for the U-Net. config.validate refuses the model.*
    settings it cannot honour (dropout, batchnorm=false, activation) and sizes not a multiple of 16."""
    return build_hybrid_student(image_size, channels, cfg.base_filters, bn_momentum=cfg.bn_momentum,
                                sync_batchnorm=cfg.sync_batchnorm, name=name, out_channels=out_channels)
