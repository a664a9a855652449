"""The embedded synthetic data set: dermoscopy-like 2D lesions and CT-like 3D volumes.

semiseg trains out of the box on data generated here, deterministically from a seed, into a cache
folder on first use. The 2D set mimics the ISIC 2016 layout (``images/case_0000.png`` and
``masks/case_0000_segmentation.png``), the 3D set the Medical Segmentation Decathlon layout
(``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` with NIfTI volumes and real affines).
The 2D set (generator v2) mixes appearance families (shapes, pigment patterns, skins, exposure,
artefacts) with masks that match the visible lesion; ``families.json`` records each case's families
(docs/data.md has the shares and why).

    python -m semiseg.data.synthetic /tmp/synth2d --kind 2d --n 400 --size 96 --seed 0 [--difficulty 1.5]
    python -m semiseg.data.synthetic /tmp/synth3d --kind 3d --n 6 --seed 0

In code, ``ensure_synthetic(root, kind="2d", n_cases=400)`` returns the folder, generating it only
when no complete copy exists. The same seed gives byte-identical files on any machine: every case
draws from its own ``numpy.random.default_rng([seed, case_index])`` (so the first 10 cases do not
depend on ``n_cases``), angles come from plain arithmetic rather than platform trigonometry, and
PNG and gzip files are written with stored (uncompressed) deflate blocks, so no zlib version or
CPU-specific compressor can change a byte. NumPy, SciPy and nibabel only; no TensorFlow.
"""

import argparse
import hashlib
import inspect
import json
import os
import shutil
import socket
import struct
import uuid
import zlib
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage

GENERATOR_VERSION = "v2"     # the 2D set (appearance families since v2)
GENERATOR_VERSION_3D = "v1"  # the 3D set, unchanged: its folder name and bytes stay those of v1
COMPLETE_MARKER = "COMPLETE"


# --------------------------------------------------------------------------------------------
# Byte-stable file writers. zlib's compressed output differs between library versions (zlib,
# zlib-ng, SIMD builds), so both PNG and gzip use stored deflate blocks: the bytes then depend
# only on the pixels. The files are larger (96x96 gray: 9 kB) but any reader accepts them.

def _stored_deflate(data: bytes) -> bytes:
    """Raw deflate stream made of stored blocks (RFC 1951, BTYPE=00), at most 65535 bytes each."""
    out = bytearray()
    step = 65535
    starts = list(range(0, len(data), step)) or [0]
    for start in starts:
        block = data[start:start + step]
        is_last = start == starts[-1]
        out += struct.pack("<BHH", 1 if is_last else 0, len(block), len(block) ^ 0xFFFF)
        out += block
    return bytes(out)


def _write_png(path: Path, pixels: np.ndarray) -> None:
    """8-bit grayscale (H, W) or RGB (H, W, 3) PNG with filter 0 on every row."""
    pixels = np.ascontiguousarray(pixels, dtype=np.uint8)
    height, width = pixels.shape[:2]
    color_type = 0 if pixels.ndim == 2 else 2
    rows = pixels.reshape(height, -1)
    raw = np.concatenate([np.zeros((height, 1), np.uint8), rows], axis=1).tobytes()
    zlib_stream = b"\x78\x01" + _stored_deflate(raw) + struct.pack(">I", zlib.adler32(raw))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib_stream)
                     + chunk(b"IEND", b""))


def _write_nifti_gz(path: Path, image: nib.Nifti1Image) -> None:
    """A .nii.gz whose gzip member has mtime 0, no file name and stored blocks."""
    raw = image.to_bytes()
    header = b"\x1f\x8b\x08\x00" + struct.pack("<I", 0) + b"\x00\xff"
    trailer = struct.pack("<II", zlib.crc32(raw), len(raw) & 0xFFFFFFFF)
    path.write_bytes(header + _stored_deflate(raw) + trailer)


# --------------------------------------------------------------------------------------------
# 2D: dermoscopy-like lesions.

def _smooth_noise(rng, shape, sigma):
    """Gaussian-filtered white noise, rescaled to unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma, mode="wrap")
    return field / (field.std() + 1e-12)


def _random_unit_vector(rng):
    """(cos, sin) of a uniform random angle, drawn without calling trigonometric functions."""
    vector = rng.standard_normal(2)
    return vector / (np.hypot(vector[0], vector[1]) + 1e-12)


# The 2D set is a mix of appearance families, so that what a few labels miss is coverage: every
# case draws one value per factor below (the first value is the common look) and each artefact
# independently. The rare values (5-12% of cases) are what ~28 labelled images sample poorly
# and ~250 unlabelled ones sample well. Shares are those at difficulty 1; difficulty d multiplies
# every share but the first (and every artefact rate) by d, so 0 gives plain oval brown lesions
# on fair skin. Masks are the visible lesion: the image's lesion edge is the mask blurred by at
# most about a pixel, so its half-intensity line is the mask border.
FAMILY_SHARES = {
    "shape": {"oval": 0.40, "lobed": 0.18, "elongated": 0.12, "satellite": 0.10, "giant": 0.10,
              "small": 0.10},
    "pattern": {"uniform": 0.28, "reticular": 0.18, "globular": 0.14, "blue_veil": 0.10,
                "ring": 0.10, "hypopigmented": 0.10, "two_tone": 0.10},
    "skin": {"fair": 0.42, "tanned": 0.18, "freckled": 0.10, "wrinkled": 0.08, "erythema": 0.10,
             "dark": 0.12},
    # The camera: dermoscopes differ in exposure and tone curve. (A flat, hazy curve was tried and
    # dropped: on dark skin it left lesions at 3-5% contrast, the ambiguity v2 removes.)
    "exposure": {"standard": 0.76, "dim": 0.12, "harsh": 0.12},
}
ARTEFACT_RATES = {"hair": 0.35, "specular": 0.20, "dark_rim": 0.15, "gel_bubbles": 0.12,
                  "ruler": 0.15, "shadow": 0.15, "ink_mark": 0.10}
# The default mix: the table's shares at 1.5 (rare values ~14-18%, ~1.5 artefacts per image). At
# 1.0 (rarer families) 10% labels came within 4-6 Dice points of all labels; at 1.5 they lost 9-15
# (mean 12 over 3 seeds; supervised, --preset cpu, docs/data.md), with all labels near 0.89.
DEFAULT_DIFFICULTY = 1.5
INDEX_FILE = "families.json"


def family_shares(difficulty=1.0, overrides=None):
    """{factor: {value: share}} and {artefact: rate} at ``difficulty``, after ``overrides`` (same
    nesting as FAMILY_SHARES plus an "artefacts" entry; a factor's shares must sum to 1)."""
    shares = {factor: dict(values) for factor, values in FAMILY_SHARES.items()}
    rates = dict(ARTEFACT_RATES)
    for factor, values in (overrides or {}).items():
        known = rates if factor == "artefacts" else shares.get(factor)
        if known is None or not isinstance(values, dict) or set(values) - set(known):
            raise ValueError(f"family_shares: unknown factor or value in {factor!r}: {values!r}; "
                             f"known: {sorted(shares) + ['artefacts']}")
        known.update({name: float(share) for name, share in values.items()})
        if factor != "artefacts" and abs(sum(known.values()) - 1.0) > 1e-6:
            raise ValueError(f"family_shares: {factor} shares sum to {sum(known.values())}, not 1")
    scaled = {}
    for factor, values in shares.items():
        common, *rare = values
        rare_shares = {name: values[name] * difficulty for name in rare}
        total = sum(rare_shares.values())
        if total > 1.0:  # past the point where the common look vanishes, keep the rare mix
            rare_shares = {name: share / total for name, share in rare_shares.items()}
            total = 1.0
        scaled[factor] = {common: 1.0 - total, **rare_shares}
    return scaled, {name: min(1.0, rate * difficulty) for name, rate in rates.items()}


def _draw_families(rng, shares, rates):
    """One value per factor and the artefact list; always the same number of draws."""
    drawn = {}
    for factor, values in shares.items():
        u, cumulative = rng.random(), 0.0
        drawn[factor] = list(values)[-1]
        for name, share in values.items():
            cumulative += share
            if u < cumulative:
                drawn[factor] = name
                break
    drawn["artefacts"] = [name for name, rate in rates.items() if rng.random() < rate]
    return drawn


def _irregular_blob(rng, grid, center, radius, irregularity, stretch):
    """Level map of a lesion-like blob: < 1 inside. The border is a radius function
    r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)) on a rotated, stretched ellipse,
    plus a smooth noise field for the ragged edge. cos(k theta) comes from the Chebyshev-style
    recurrence on (x, y) / rho, so no platform trigonometry enters the pixels."""
    yy, xx = grid
    cos_rot, sin_rot = _random_unit_vector(rng)
    dx, dy = xx - center[1], yy - center[0]
    u = dx * cos_rot + dy * sin_rot
    w = (dy * cos_rot - dx * sin_rot) / stretch
    rho = np.sqrt(u * u + w * w)
    safe = np.where(rho > 0, rho, 1.0)
    cos_1, sin_1 = np.where(rho > 0, u / safe, 1.0), np.where(rho > 0, w / safe, 0.0)
    cos_k, sin_k = cos_1, sin_1
    wobble = np.zeros_like(rho)
    for k in range(2, 8):
        cos_k, sin_k = cos_k * cos_1 - sin_k * sin_1, sin_k * cos_1 + cos_k * sin_1
        phase_cos, phase_sin = _random_unit_vector(rng)
        wobble += rng.normal(0.0, irregularity / k) * (cos_k * phase_cos - sin_k * phase_sin)
    border_radius = radius * np.maximum(1.0 + wobble, 0.35)
    ragged = _smooth_noise(rng, rho.shape, max(1.5, radius / 4.0)) * rng.uniform(0.02, 0.08)
    return rho / border_radius + ragged


def _solid(inside):
    """The largest connected piece of a boolean shape, holes filled: one lesion, no specks."""
    labels, count = ndimage.label(inside)
    if count == 0:
        return inside
    sizes = ndimage.sum(inside, labels, range(1, count + 1))
    return ndimage.binary_fill_holes(labels == 1 + int(np.argmax(sizes)))


def _lesion_shape(rng, kind, grid, size):
    """Mask of the lesion (all pieces) and its level map (< 1 inside, for the pigment layout)."""
    center = size / 2 + rng.normal(0.0, 0.06 * size, 2)
    radius = size * np.sqrt(rng.uniform(0.13 ** 2, 0.32 ** 2))  # area uniform: 5% to 32% of the image
    stretch = rng.uniform(0.3, 0.5) if kind == "elongated" else rng.uniform(0.7, 1.0)
    if kind == "elongated":
        radius *= 1.3
    if kind == "satellite":
        radius *= 0.85
    if kind == "small":  # 1-3% of the frame
        radius = size * rng.uniform(0.06, 0.1)
    if kind == "giant":  # fills most of the frame and leaves it on some side
        radius = size * rng.uniform(0.42, 0.58)
        center = center + rng.normal(0.0, 0.08 * size, 2)
    level = _irregular_blob(rng, grid, center, radius, rng.uniform(0.04, 0.18), stretch)
    if kind == "lobed":  # 3-5 bulges on the rim of a smaller core
        level = _irregular_blob(rng, grid, center, 0.7 * radius, 0.05, stretch)
        for _ in range(int(rng.integers(3, 6))):
            direction = np.array(_random_unit_vector(rng))
            lobe_center = center + direction * 0.62 * radius * rng.uniform(0.85, 1.15)
            lobe = _irregular_blob(rng, grid, lobe_center, radius * rng.uniform(0.4, 0.55), 0.08, 1.0)
            level = np.minimum(level, lobe)
    mask = _solid(level < 1.0)
    if kind == "satellite":  # 1-3 small separate lesions near the main one
        for _ in range(int(rng.integers(1, 4))):
            direction = np.array(_random_unit_vector(rng))
            sat_radius = size * rng.uniform(0.05, 0.085)
            sat_center = center + direction * radius * rng.uniform(1.5, 2.1)
            sat_level = _irregular_blob(rng, grid, sat_center, sat_radius, 0.08, rng.uniform(0.7, 1.0))
            piece = _solid(sat_level < 1.0)
            # Keep it only if it stays whole inside the image and apart from the rest.
            margin = max(2, size // 24)
            apart = not (ndimage.binary_dilation(piece, iterations=margin) & mask).any()
            inside = piece.sum() > 4 and not (piece[:margin].any() or piece[-margin:].any()
                                                or piece[:, :margin].any() or piece[:, -margin:].any())
            if apart and inside:
                mask = mask | piece
                level = np.minimum(level, sat_level)
    return mask, level


def _pattern_absorption(rng, kind, level, mask, size):
    """Absorption (dark lesions) or lift (hypopigmented) inside the lesion and its RGB colour."""
    scale = size / 96
    depth = np.clip(1.0 - level, 0.0, 1.0)
    depth = np.sqrt(depth / (depth[mask].max() + 1e-12)) if mask.any() else depth
    mottle = _smooth_noise(rng, level.shape, rng.uniform(1.0, 2.5) * scale)
    brown = np.array([0.75, 1.0, 1.15]) * rng.uniform(0.92, 1.08, 3)  # melanin absorbs blue most
    if kind == "uniform":
        amount = rng.uniform(0.3, 0.6) * (0.75 + 0.25 * depth) * (1.0 + 0.1 * mottle)
    elif kind == "reticular":  # pigment network: dark lines around paler holes
        lines = np.clip(1.0 - np.abs(_smooth_noise(rng, level.shape, 1.1 * scale)) / 0.5, 0.0, 1.0)
        amount = rng.uniform(0.3, 0.5) * (0.5 + 0.6 * lines)
    elif kind == "globular":  # pale brown with dark round globules
        dots = (rng.random(level.shape) < 0.035).astype(np.float64)
        globules = np.clip(ndimage.gaussian_filter(dots, 1.0 * scale) * 8.0 * scale ** 2, 0.0, 1.0)
        amount = rng.uniform(0.22, 0.35) * (1.0 + 0.1 * mottle) + rng.uniform(0.3, 0.45) * globules
    elif kind == "blue_veil":  # very dark blue-grey with a few whitish patches
        patches = _smooth_noise(rng, level.shape, 3.0 * scale) > rng.uniform(1.0, 1.6)
        amount = rng.uniform(0.55, 0.8) * np.where(patches, 0.55, 1.0) * (1.0 + 0.08 * mottle)
        brown = np.array([1.1, 1.0, 0.8]) * rng.uniform(0.95, 1.05, 3)
    elif kind == "ring":  # a closed dark rim around a centre almost as pale as the skin
        rim = np.clip((level - 0.5) / 0.3, 0.0, 1.0)
        amount = rng.uniform(0.45, 0.65) * (0.12 + 0.88 * rim) * (1.0 + 0.08 * mottle)
    elif kind in ("hypopigmented", "two_tone"):  # paler than the skin: lifted towards pinkish white
        # (two_tone: _lesion_case keeps this lift on one side and pigments the other side brown)
        return rng.uniform(0.55, 0.8) * (1.0 + 0.08 * mottle), np.array([0.99, 0.86, 0.84])
    else:
        raise ValueError(f"unknown pattern {kind!r}")
    return np.clip(amount, 0.0, 0.95), brown


def _hair_map(rng, size, n_hairs):
    """Thin curves across the image: quadratic Bezier curves splatted with bilinear weights."""
    hair = np.zeros((size + 1, size + 1))
    t = np.linspace(0.0, 1.0, 6 * size)[:, None]
    for _ in range(n_hairs):
        start = rng.uniform(-0.2, 1.2, 2) * size
        end = rng.uniform(-0.2, 1.2, 2) * size
        bend = (start + end) / 2 + rng.normal(0, 0.3 * size, 2)
        points = (1 - t) ** 2 * start + 2 * (1 - t) * t * bend + t ** 2 * end
        inside = np.all((points >= 0) & (points < size - 1), axis=1)
        points = points[inside]
        base = np.floor(points).astype(np.int64)
        frac = points - base
        strength = rng.uniform(0.5, 1.0)
        for oy, ox in ((0, 0), (0, 1), (1, 0), (1, 1)):
            weight = (frac[:, 0] if oy else 1 - frac[:, 0]) * (frac[:, 1] if ox else 1 - frac[:, 1])
            np.add.at(hair, (base[:, 0] + oy, base[:, 1] + ox), strength * weight)
    hair = ndimage.gaussian_filter(hair[:size, :size], 0.5)
    return np.clip(hair * 2.0, 0.0, 1.0)


def _skin(rng, kind, grid, size):
    """Skin brightness (H, W, 1), or (H, W, 3) when blotched, and RGB tint for one background family."""
    scale, shape = size / 96, grid.shape[1:]
    low, high = {"fair": (0.68, 0.86), "tanned": (0.5, 0.66), "freckled": (0.66, 0.84), "erythema": (0.66, 0.84),
                 "wrinkled": (0.6, 0.8), "dark": (0.18, 0.3)}[kind]
    tint = np.array([1.0, rng.uniform(0.72, 0.86), rng.uniform(0.6, 0.78)])
    if kind == "dark":
        tint = np.array([1.0, rng.uniform(0.68, 0.76), rng.uniform(0.52, 0.62)])
    skin = rng.uniform(low, high) * (1.0 + rng.uniform(0.03, 0.08) * _smooth_noise(rng, shape, size / 5)
                                     + rng.uniform(0.01, 0.03) * _smooth_noise(rng, shape, 1.2 * scale))
    if kind == "wrinkled":  # a network of thin dark creases, like a pigment network on skin
        creases = np.clip(1.0 - np.abs(_smooth_noise(rng, shape, 2.5 * scale)) / 0.18, 0.0, 1.0)
        skin = skin * (1.0 - rng.uniform(0.15, 0.25) * creases)
    if kind == "erythema":  # large soft red blotches: darker in grey, not lesion
        blotches = np.clip(_smooth_noise(rng, shape, size / 10) - rng.uniform(0.0, 0.6), 0.0, 1.0)
        skin = skin[..., None] * (1.0 - rng.uniform(0.3, 0.5) * blotches[..., None] * np.array([0.1, 0.7, 0.6]))
        return skin, tint
    return skin[..., None], tint


def _half_plane(rng, grid, mask):
    """1 on one side of a line through the lesion (near its centroid), softened over a pixel."""
    direction = np.array(_random_unit_vector(rng))
    ys, xs = np.nonzero(mask) if mask.any() else (np.zeros(1), np.zeros(1))
    across = (grid[0] - ys.mean() - 0.5) * direction[0] + (grid[1] - xs.mean() - 0.5) * direction[1]
    spread = np.sqrt(ys.var() + xs.var()) + 1.0
    return np.clip(0.5 + (across - rng.uniform(-0.3, 0.3) * spread), 0.0, 1.0)


def _disc(grid, center, radius):
    """Boolean disc; distances by plain arithmetic."""
    return (grid[0] - center[0]) ** 2 + (grid[1] - center[1]) ** 2 < radius ** 2


def _freckles(rng, grid, size, mask):
    """Small dark spots on the skin, never on or next to the lesion: unlabelled look-alikes."""
    scale, absorption = size / 96, np.zeros(grid.shape[1:])
    keep_out = ndimage.binary_dilation(mask, iterations=max(2, size // 24))
    for _ in range(int(rng.integers(6, 16))):
        spot = _disc(grid, rng.uniform(0, size, 2), rng.uniform(1.0, 2.4) * scale)
        if not (spot & keep_out).any():
            absorption = np.maximum(absorption, rng.uniform(0.2, 0.4) * spot)
    return ndimage.gaussian_filter(absorption, 0.5 * scale)


def _lesion_extent(grid, mask, direction):
    """Signed distances from the image centre of the mask's nearest and farthest pixels along
    ``direction`` (y, x)."""
    size = grid.shape[1]
    along = (grid[0] - size / 2) * direction[0] + (grid[1] - size / 2) * direction[1]
    return (along[mask].min(), along[mask].max()) if mask.any() else (0.0, 0.0)


def _ruler(rng, image, grid, size, mask):
    """A translucent ruler strip with dark ticks along one side, off the lesion."""
    scale = size / 96
    normal = np.array(_random_unit_vector(rng))
    tangent = np.array([-normal[1], normal[0]])
    width = rng.uniform(6.0, 10.0) * scale
    low, high = _lesion_extent(grid, mask, normal)
    offset = max(rng.uniform(0.3, 0.42) * size, high + width / 2 + 3 * scale)
    across = (grid[0] - size / 2) * normal[0] + (grid[1] - size / 2) * normal[1] - offset
    along = (grid[0] - size / 2) * tangent[0] + (grid[1] - size / 2) * tangent[1]
    band = np.abs(across) < width / 2
    period = rng.uniform(3.5, 5.0) * scale
    phase = np.mod(along / period, 1.0)
    tick_length = np.where(np.mod(np.floor(along / period), 5) == 0, 0.8, 0.45) * width
    ticks = band & (phase < 0.3) & (across < -width / 2 + tick_length)
    image = image * (1.0 - 0.45 * band[..., None]) + 0.45 * band[..., None] * 0.92
    return image * (1.0 - 0.85 * ticks[..., None])


def _ink_mark(rng, image, grid, size, mask):
    """A surgeon's-pen arc drawn around the lesion, clear of it."""
    scale = size / 96
    ys, xs = np.nonzero(mask) if mask.any() else (np.array([size / 2]), np.array([size / 2]))
    center = np.array([ys.mean(), xs.mean()]) + 0.5
    reach = np.sqrt(((ys + 0.5 - center[0]) ** 2 + (xs + 0.5 - center[1]) ** 2).max())
    radius = reach + rng.uniform(3.0, 7.0) * scale
    distance = np.sqrt((grid[0] - center[0]) ** 2 + (grid[1] - center[1]) ** 2)
    stroke = np.clip(1.0 - np.abs(distance - radius) / (rng.uniform(0.8, 1.4) * scale), 0.0, 1.0)
    opening = np.array(_random_unit_vector(rng))
    cosine = ((grid[0] - center[0]) * opening[0] + (grid[1] - center[1]) * opening[1]) / np.maximum(distance, 1e-6)
    stroke = stroke * (cosine < rng.uniform(-0.2, 0.5))  # an arc of 200-300 degrees
    ink = np.array([0.25, 0.2, 0.45]) * rng.uniform(0.6, 1.0)
    strength = rng.uniform(0.7, 0.9) * stroke[..., None]
    return image * (1.0 - strength) + strength * ink


def _gel_bubbles(rng, image, grid, size):
    """Immersion-gel bubbles: a thin dark outline, a slightly brighter inside, a glint."""
    scale = size / 96
    for _ in range(int(rng.integers(2, 7))):
        center, radius = rng.uniform(0, size, 2), rng.uniform(2.0, 7.0) * scale
        distance = np.sqrt((grid[0] - center[0]) ** 2 + (grid[1] - center[1]) ** 2)
        outline = np.clip(1.0 - np.abs(distance - radius) / (0.7 * scale), 0.0, 1.0)
        inside = (distance < radius)[..., None]
        image = image + (1.0 - image) * 0.15 * inside
        image = image * (1.0 - 0.35 * outline[..., None])
        glint = _disc(grid, center - 0.4 * radius, 0.3 * radius + 0.5)[..., None]
        image = image + (1.0 - image) * 0.6 * glint
    return image


def _specular(rng, image, grid, size):
    """Specular spots from the dermoscope's light."""
    for _ in range(int(rng.integers(1, 5))):
        center = rng.uniform(0, size, 2)
        dist2 = (grid[0] - center[0]) ** 2 + (grid[1] - center[1]) ** 2
        # A smooth bump (1 - d^2/R^2)^2 rather than exp(), to keep pixels platform-exact.
        bump = np.clip(1.0 - dist2 / (rng.uniform(1.2, 3.5) * size / 96) ** 2, 0.0, 1.0) ** 2
        image = image + (1.0 - image) * (rng.uniform(0.5, 1.0) * bump)[..., None]
    return image


def _shadow(rng, image, grid, size):
    """Uneven lighting: one side of the frame in a soft shadow (a linear ramp, no lesion edge)."""
    direction = np.array(_random_unit_vector(rng))
    along = ((grid[0] - size / 2) * direction[0] + (grid[1] - size / 2) * direction[1]) / size
    ramp = np.clip((along - rng.uniform(-0.1, 0.2)) / rng.uniform(0.15, 0.35), 0.0, 1.0)
    return image * (1.0 - rng.uniform(0.35, 0.55) * ramp)[..., None]


def _dark_rim(rng, image, grid, size, mask):
    """Vignetting and the dark circular edge of the dermoscope's field, outside the lesion."""
    radial = np.sqrt((grid[0] - size / 2) ** 2 + (grid[1] - size / 2) ** 2) / (size / 2)
    reach = radial[mask].max() if mask.any() else 0.0
    edge = max(rng.uniform(0.85, 1.05), reach + 4.0 / size * 2)
    rim = ndimage.gaussian_filter((radial > edge).astype(np.float64), 1.5 * size / 96)
    image = image * (1.0 - rng.uniform(0.1, 0.3) * radial ** 2)[..., None]
    return image * (1.0 - 0.92 * rim[..., None])


def _lesion_case(rng, size, families):
    """One RGB image in [0, 1] (H, W, 3) and its binary lesion mask (H, W) for drawn families."""
    grid = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    skin, tint = _skin(rng, families["skin"], grid, size)
    mask, level = _lesion_shape(rng, families["shape"], grid, size)
    amount, colour = _pattern_absorption(rng, families["pattern"], level, mask, size)
    # The visible edge: the mask blurred by under a pixel or so, so its 0.5 line is the mask border.
    alpha = ndimage.gaussian_filter(mask.astype(np.float64), rng.uniform(0.4, 1.0) * size / 96)
    absorption = _freckles(rng, grid, size, mask) if families["skin"] == "freckled" else np.zeros(mask.shape)
    image = skin * tint
    if families["pattern"] in ("hypopigmented", "two_tone"):
        image = image * 0.8  # on the brightest skins a pale lesion would not show
        pale = alpha
        if families["pattern"] == "two_tone":  # a collision-like lesion: one side pale, one brown
            pale = alpha * _half_plane(rng, grid, mask)
            absorption = np.maximum(absorption, (alpha - pale) * rng.uniform(0.35, 0.6))
            colour = np.array([0.75, 1.0, 1.15])
        lift = (pale * amount)[..., None]
        image = image * (1.0 - lift) + lift * np.array([0.99, 0.86, 0.84])
    else:
        absorption = np.maximum(absorption, alpha * amount)
    image = image * np.clip(1.0 - absorption[..., None] * colour, 0.02, 1.0)
    artefacts = families["artefacts"]
    if "hair" in artefacts:
        # Hairs are about two pixels wide at any size: fainter in small images, as when downsampled.
        hair = _hair_map(rng, size, int(rng.integers(2, 11))) * min(1.0, size / 96)
        image = image * (1.0 - hair[..., None]) + hair[..., None] * rng.uniform(0.05, 0.2) * np.array([1.0, 0.9, 0.85])
    if "ruler" in artefacts:
        image = _ruler(rng, image, grid, size, mask)
    if "ink_mark" in artefacts:
        image = _ink_mark(rng, image, grid, size, mask)
    if "gel_bubbles" in artefacts:
        image = _gel_bubbles(rng, image, grid, size)
    if "specular" in artefacts:
        image = _specular(rng, image, grid, size)
    if "shadow" in artefacts:
        image = _shadow(rng, image, grid, size)
    if "dark_rim" in artefacts:
        image = _dark_rim(rng, image, grid, size, mask)
    image = _exposure(rng, families["exposure"], np.clip(image, 0.0, 1.0))
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.02), image.shape)
    return np.clip(image, 0.0, 1.0), mask


def _exposure(rng, kind, image):
    """The camera's exposure and tone curve, by plain arithmetic (no pow/exp on pixels)."""
    if kind == "dim":  # underexposed
        return image * rng.uniform(0.45, 0.6)
    if kind == "harsh":  # a steep tone curve: darks darker, skin brighter than midtones
        return np.clip(image * image * rng.uniform(1.2, 1.4), 0.0, 1.0)
    return image


def _to_uint8(values):
    return np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_2d(out_dir, n_cases=400, size=96, seed=0, channels=1, difficulty=DEFAULT_DIFFICULTY,
                family_shares_override=None) -> Path:
    """Write ``n_cases`` lesion images and masks in the ISIC 2016 layout, and ``families.json``
    (every case's families and the shares used); return ``out_dir``.

    ``difficulty`` scales the shares of the rare families and the artefact rates (0: only plain
    oval brown lesions on fair skin; 1: the mix in FAMILY_SHARES / ARTEFACT_RATES; default 1.5).
    ``family_shares_override`` replaces some of those shares, e.g. {"pattern": {"uniform": 0.27,
    "hypopigmented": 0.16}}, {"artefacts": {"ruler": 0.2}}.
    The grayscale image (channels=1) is the luminance of the RGB one (channels=3)."""
    if channels not in (1, 3):
        raise ValueError(f"generate_2d: channels must be 1 or 3, got {channels!r}")
    if n_cases < 1 or size < 16 or difficulty < 0:
        raise ValueError(f"generate_2d: need n_cases >= 1, size >= 16 and difficulty >= 0, "
                         f"got {n_cases}, {size}, {difficulty}")
    shares, rates = family_shares(difficulty, family_shares_override)
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    luminance = np.array([0.299, 0.587, 0.114])
    cases = {}
    for case_index in range(n_cases):
        rng = np.random.default_rng([seed, case_index])
        families = _draw_families(rng, shares, rates)
        image, mask = _lesion_case(rng, size, families)
        if channels == 1:
            image = image @ luminance
        name = f"case_{case_index:04d}"
        _write_png(out_dir / "images" / f"{name}.png", _to_uint8(image))
        _write_png(out_dir / "masks" / f"{name}_segmentation.png", mask.astype(np.uint8) * 255)
        cases[name] = {**families, "lesion_pieces": int(ndimage.label(mask)[1])}
    index = {"generator_version": GENERATOR_VERSION, "difficulty": difficulty,
             "shares": shares, "artefact_rates": rates, "cases": cases}
    (out_dir / INDEX_FILE).write_text(json.dumps(index, indent=1, sort_keys=True) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# 3D: CT-like abdominal volumes in the Decathlon layout.

# Axis flips of the stored voxel array relative to RAS, cycled over the volumes: the second is
# LPS-like (DICOM order), the third flips y and z; readers must reorient to canonical.
_AXIS_FLIPS = ((1, 1, 1), (-1, -1, 1), (1, -1, -1))


def _ct_volume(rng, shape, spacing):
    """Hounsfield int16 volume and uint8 labels (0 background, 1 organ, 2 lesion) in RAS order."""
    nx, ny, nz = shape
    xx, yy, zz = np.meshgrid(*(np.arange(n, dtype=np.float64) + 0.5 for n in shape), indexing="ij")
    # Positions in mm from the volume centre so shapes keep their size whatever the spacing.
    x_mm, y_mm, z_mm = ((xx - nx / 2) * spacing[0], (yy - ny / 2) * spacing[1], (zz - nz / 2) * spacing[2])
    half_x, half_y = nx * spacing[0] / 2, ny * spacing[1] / 2
    body_a = half_x * rng.uniform(0.78, 0.9) * (1 + 0.04 * (z_mm / (nz * spacing[2] / 2)) ** 2)
    body_b = half_y * rng.uniform(0.6, 0.75)
    body_level = (x_mm / body_a) ** 2 + (y_mm / body_b) ** 2
    body = body_level < 1.0
    fat = body & (body_level > rng.uniform(0.72, 0.82))

    hu = np.full(shape, -1000.0)
    hu[body] = 40.0
    hu[fat] = -100.0
    # Spine posterior (low y in RAS), a pair of ribs-like rods near the body wall.
    spine = (x_mm ** 2 + (y_mm + 0.7 * body_b) ** 2) < (0.13 * body_b) ** 2
    hu[spine] = 700.0
    # Unlabelled look-alikes, so intensity alone does not find the organ: a contrast-filled aorta
    # brighter than the organ in front of the spine, and small gas pockets (bowel).
    aorta = ((x_mm + 0.12 * body_b) ** 2 + (y_mm + 0.4 * body_b) ** 2) < (0.09 * body_b) ** 2
    hu[aorta] = rng.uniform(150, 200)
    gas = _smooth_noise(rng, shape, (2.0, 2.0, 1.0)) > 2.6
    hu[gas & body & (body_level < 0.6)] = -800.0
    for side in (-1, 1):
        rib = ((x_mm - side * 0.8 * body_a) ** 2 / (0.06 * body_a) ** 2
               + (y_mm - 0.1 * body_b) ** 2 / (0.12 * body_b) ** 2) < 1.0
        hu[rib & body] = rng.uniform(500, 800)

    # Organ: a perturbed ellipsoid covering only part of the slices; a hypodense lesion inside.
    center = np.array([rng.uniform(-0.25, 0.05) * half_x, rng.uniform(-0.1, 0.3) * body_b,
                       rng.uniform(-0.15, 0.15) * nz * spacing[2]])
    radii = np.array([rng.uniform(0.35, 0.45) * half_x, rng.uniform(0.45, 0.6) * body_b,
                      rng.uniform(0.25, 0.35) * nz * spacing[2]])
    organ_level = (((x_mm - center[0]) / radii[0]) ** 2 + ((y_mm - center[1]) / radii[1]) ** 2
                   + ((z_mm - center[2]) / radii[2]) ** 2)
    organ_level = organ_level + 0.15 * _smooth_noise(rng, shape, (3.0, 3.0, 1.5))
    organ = (organ_level < 1.0) & body & ~spine & ~aorta
    lesion_center = center + rng.uniform(-0.3, 0.3, 3) * radii
    lesion_radius = rng.uniform(0.35, 0.55) * radii[:2].min()
    lesion_level = (((x_mm - lesion_center[0]) ** 2 + (y_mm - lesion_center[1]) ** 2
                     + (z_mm - lesion_center[2]) ** 2) / lesion_radius ** 2
                    + 0.2 * _smooth_noise(rng, shape, 2.0))
    lesion = (lesion_level < 1.0) & organ
    hu[organ] = rng.uniform(90, 120)
    hu[lesion] = rng.uniform(45, 70)

    # Partial-volume blur and scanner noise.
    hu = ndimage.gaussian_filter(hu, (0.7, 0.7, 0.4)) + rng.normal(0.0, rng.uniform(10, 20), shape)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[organ] = 1
    labels[lesion] = 2
    return np.clip(np.floor(hu + 0.5), -1024, 3071).astype(np.int16), labels


def _affine(rng, shape, spacing, flips):
    """Voxel-to-world (RAS mm) affine of a stored array flipped by ``flips`` from RAS order, with a
    scanner-like non-zero origin. The anatomy sits at the same world position as unflipped."""
    origin = np.array([rng.uniform(-200, -150), rng.uniform(-180, -120), rng.uniform(-600, -400)])
    affine = np.eye(4)
    for axis in range(3):
        affine[axis, axis] = flips[axis] * spacing[axis]
        # A flipped axis starts at the far end so voxel (n-1) lands where RAS voxel 0 was.
        affine[axis, 3] = origin[axis] if flips[axis] > 0 else origin[axis] + (shape[axis] - 1) * spacing[axis]
    return affine


def _nifti(data, affine, spacing):
    image = nib.Nifti1Image(data, affine)
    image.header.set_data_dtype(data.dtype)
    image.header.set_zooms(tuple(float(s) for s in spacing))
    image.header.set_xyzt_units("mm", "sec")
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    return image


def generate_3d(out_dir, n_cases=6, shape=(64, 64, 24), seed=0, n_test=2,
                spacing=(0.8, 0.8, 2.5)) -> Path:
    """Write ``n_cases`` labelled and ``n_test`` unlabelled CT-like volumes in the Decathlon layout.

    Volume i is stored with the axis flips ``_AXIS_FLIPS[i % 3]`` so reorientation matters."""
    shape = tuple(int(n) for n in shape)
    spacing = tuple(float(s) for s in spacing)
    if len(shape) != 3 or min(shape) < 8 or len(spacing) != 3 or min(spacing) <= 0:
        raise ValueError(f"generate_3d: shape needs 3 sizes >= 8 and spacing 3 positive values, "
                         f"got shape={shape} spacing={spacing}")
    out_dir = Path(out_dir)
    for folder in ("imagesTr", "labelsTr", "imagesTs"):
        (out_dir / folder).mkdir(parents=True, exist_ok=True)
    training, test = [], []
    for index in range(n_cases + n_test):
        rng = np.random.default_rng([seed, 3, index])
        hu, labels = _ct_volume(rng, shape, spacing)
        flips = _AXIS_FLIPS[index % len(_AXIS_FLIPS)]
        affine = _affine(rng, shape, spacing, flips)
        flip_axes = tuple(axis for axis in range(3) if flips[axis] < 0)
        hu, labels = np.flip(hu, flip_axes).copy(), np.flip(labels, flip_axes).copy()
        name = f"vol_{index:03d}.nii.gz"
        if index < n_cases:
            _write_nifti_gz(out_dir / "imagesTr" / name, _nifti(hu, affine, spacing))
            _write_nifti_gz(out_dir / "labelsTr" / name, _nifti(labels, affine, spacing))
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            _write_nifti_gz(out_dir / "imagesTs" / name, _nifti(hu, affine, spacing))
            test.append(f"./imagesTs/{name}")
    description = {
        "name": "SyntheticCT",
        "description": "semiseg's embedded CT-like volumes: organ (1) with a hypodense lesion (2)",
        "reference": "generated by synthetic_data.py",
        "licence": "CC0",
        "release": GENERATOR_VERSION_3D,
        "tensorImageSize": "3D",
        "modality": {"0": "CT"},
        "labels": {"0": "background", "1": "organ", "2": "lesion"},
        "numTraining": n_cases,
        "numTest": n_test,
        "training": training,
        "test": test,
    }
    (out_dir / "dataset.json").write_text(json.dumps(description, indent=2) + "\n")
    return out_dir


# --------------------------------------------------------------------------------------------
# Cache folder: generate once, atomically, reuse after.

_GENERATORS = {"2d": generate_2d, "3d": generate_3d}
_VERSIONS = {"2d": GENERATOR_VERSION, "3d": GENERATOR_VERSION_3D}


def _resolved_params(kind, params):
    """All generator arguments (defaults filled in), JSON-ready, so equal data hash equally."""
    if kind not in _GENERATORS:
        raise ValueError(f"ensure_synthetic: kind must be one of {sorted(_GENERATORS)}, got {kind!r}")
    signature = inspect.signature(_GENERATORS[kind])
    try:
        bound = signature.bind(None, **params)
    except TypeError as error:
        known = [name for name in signature.parameters if name != "out_dir"]
        raise TypeError(f"ensure_synthetic(kind={kind!r}): {error}; known parameters: {known}") from None
    bound.apply_defaults()
    resolved = dict(bound.arguments)
    resolved.pop("out_dir")
    return json.loads(json.dumps(resolved))  # tuples become lists, as they will be read back


def _pid_is_dead(pid):
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_abandoned_temporaries(root, final_name):
    """Temp folders of generations killed on this host (their process is gone)."""
    host = socket.gethostname()
    for candidate in sorted(root.glob(f".{final_name}.tmp-*")):
        parts = candidate.name.rsplit("-", 3)  # ".NAME.tmp", host, pid, token
        if len(parts) == 4 and parts[1] == host and parts[2].isdigit() and _pid_is_dead(int(parts[2])):
            shutil.rmtree(candidate, ignore_errors=True)


def ensure_synthetic(root, kind="2d", **params) -> Path:
    """Return ``root/<kind>-<version>-<hash>``, generating it first if no complete copy exists.

    The hash covers every generator argument (seed included). Generation goes to a temporary
    sibling that receives a ``COMPLETE`` marker (the parameters as JSON) and is then renamed into
    place, so a killed run never leaves a folder that looks finished. A final folder without the
    marker is moved aside and regenerated. When two processes race, the first rename wins and the
    other discards its copy."""
    resolved = _resolved_params(kind, params)
    digest = hashlib.sha256(json.dumps({"kind": kind, **resolved}, sort_keys=True).encode()).hexdigest()
    root = Path(root)
    final = root / f"{kind}-{_VERSIONS[kind]}-{digest[:12]}"
    if (final / COMPLETE_MARKER).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_abandoned_temporaries(root, final.name)
    if final.exists():  # no marker: a generation was interrupted; move aside atomically, then delete
        trash = root / f".{final.name}.trash-{uuid.uuid4().hex}"
        try:
            os.rename(final, trash)
            shutil.rmtree(trash, ignore_errors=True)
        except FileNotFoundError:
            pass  # another process moved it first
    temporary = root / f".{final.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    _GENERATORS[kind](temporary, **resolved)
    marker = {"kind": kind, "generator_version": _VERSIONS[kind], "params": resolved}
    (temporary / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    try:
        os.rename(temporary, final)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not (final / COMPLETE_MARKER).is_file():
            raise RuntimeError(f"ensure_synthetic: {final} exists but has no {COMPLETE_MARKER} marker "
                               f"after a concurrent generation; remove it and retry") from None
    return final


SYNTHETIC_3D_SLICES = 24     # slices per volume of the embedded 3D set (generate_3d's default depth)


def synthetic_root(data_cfg) -> Path:
    """The embedded data set of a DataConfig (data.synthetic_*), generated on first use under
    <cache home>/synthetic (semiseg.config.cache_home: next to the slice caches) and reused.
    data.synthetic_kind=3d: the CT-like volumes (Decathlon layout), synthetic_cases labelled
    volumes of synthetic_size x synthetic_size x 24 voxels plus 2 unlabelled ones."""
    from semiseg import config
    if getattr(data_cfg, "synthetic_kind", "2d") == "3d":
        return ensure_synthetic(config.cache_home(data_cfg) / "synthetic", kind="3d", n_cases=data_cfg.synthetic_cases,
                                shape=(data_cfg.synthetic_size, data_cfg.synthetic_size, SYNTHETIC_3D_SLICES),
                                seed=data_cfg.synthetic_seed)
    return ensure_synthetic(config.cache_home(data_cfg) / "synthetic", kind="2d", n_cases=data_cfg.synthetic_cases,
                            size=data_cfg.synthetic_size, seed=data_cfg.synthetic_seed,
                            difficulty=data_cfg.synthetic_difficulty)


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate semiseg's synthetic data set.")
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--kind", choices=sorted(_GENERATORS), default="2d")
    parser.add_argument("--n", type=int, default=None, help="number of (training) cases")
    parser.add_argument("--size", type=int, default=96, help="2D image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="2D: gray or RGB")
    parser.add_argument("--difficulty", type=float, default=DEFAULT_DIFFICULTY,
                        help="2D: scales the rare families' shares (1 = FAMILY_SHARES)")
    args = parser.parse_args(argv)
    try:  # the generators check their arguments before writing anything
        if args.kind == "2d":
            generate_2d(args.out_dir, n_cases=args.n or 400, size=args.size, seed=args.seed,
                        channels=args.channels, difficulty=args.difficulty)
        else:
            generate_3d(args.out_dir, n_cases=args.n or 6, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))  # exit code 2


if __name__ == "__main__":
    main()
