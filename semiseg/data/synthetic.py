"""The embedded synthetic data set: dermoscopy-like 2D lesions and CT-like 3D volumes.

semiseg trains out of the box on data generated here, deterministically from a seed, into a cache
folder on first use. The 2D set mimics the ISIC 2016 layout (``images/case_0000.png`` and
``masks/case_0000_segmentation.png``), the 3D set the Medical Segmentation Decathlon layout
(``dataset.json``, ``imagesTr/``, ``labelsTr/``, ``imagesTs/`` with NIfTI volumes and real affines).

    python -m semiseg.data.synthetic /tmp/synth2d --kind 2d --n 400 --size 96 --seed 0
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

GENERATOR_VERSION = "v1"
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


def _irregular_blob(rng, grid, center, radius, irregularity):
    """Level map of a lesion-like blob: < 1 inside. The border is a radius function
    r(theta) = radius * (1 + sum_k a_k cos(k theta + phi_k)) on a rotated, stretched ellipse,
    plus a smooth noise field for the ragged edge. cos(k theta) comes from the Chebyshev-style
    recurrence on (x, y) / rho, so no platform trigonometry enters the pixels."""
    yy, xx = grid
    cos_rot, sin_rot = _random_unit_vector(rng)
    stretch = rng.uniform(0.65, 1.0)
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
    ragged = _smooth_noise(rng, rho.shape, max(1.5, radius / 4.0)) * rng.uniform(0.04, 0.16)
    return rho / border_radius + ragged


def _lesion_pigment(rng, level, size, contrast):
    """Absorption inside one lesion: darker core, mottled texture, sometimes regression zones
    (pale patches) and dark globules, so the inside is not one flat grey."""
    depth = np.clip(1.0 - level, 0.0, 1.0)
    pigment = contrast * (0.6 + 0.4 * np.sqrt(depth / (depth.max() + 1e-12)))
    texture = _smooth_noise(rng, level.shape, rng.uniform(0.8, 2.5) * size / 96)
    pigment = pigment * (1.0 + rng.uniform(0.1, 0.35) * texture)
    if rng.random() < 0.3:
        pale = _smooth_noise(rng, level.shape, 6.0 * size / 96) > rng.uniform(0.3, 1.0)
        pigment = pigment * np.where(pale, rng.uniform(0.3, 0.7), 1.0)
    if rng.random() < 0.3:
        dots = (rng.random(level.shape) < 0.02) & (level < 0.8)
        pigment = pigment + 0.25 * ndimage.gaussian_filter(dots.astype(np.float64), 0.8) * 6.0
    return np.clip(pigment, 0.0, 0.95)


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


def _lesion_case(rng, size, difficulty, low_contrast_share):
    """One RGB image in [0, 1] (H, W, 3) and its binary lesion mask (H, W)."""
    scale = size / 96
    grid = np.mgrid[0:size, 0:size].astype(np.float64) + 0.5
    shape = (size, size)

    # Skin: brightness and tint vary per case; low-frequency shading plus fine skin texture.
    brightness = rng.uniform(0.45, 0.85)
    tint = np.array([1.0, rng.uniform(0.72, 0.86), rng.uniform(0.6, 0.78)])
    shading = rng.uniform(0.04, 0.12) * _smooth_noise(rng, shape, size / 5)
    skin_texture = rng.uniform(0.01, 0.04) * _smooth_noise(rng, shape, 1.2 * scale)
    skin = brightness * (1.0 + shading + skin_texture)

    # Lesions: one, sometimes two, sizes log-uniform from ~1.5% to ~50% of the image.
    absorption = np.zeros(shape)
    mask = np.zeros(shape, dtype=bool)
    n_lesions = 2 if rng.random() < 0.15 else 1
    for index in range(n_lesions):
        radius = size * np.exp(rng.uniform(np.log(0.07), np.log(0.4)))
        if index == 1:
            radius *= rng.uniform(0.35, 0.7)
        center = size / 2 + rng.normal(0, 0.12 * size, 2) if index == 0 else rng.uniform(0.15, 0.85, 2) * size
        level = _irregular_blob(rng, grid, center, radius, rng.uniform(0.05, 0.3))
        shape_mask = level < 1.0
        if not shape_mask.any():
            continue
        low_contrast = rng.random() < min(1.0, low_contrast_share * difficulty)
        contrast = rng.uniform(0.05, 0.12) if low_contrast else rng.uniform(0.15, 0.55)
        pigment = _lesion_pigment(rng, level, size, contrast)
        # Border sharpness: blur the shape; the mask stays the unblurred shape.
        edge_sigma = rng.uniform(0.3, 0.8 + 2.5 * difficulty) * scale
        alpha = ndimage.gaussian_filter(shape_mask.astype(np.float64), edge_sigma)
        if rng.random() < 0.3 * difficulty:  # fuzzy edge: noise in the border band only
            band = 4.0 * alpha * (1.0 - alpha)
            alpha = np.clip(alpha + 0.6 * band * _smooth_noise(rng, shape, 1.0 * scale), 0.0, 1.0)
        absorption = np.maximum(absorption, alpha * pigment)
        mask |= shape_mask

    # Unlabelled freckles: small faint dark spots the model must learn to ignore.
    if rng.random() < 0.4 * difficulty:
        for _ in range(rng.integers(1, 5)):
            spot_center = rng.uniform(0, size, 2)
            spot_radius = rng.uniform(0.8, 2.0) * scale
            dist2 = (grid[0] - spot_center[0]) ** 2 + (grid[1] - spot_center[1]) ** 2
            absorption = np.maximum(absorption, rng.uniform(0.05, 0.2) * (dist2 < spot_radius ** 2))

    # Brown pigment absorbs blue more than red.
    pigment_color = np.array([0.75, 1.0, 1.15]) * rng.uniform(0.9, 1.1, 3)
    image = skin[..., None] * tint * np.clip(1.0 - absorption[..., None] * pigment_color, 0.02, 1.0)

    # Hairs crossing skin and lesion.
    if rng.random() < min(1.0, 0.4 * difficulty):
        hair = _hair_map(rng, size, int(rng.integers(1, 1 + int(np.ceil(6 * difficulty)))))
        hair_color = rng.uniform(0.05, 0.25) * np.array([1.0, 0.9, 0.85])
        image = image * (1.0 - hair[..., None]) + hair[..., None] * hair_color
    # Specular spots from the dermoscope's light.
    if rng.random() < 0.35 * difficulty:
        for _ in range(rng.integers(1, 5)):
            spot_center = rng.uniform(0, size, 2)
            dist2 = (grid[0] - spot_center[0]) ** 2 + (grid[1] - spot_center[1]) ** 2
            # A smooth bump (1 - d^2/R^2)^2 rather than exp(), to keep pixels platform-exact.
            bump = np.clip(1.0 - dist2 / (rng.uniform(1.2, 3.5) * scale) ** 2, 0.0, 1.0) ** 2
            glare = rng.uniform(0.5, 1.0) * bump
            image = image + (1.0 - image) * glare[..., None]
    # Vignetting, and in some cases the dark circular rim of the dermoscope's field of view.
    radial2 = ((grid[0] - size / 2) ** 2 + (grid[1] - size / 2) ** 2) / (size * size / 2)
    image = image * (1.0 - rng.uniform(0.0, 0.35 * difficulty) * radial2)[..., None]
    if rng.random() < 0.2 * difficulty:
        rim = np.sqrt(radial2 / 2) * 2 > rng.uniform(0.9, 1.1)
        rim = ndimage.gaussian_filter(rim.astype(np.float64), 2.0 * scale)
        image = image * (1.0 - 0.9 * rim[..., None])
    image = image + rng.normal(0.0, rng.uniform(0.005, 0.03 * difficulty + 0.005), image.shape)
    return np.clip(image, 0.0, 1.0), mask


def _to_uint8(values):
    return np.floor(np.clip(values, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def generate_2d(out_dir, n_cases=400, size=96, seed=0, channels=1, difficulty=1.0,
                low_contrast_share=0.25) -> Path:
    """Write ``n_cases`` lesion images and masks in the ISIC 2016 layout; return ``out_dir``.

    ``difficulty`` (0 = clean, 1 = default) scales the share of low-contrast lesions, edge blur,
    fuzzy edges and how often hairs, glare, vignetting, dark rims and freckles appear.
    ``low_contrast_share`` is the share of lesions at 5-12% contrast when difficulty is 1.
    The grayscale image (channels=1) is the luminance of the RGB one (channels=3)."""
    if channels not in (1, 3):
        raise ValueError(f"generate_2d: channels must be 1 or 3, got {channels!r}")
    if n_cases < 1 or size < 16:
        raise ValueError(f"generate_2d: need n_cases >= 1 and size >= 16, got {n_cases}, {size}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    (out_dir / "masks").mkdir(parents=True, exist_ok=True)
    luminance = np.array([0.299, 0.587, 0.114])
    for case_index in range(n_cases):
        rng = np.random.default_rng([seed, case_index])
        image, mask = _lesion_case(rng, size, difficulty, low_contrast_share)
        if channels == 1:
            image = image @ luminance
        name = f"case_{case_index:04d}"
        _write_png(out_dir / "images" / f"{name}.png", _to_uint8(image))
        _write_png(out_dir / "masks" / f"{name}_segmentation.png", mask.astype(np.uint8) * 255)
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
        "release": GENERATOR_VERSION,
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
    """Return ``root/<kind>-v1-<hash>``, generating it first if no complete copy exists.

    The hash covers every generator argument (seed included). Generation goes to a temporary
    sibling that receives a ``COMPLETE`` marker (the parameters as JSON) and is then renamed into
    place, so a killed run never leaves a folder that looks finished. A final folder without the
    marker is moved aside and regenerated. When two processes race, the first rename wins and the
    other discards its copy."""
    resolved = _resolved_params(kind, params)
    digest = hashlib.sha256(json.dumps({"kind": kind, **resolved}, sort_keys=True).encode()).hexdigest()
    root = Path(root)
    final = root / f"{kind}-{GENERATOR_VERSION}-{digest[:12]}"
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
    marker = {"kind": kind, "generator_version": GENERATOR_VERSION, "params": resolved}
    (temporary / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2, sort_keys=True) + "\n")
    try:
        os.rename(temporary, final)
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not (final / COMPLETE_MARKER).is_file():
            raise RuntimeError(f"ensure_synthetic: {final} exists but has no {COMPLETE_MARKER} marker "
                               f"after a concurrent generation; remove it and retry") from None
    return final


def main(argv=None):
    parser = argparse.ArgumentParser(description="Generate semiseg's synthetic data set.")
    parser.add_argument("out_dir", help="folder to write (created if missing)")
    parser.add_argument("--kind", choices=sorted(_GENERATORS), default="2d")
    parser.add_argument("--n", type=int, default=None, help="number of (training) cases")
    parser.add_argument("--size", type=int, default=96, help="2D image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--channels", type=int, choices=(1, 3), default=1, help="2D: gray or RGB")
    args = parser.parse_args(argv)
    if args.kind == "2d":
        generate_2d(args.out_dir, n_cases=args.n or 400, size=args.size, seed=args.seed,
                    channels=args.channels)
    else:
        generate_3d(args.out_dir, n_cases=args.n or 6, seed=args.seed)


if __name__ == "__main__":
    main()
