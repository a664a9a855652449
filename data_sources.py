"""Data sources: turn a data-set folder into a list of cases, and read one case as normalised slices.

    python -c "import data_sources as d, config; print(d.list_cases('synthetic', '', config.DataConfig())[:2])"

A *source* is registered by format name and provides two functions:
  list_cases(root, data_cfg) -> list[Case]         (paths only, nothing decoded: cheap)
  load_case(case, data_cfg)  -> LoadedCase         (image slices in [0, 1], label slices, spacing)
Everything downstream (splits, the slice cache, tf.data) works on these, whatever the format.
No TensorFlow here: sources run in preprocessing worker processes.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np


class DataError(ValueError):
    """A problem with the input data; the message names the file and what is wrong."""


@dataclass(frozen=True)
class Case:
    case_id: str
    image: str                     # path of the image (2D picture or NIfTI volume)
    label: Optional[str] = None    # path of the label, None for genuinely unlabelled cases
    subset: Optional[str] = None   # split fixed by the data set's own layout (train/val/test), else None
    kind: str = "2d"               # 2d | 3d


@dataclass
class LoadedCase:
    image: np.ndarray              # [S, H, W, C] float32 in [0, 1]; S = 1 for 2D images
    label: Optional[np.ndarray]    # [S, H, W] uint8 in {0, 1}, or None
    spacing: tuple                 # (row, col, slice) in mm, or (1, 1, 1) pixels when unknown
    spacing_unit: str = "px"       # mm | px
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    name: str
    list_cases: Callable
    load_case: Callable
    detect: Optional[Callable] = None   # detect(root) -> bool, for --format auto


SOURCES: dict[str, Source] = {}


def register_source(name: str, list_cases, load_case, detect=None) -> None:
    SOURCES[name] = Source(name, list_cases, load_case, detect)


def get_source(name: str) -> Source:
    if name not in SOURCES:
        raise DataError(f"data.format: unknown format '{name}' (known: {', '.join(sorted(SOURCES))})")
    return SOURCES[name]


def detect_format(root) -> str:
    """Infer the format of a data-set folder from its layout (`--format auto`)."""
    root = Path(root)
    if not root.exists():
        raise DataError(f"data path {root} does not exist")
    for name in sorted(SOURCES, key=lambda n: n == "isic"):   # isic's layout is the loosest: last
        source = SOURCES[name]
        if source.detect is not None and source.detect(root):
            return name
    raise DataError(f"cannot infer the format of {root}: expected one of the layouts in README "
                    f"(formats: {', '.join(sorted(SOURCES))}); pass --format")


# ---------------------------------------------------------------- 2D pictures (ISIC-like layout)
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")
_SEG_SUFFIX = re.compile(r"_segmentation$", re.IGNORECASE)


def read_picture(path, channels: int = 0) -> np.ndarray:
    """Read a 2D picture as [H, W, C] float32 in [0, 1]; channels 0 = keep (grey -> 1, colour -> 3)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I"):
                arr = np.asarray(img, dtype=np.float32)
                arr = arr / max(float(arr.max()), 1.0)
                arr = arr[..., None]
            else:
                mode = "L" if (channels == 1 or (channels == 0 and img.mode in ("L", "P", "1", "LA"))) else "RGB"
                arr = np.asarray(img.convert(mode), dtype=np.float32) / 255.0
                if arr.ndim == 2:
                    arr = arr[..., None]
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: unreadable or truncated image ({err})") from None
    if channels == 3 and arr.shape[-1] == 1:
        arr = np.repeat(arr, 3, axis=-1)
    return arr


def read_mask_picture(path) -> np.ndarray:
    """Read a mask picture as [H, W] uint8 {0, 1}: any non-zero pixel is foreground (0/255 masks)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            arr = np.asarray(img.convert("L"))
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: unreadable or truncated mask ({err})") from None
    return (arr > 127).astype(np.uint8) if arr.max() > 1 else (arr > 0).astype(np.uint8)


def load_picture_case(case: Case, data_cfg) -> LoadedCase:
    image = read_picture(case.image, data_cfg.channels)
    label = None
    if case.label is not None:
        label = read_mask_picture(case.label)
        if label.shape != image.shape[:2]:
            raise DataError(f"label {case.label} has shape {label.shape} but image {case.image} "
                            f"has shape {image.shape[:2]}")
    return LoadedCase(image[None], None if label is None else label[None], (1.0, 1.0, 1.0), "px")


def _pictures(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


def list_isic_cases(root, data_cfg) -> list[Case]:
    """ISIC-2016 layout: images/ISIC_x.jpg with masks/ISIC_x_segmentation.png (suffix matched
    case-insensitively, as releases differ); an image without a mask is unlabelled."""
    root = Path(root)
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise DataError(f"{root}: no images/ folder (ISIC layout: images/ and masks/)")
    masks = {}
    if masks_dir.is_dir():
        for path in _pictures(masks_dir):
            stem = _SEG_SUFFIX.sub("", path.stem)
            masks[stem.lower()] = path
    cases = []
    for path in _pictures(images_dir):
        label = masks.get(path.stem.lower())
        cases.append(Case(path.stem, str(path), str(label) if label else None))
    if not cases:
        raise DataError(f"{images_dir}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return cases


def detect_isic(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "masks").is_dir()


register_source("isic", list_isic_cases, load_picture_case, detect_isic)


# ---------------------------------------------------------------- the embedded synthetic data set
def synthetic_root(data_cfg) -> Path:
    """Generate the embedded data set on first use (deterministic from the seed) and reuse it."""
    import synthetic_data
    cache = Path(data_cfg.cache_dir or os.environ.get("SEMISEG_CACHE") or Path.home() / ".cache" / "semiseg")
    return synthetic_data.ensure_synthetic(cache / "synthetic", kind="2d", n_cases=data_cfg.synthetic_cases,
                                           size=data_cfg.synthetic_size, seed=data_cfg.synthetic_seed,
                                           difficulty=data_cfg.synthetic_difficulty)


def list_synthetic_cases(root, data_cfg) -> list[Case]:
    return list_isic_cases(root, data_cfg)


register_source("synthetic", list_synthetic_cases, load_picture_case)
