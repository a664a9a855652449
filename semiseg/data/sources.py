"""Data sources: turn a data-set folder into a list of cases, and read one case as normalised slices.

    python main.py check-data --data PATH [--format msd|acdc|isic|ph2|folders]   # lists and checks the cases

A *source* is registered by format name and provides:
  list_cases(root, data_cfg) -> list[Case]         (paths only, nothing decoded: cheap)
  load_case(case, data_cfg)  -> LoadedCase         (image slices in [0, 1], label slices, spacing)
  detect(root) -> bool                             (optional: does this folder have my layout?)
  find_orphans(root, data_cfg) -> [(path, what)]   (optional: files that pair with nothing)
Everything downstream (splits, the slice cache, tf.data) works on these, whatever the format.
Formats (layouts drawn in docs/data.md): msd, acdc, isic, ph2, folders, and the embedded synthetic set.
No TensorFlow here: sources run in preprocessing worker processes.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np


from semiseg.errors import DataError  # noqa: E402  (defined with the other errors: volumes raises it too)


@dataclass(frozen=True)
class Case:
    case_id: str
    image: str                     # path of the image (2D picture or NIfTI volume)
    label: Optional[str] = None    # path of the label, None for genuinely unlabelled cases
    subset: Optional[str] = None   # split fixed by the data set's own layout (train/val/test), else None
    kind: str = "2d"               # 2d | 3d
    modality: Optional[str] = None  # ct | mri for volumes when the data set says so (MSD dataset.json)
    group: Optional[str] = None    # cases of one patient (ACDC: its ED and ES frames) share it; splits keep a
                                   # group on one side. None = the case is its own group


@dataclass
class LoadedCase:
    image: np.ndarray              # [S, H, W, C] float32 in [0, 1]; S = 1 for 2D images
    label: Optional[np.ndarray]    # [S, H, W] uint8 class indices (binary: {0, 1}), or None
    spacing: tuple                 # (row, col, slice) in mm, or (1, 1, 1) pixels when unknown
    spacing_unit: str = "px"       # mm | px
    meta: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Source:
    name: str
    list_cases: Callable
    load_case: Callable
    detect: Optional[Callable] = None   # detect(root) -> bool, for --format auto
    find_orphans: Optional[Callable] = None   # find_orphans(root, data_cfg) -> [(path, what is wrong)]
    layout: str = ""                    # the folder layout(s) it reads, for the inference error


SOURCES: dict[str, Source] = {}


def register_source(name: str, list_cases, load_case, detect=None, find_orphans=None, layout: str = "") -> None:
    SOURCES[name] = Source(name, list_cases, load_case, detect, find_orphans, layout)


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
    layouts = "\n".join(f"--format {name}:\n{SOURCES[name].layout}" for name in sorted(SOURCES)
                         if SOURCES[name].layout)
    raise DataError(f"cannot infer the format of {root}: it has none of these layouts (or pass --format):\n"
                    f"{layouts}")


def resolve_source(data_cfg, log=print) -> tuple[str, Path, list[Case]]:
    """(format, root, cases) for the configured data; infers the format when asked to, and
    generates the embedded synthetic set on first use."""
    fmt = data_cfg.format
    if fmt == "synthetic":
        from semiseg.data import synthetic as synthetic_data
        root = synthetic_data.synthetic_root(data_cfg)
    else:
        if not data_cfg.path:
            raise DataError(f"data.path is empty: pass --data PATH for format '{fmt}'")
        root = Path(data_cfg.path).expanduser()
        if not root.exists():
            raise DataError(f"data path {root} does not exist")
        if fmt == "auto":
            fmt = detect_format(root)
            log(f"data format inferred: {fmt} ({root})")
    cases = get_source(fmt).list_cases(root, data_cfg)
    ids = [c.case_id for c in cases]
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})[:5]
        raise DataError(f"{root}: duplicate case ids {dup}")
    return fmt, root, cases


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


# Picture modes whose pixel values are the stored numbers themselves (palette PNGs: the indices),
# so they can hold a label map; RGB(A) masks have no one value per pixel.
LABEL_MAP_MODES = ("L", "P", "I", "I;16", "1")


def read_label_picture(path) -> np.ndarray:
    """The raw pixel values of a single-channel mask picture as [H, W] int64 (palette: indices)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            if img.mode not in LABEL_MAP_MODES:
                raise DataError(f"{path}: a multi-class mask must be a single-channel label map (grey or "
                                f"palette PNG whose values are the labels), got mode {img.mode}")
            return np.asarray(img).astype(np.int64)
    except (OSError, UnidentifiedImageError) as err:
        raise DataError(f"{path}: unreadable or truncated mask ({err})") from None


def read_mask_picture(path, data_cfg=None) -> np.ndarray:
    """Read a mask picture as [H, W] uint8 class indices. One class (the default): {0, 1}, any
    non-zero pixel is foreground (0/255 masks). K classes (data.classes): pixel values are label
    values, mapped as volumes are (label_set[i] -> class i + 1, others background)."""
    from PIL import Image, UnidentifiedImageError
    if data_cfg is not None and len(data_cfg.classes) >= 2:
        from semiseg.data import volumes
        return volumes.map_labels(read_label_picture(path), data_cfg.label_set)
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
        label = read_mask_picture(case.label, data_cfg)
        if label.shape != image.shape[:2]:
            raise DataError(f"label {case.label} has shape {label.shape} but image {case.image} "
                            f"has shape {image.shape[:2]}")
    return LoadedCase(image[None], None if label is None else label[None], (1.0, 1.0, 1.0), "px")


def _pictures(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))


# The official ISIC releases as downloaded and unzipped side by side: (subset, image folder, mask
# folder). Masks are NAME_segmentation.png (2016: _Segmentation.png); the official test set becomes
# the test split and the official validation set, where the release has one, the validation split.
ISIC_RELEASES = {
    "ISIC 2016": (("train", "ISBI2016_ISIC_Part1_Training_Data", "ISBI2016_ISIC_Part1_Training_GroundTruth"),
                  ("test", "ISBI2016_ISIC_Part1_Test_Data", "ISBI2016_ISIC_Part1_Test_GroundTruth")),
    "ISIC 2017": (("train", "ISIC-2017_Training_Data", "ISIC-2017_Training_Part1_GroundTruth"),
                  ("val", "ISIC-2017_Validation_Data", "ISIC-2017_Validation_Part1_GroundTruth"),
                  ("test", "ISIC-2017_Test_v2_Data", "ISIC-2017_Test_v2_Part1_GroundTruth")),
    "ISIC 2018": (("train", "ISIC2018_Task1-2_Training_Input", "ISIC2018_Task1_Training_GroundTruth"),
                  ("val", "ISIC2018_Task1-2_Validation_Input", "ISIC2018_Task1_Validation_GroundTruth"),
                  ("test", "ISIC2018_Task1-2_Test_Input", "ISIC2018_Task1_Test_GroundTruth")),
}
# ISIC 2017's data folders also hold a superpixel map per image (ISIC_x_superpixels.png): not an image.
_ISIC_NOT_IMAGES = re.compile(r"_(superpixels|segmentation)$", re.IGNORECASE)


def _release_folder(root: Path, name: str) -> Optional[Path]:
    """root/NAME, or root/NAME/NAME (some unzip tools add a level); None when absent."""
    folder = root / name
    if (folder / name).is_dir():
        folder = folder / name
    return folder if folder.is_dir() else None


def isic_release(root: Path) -> Optional[tuple]:
    """(release name, [(subset, image folder, mask folder or None)]) of an official ISIC download
    in `root`, or None; recognised by its training image folder."""
    for release, parts in ISIC_RELEASES.items():
        if _release_folder(root, parts[0][1]) is None:
            continue
        found = [(subset, _release_folder(root, images), _release_folder(root, masks))
                 for subset, images, masks in parts]
        return release, [(s, i, m) for s, i, m in found if i is not None]
    return None


def _isic_pairs(images_dir: Path, masks_dir: Optional[Path]) -> list[tuple[Path, Optional[Path]]]:
    """(image, mask or None) for every image of a folder; masks matched by NAME_segmentation."""
    masks = {}
    if masks_dir is not None and masks_dir.is_dir():
        for path in _pictures(masks_dir):
            masks[_SEG_SUFFIX.sub("", path.stem).lower()] = path
    return [(path, masks.get(path.stem.lower())) for path in _pictures(images_dir)
            if not _ISIC_NOT_IMAGES.search(path.stem)]


def list_isic_cases(root, data_cfg) -> list[Case]:
    """ISIC: images/ISIC_x.jpg with masks/ISIC_x_segmentation.png (suffix matched case-insensitively,
    as releases differ; an image without a mask is unlabelled), or an official ISIC 2016/2017/2018
    download as unzipped (ISIC_RELEASES): its test (and validation) images form the test (and
    validation) split; a test or validation image without a mask is an unlabelled training case
    when data.unlabeled_test_images, else left out."""
    root = Path(root)
    release = isic_release(root)
    if release is not None:
        name, parts = release
        subsets = {s for s, _, _ in parts}
        cases = []
        for subset, images_dir, masks_dir in parts:
            for image, mask in _isic_pairs(images_dir, masks_dir):
                if subset == "train":
                    # Fixed only when the release gives both val and test: else the missing split
                    # is cut from the training images (as the folders format does).
                    fixed = "train" if {"val", "test"} <= subsets else None
                    cases.append(Case(image.stem, str(image), str(mask) if mask else None, subset=fixed))
                elif mask is not None:
                    cases.append(Case(image.stem, str(image), str(mask), subset=subset))
                elif data_cfg.unlabeled_test_images:
                    cases.append(Case(image.stem, str(image), None))
        if not cases:
            raise DataError(f"{parts[0][1]}: no images found ({name} layout; {', '.join(IMAGE_SUFFIXES)})")
        return cases
    images_dir, masks_dir = root / "images", root / "masks"
    if not images_dir.is_dir():
        raise DataError(f"{root}: neither images/ (+ masks/) nor an official ISIC download; "
                        f"expected one of:\n{ISIC_LAYOUT}")
    cases = [Case(image.stem, str(image), str(mask) if mask else None)
             for image, mask in _isic_pairs(images_dir, masks_dir)]
    if not cases:
        raise DataError(f"{images_dir}: no images found ({', '.join(IMAGE_SUFFIXES)})")
    return cases


ISIC_LAYOUT = "\n".join(
    ["  images/ISIC_x.jpg + masks/ISIC_x_segmentation.png"]
    + [f"  {release}: " + ", ".join(f"{images}/ + {masks}/ ({subset})" for subset, images, masks in parts)
       for release, parts in ISIC_RELEASES.items()])


def detect_isic(root: Path) -> bool:
    return ((root / "images").is_dir() and not (root / "labels").is_dir()) or isic_release(root) is not None


def isic_orphans(root, data_cfg) -> list:
    root = Path(root)
    release = isic_release(root)
    pairs = ([(i, m) for _, i, m in release[1]] if release is not None
             else [(root / "images", root / "masks")])
    found = []
    for images_dir, masks_dir in pairs:
        if masks_dir is None or not masks_dir.is_dir() or not images_dir.is_dir():
            continue
        images = {p.stem.lower() for p in _pictures(images_dir)}
        found += [(str(p), f"mask without an image (expected {images_dir.name}/{_SEG_SUFFIX.sub('', p.stem)}.jpg)")
                  for p in _pictures(masks_dir) if _SEG_SUFFIX.sub("", p.stem).lower() not in images]
    return found


register_source("isic", list_isic_cases, load_picture_case, detect_isic, isic_orphans, ISIC_LAYOUT)


# ---------------------------------------------------------------- the embedded synthetic data set
def list_synthetic_cases(root, data_cfg) -> list[Case]:
    """The 2D set in the ISIC layout, or (data.synthetic_kind=3d) the CT-like volumes in the Decathlon one."""
    if (Path(root) / "dataset.json").is_file():
        return list_msd_cases(root, data_cfg)
    return list_isic_cases(root, data_cfg)


def load_synthetic_case(case: Case, data_cfg) -> LoadedCase:
    return load_any_case(case, data_cfg)


register_source("synthetic", list_synthetic_cases, load_synthetic_case)


# ---------------------------------------------------------------- NIfTI volumes
def load_any_case(case: Case, data_cfg) -> LoadedCase:
    """A NIfTI volume (sliced, see volumes.py) or a 2D picture, by the image file's suffix."""
    from semiseg.data import volumes
    if not volumes.is_nifti(case.image):
        return load_picture_case(case, data_cfg)
    image, spacing, meta = volumes.load_volume(case.image, data_cfg, case.modality or "auto")
    label = None
    if case.label is not None:
        if not volumes.is_nifti(case.label):
            raise DataError(f"label {case.label} is not NIfTI but its image {case.image} is")
        label, label_meta = volumes.load_label_volume(case.label, data_cfg)
        if label_meta["shape"][:3] != meta["shape"][:3]:
            raise DataError(f"label {case.label} has shape {tuple(label_meta['shape'][:3])} but image "
                            f"{case.image} has shape {tuple(meta['shape'][:3])}")
        if label_meta["ornt"] != meta["ornt"]:
            raise DataError(f"label {case.label} and image {case.image} have different orientations "
                            f"(affines differ)")
    return LoadedCase(image, label, spacing, "mm", meta)


# ---------------------------------------------------------------- Medical Segmentation Decathlon
def _read_dataset_json(root: Path) -> dict:
    path = root / "dataset.json"
    try:
        with open(path) as fh:
            description = json.load(fh)
    except FileNotFoundError:
        raise DataError(f"{root}: no dataset.json (Decathlon layout: dataset.json, imagesTr/, labelsTr/, imagesTs/)") from None
    except (OSError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: not valid JSON ({err})") from None
    if not isinstance(description, dict) or not isinstance(description.get("training"), list):
        raise DataError(f"{path}: expected a 'training' list of {{image, label}} pairs")
    return description


def msd_modality(description: dict) -> Optional[str]:
    """'ct' or 'mri' from dataset.json's modality mapping ({"0": "CT"}, {"0": "T2", "1": "ADC"})."""
    names = [str(v).strip().lower() for v in (description.get("modality") or {}).values()]
    if not names:
        return None
    return "ct" if all(n in ("ct", "cect", "ncct") for n in names) else "mri"


def _msd_path(root: Path, entry, key: str, index: int) -> Path:
    if not isinstance(entry, str) or not entry:
        raise DataError(f"{root / 'dataset.json'}: {key}[{index}] is not a file path ({entry!r})")
    return (root / entry).resolve() if not os.path.isabs(entry) else Path(entry)


def list_msd_cases(root, data_cfg) -> list[Case]:
    """dataset.json's `training` pairs (imagesTr/labelsTr) and, when data.unlabeled_test_images,
    its `test` images (imagesTs) as unlabelled training cases."""
    from semiseg.data import volumes
    root = Path(root)
    description = _read_dataset_json(root)
    modality = msd_modality(description)
    cases = []
    for i, pair in enumerate(description["training"]):
        if not isinstance(pair, dict) or "image" not in pair or "label" not in pair:
            raise DataError(f"{root / 'dataset.json'}: training[{i}] must have 'image' and 'label', got {pair!r}")
        image = _msd_path(root, pair["image"], "training", i)
        label = _msd_path(root, pair["label"], "training", i)
        cases.append(Case(volumes.nifti_stem(image), str(image), str(label), kind="3d", modality=modality))
    if data_cfg.unlabeled_test_images:
        for i, entry in enumerate(description.get("test") or []):
            entry = entry.get("image") if isinstance(entry, dict) else entry
            image = _msd_path(root, entry, "test", i)
            cases.append(Case(volumes.nifti_stem(image), str(image), None, kind="3d", modality=modality))
    if not cases:
        raise DataError(f"{root / 'dataset.json'}: the training list is empty")
    return cases


def _niftis(folder: Path) -> list[Path]:
    # Decathlon archives made on macOS carry '._name' resource files: never volumes.
    return sorted(p for p in folder.iterdir() if p.name.lower().endswith((".nii", ".nii.gz"))
                  and not p.name.startswith(".")) if folder.is_dir() else []


def msd_orphans(root, data_cfg) -> list:
    root = Path(root)
    try:
        description = _read_dataset_json(root)
    except DataError:
        return []
    entries = [pair.get(k) for pair in description.get("training", []) if isinstance(pair, dict)
               for k in ("image", "label")]
    entries += [e.get("image") if isinstance(e, dict) else e for e in description.get("test") or []]
    listed = {str(_msd_path(root, e, "entry", 0)) for e in entries if isinstance(e, str) and e}
    found = []
    for folder, what in (("imagesTr", "image"), ("labelsTr", "label"), ("imagesTs", "image")):
        for path in _niftis(root / folder):
            if str(path.resolve()) not in listed:
                partner = "label" if what == "image" else "image"
                found.append((str(path), f"{what} not listed in dataset.json (no {partner}): ignored"))
    return found


def detect_msd(root: Path) -> bool:
    return (root / "dataset.json").is_file() and (root / "imagesTr").is_dir()


register_source("msd", list_msd_cases, load_any_case, detect_msd, msd_orphans,
                "  dataset.json + imagesTr/*.nii.gz + labelsTr/*.nii.gz (+ imagesTs/), the Decathlon layout")


# ---------------------------------------------------------------- PH2
def _ph2_case_dirs(root: Path) -> list[Path]:
    """IMDxxx folders at the root or one level down ('PH2 Dataset images/' in the release)."""
    dirs = [p for p in root.glob("IMD*") if p.is_dir()]
    if not dirs:
        dirs = [p for p in root.glob("*/IMD*") if p.is_dir()]
    return sorted(dirs, key=lambda p: p.name)


def _ph2_file(case_dir: Path, folder_suffix: str) -> Optional[Path]:
    folder = case_dir / f"{case_dir.name}{folder_suffix}"
    if not folder.is_dir():
        return None
    pictures = _pictures(folder)       # the release has exactly one picture per folder
    return pictures[0] if pictures else None


def list_ph2_cases(root, data_cfg) -> list[Case]:
    """PH2: IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp with IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp."""
    root = Path(root)
    cases = []
    for case_dir in _ph2_case_dirs(root):
        image = _ph2_file(case_dir, "_Dermoscopic_Image")
        if image is None:
            continue
        label = _ph2_file(case_dir, "_lesion")
        cases.append(Case(case_dir.name, str(image), str(label) if label else None))
    if not cases:
        raise DataError(f"{root}: no PH2 cases (expected IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp)")
    return cases


def ph2_orphans(root, data_cfg) -> list:
    return [(str(d), "lesion mask without a dermoscopic image") for d in _ph2_case_dirs(Path(root))
            if _ph2_file(d, "_Dermoscopic_Image") is None and _ph2_file(d, "_lesion") is not None]


def detect_ph2(root: Path) -> bool:
    return any((d / f"{d.name}_Dermoscopic_Image").is_dir() for d in _ph2_case_dirs(root)[:5])


register_source("ph2", list_ph2_cases, load_picture_case, detect_ph2, ph2_orphans,
                "  IMDxxx/IMDxxx_Dermoscopic_Image/IMDxxx.bmp + IMDxxx/IMDxxx_lesion/IMDxxx_lesion.bmp "
                "(at the root or in one subfolder)")


# ---------------------------------------------------------------- plain folders
FOLDER_SUBSETS = ("train", "val", "test")
_LABEL_SUFFIX = re.compile(r"_(segmentation|seg|mask|label)$", re.IGNORECASE)


def _folder_files(folder: Path) -> dict[str, Path]:
    """stem (lower case, label suffixes such as _mask dropped) -> path, for pictures and NIfTI."""
    from semiseg.data import volumes
    if not folder.is_dir():
        return {}
    files = [p for p in folder.iterdir() if not p.name.startswith(".")
             and (p.suffix.lower() in IMAGE_SUFFIXES or volumes.is_nifti(p))]
    return {_LABEL_SUFFIX.sub("", volumes.nifti_stem(p)).lower(): p for p in sorted(files)}


def _folder_subsets(root: Path) -> list:
    present = [s for s in FOLDER_SUBSETS if (root / "images" / s).is_dir()]
    return present or [None]          # no subfolders: images/*.png with labels/*.png


def list_folder_cases(root, data_cfg) -> list[Case]:
    """images/{train,val,test}/NAME with labels/{train,val,test}/NAME (same stem; NIfTI or pictures).
    The case id is NAME, or SUBSET/NAME for a name found in more than one subset. Case.subset is the folder; train cases are left to the random split when val/ or test/ is
    missing, so the missing split is cut from them."""
    from semiseg.data import volumes
    root = Path(root)
    if not (root / "images").is_dir():
        raise DataError(f"{root}: no images/ folder (folders layout: images/{{train,val,test}} and labels/...)")
    subsets = _folder_subsets(root)
    fixed_train = {"val", "test"} <= set(subsets)
    found = []
    for subset in subsets:
        image_dir = root / "images" / subset if subset else root / "images"
        label_dir = root / "labels" / subset if subset else root / "labels"
        labels = _folder_files(label_dir)
        found += [(subset, image, labels.get(key)) for key, image in _folder_files(image_dir).items()]
    # Data sets that number their files per split (images/train/img_000.png and images/val/img_000.png)
    # repeat names across subsets: those cases are told apart by their subset ("val/img_000").
    # Only repeated names are qualified, so the ids (cache keys, saved splits) of a layout without
    # repeats stay what they were.
    subsets_of: dict = {}
    for subset, image, _ in found:
        subsets_of.setdefault(volumes.nifti_stem(image), set()).add(subset)
    cases = []
    for subset, image, label in found:
        stem = volumes.nifti_stem(image)
        case_id = f"{subset}/{stem}" if len(subsets_of[stem]) > 1 else stem
        case_subset = subset if (subset != "train" or fixed_train) else None
        cases.append(Case(case_id, str(image), str(label) if label else None, subset=case_subset,
                          kind="3d" if volumes.is_nifti(image) else "2d"))
    if not cases:
        raise DataError(f"{root / 'images'}: no images found (pictures or .nii/.nii.gz)")
    return cases


def folder_orphans(root, data_cfg) -> list:
    root = Path(root)
    found = []
    for subset in _folder_subsets(root):
        image_dir = root / "images" / subset if subset else root / "images"
        label_dir = root / "labels" / subset if subset else root / "labels"
        images = _folder_files(image_dir)
        found += [(str(p), f"label without an image in {image_dir}") for k, p in _folder_files(label_dir).items()
                  if k not in images]
    return found


def detect_folders(root: Path) -> bool:
    return (root / "images").is_dir() and (root / "labels").is_dir()


register_source("folders", list_folder_cases, load_any_case, detect_folders, folder_orphans,
                "  images/{train,val,test}/NAME + labels/{train,val,test}/NAME (pictures or NIfTI; "
                "or images/ + labels/ without subfolders)")


# ---------------------------------------------------------------- ACDC (cardiac cine MRI)
ACDC_SUBSETS = (("training", None), ("testing", "test"))
_ACDC_PATIENT = re.compile(r"^patient\d+$")
_ACDC_FRAME = re.compile(r"^(patient\d+)_frame(\d+)$")
ACDC_LAYOUT = ("  training/patientNNN/patientNNN_frameMM.nii.gz + patientNNN_frameMM_gt.nii.gz (+ Info.cfg with ED/ES), "
               "testing/... the same (also under database/)")


def _acdc_base(root: Path) -> Path:
    """The folder holding training/ and testing/: the root, or root/database (the 2021+ download)."""
    if not any((root / sub).is_dir() for sub, _ in ACDC_SUBSETS) and (root / "database").is_dir():
        return root / "database"
    return root


def _acdc_patients(base: Path) -> list:
    return [(subset, p) for sub, subset in ACDC_SUBSETS if (base / sub).is_dir()
            for p in sorted((base / sub).iterdir()) if p.is_dir() and _ACDC_PATIENT.match(p.name)]


def read_acdc_info(path: Path) -> dict:
    """Info.cfg ('ED: 1', 'ES: 12', 'Group: DCM', ...) as a dict of strings; DataError naming the file."""
    info = {}
    try:
        lines = path.read_text().splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: unreadable ({err})") from None
    for line in lines:
        if ":" in line:
            key, value = line.split(":", 1)
            info[key.strip()] = value.strip()
    return info


def _acdc_frames(patient: Path) -> list:
    """The patient's end-diastole and end-systole frame numbers from Info.cfg, else every
    patientNNN_frameMM.nii.gz present (older copies without Info.cfg)."""
    from semiseg.data import volumes
    cfg = patient / "Info.cfg"
    if cfg.is_file():
        info = read_acdc_info(cfg)
        frames = []
        for key in ("ED", "ES"):
            try:
                frames.append(int(float(info[key])))
            except (KeyError, ValueError):
                raise DataError(f"{cfg}: needs '{key}: FRAME' (an integer frame number), got "
                                f"{info.get(key, 'nothing')!r}") from None
        return sorted(set(frames))
    return sorted(int(m.group(2)) for m in (_ACDC_FRAME.match(volumes.nifti_stem(p)) for p in _niftis(patient))
                  if m and m.group(1) == patient.name)


def _acdc_file(patient: Path, stem: str) -> Optional[Path]:
    for suffix in (".nii.gz", ".nii"):
        if (patient / f"{stem}{suffix}").is_file():
            return patient / f"{stem}{suffix}"
    return None


def list_acdc_cases(root, data_cfg) -> list[Case]:
    """ACDC: each patient's ED and ES frames (Info.cfg) are two cases, patientNNN_frameMM, of one
    group (the patient), so no split puts a patient's two frames on two sides. training/ cases are
    split by the fractions (or data.split_file); testing/ cases form the test split (an unlabelled
    testing frame, as in the 2017 release, is unlabelled training data when
    data.unlabeled_test_images, else left out). Cine MRI: scaled by percentiles like any MRI."""
    root = Path(root)
    base = _acdc_base(root)
    patients = _acdc_patients(base)
    if not patients:
        raise DataError(f"{root}: no ACDC patients (expected:\n{ACDC_LAYOUT})")
    cases = []
    for subset, patient in patients:
        for frame in _acdc_frames(patient):
            stem = f"{patient.name}_frame{frame:02d}"
            image = _acdc_file(patient, stem)
            if image is None:
                raise DataError(f"{patient / 'Info.cfg'}: frame {frame} is listed but {stem}.nii.gz is missing")
            label = _acdc_file(patient, f"{stem}_gt")
            case_subset = subset
            if label is None and subset == "test":
                if not data_cfg.unlabeled_test_images:
                    continue
                case_subset = None
            cases.append(Case(stem, str(image), str(label) if label else None, subset=case_subset, kind="3d",
                              modality="mri", group=patient.name))
    return cases


def acdc_orphans(root, data_cfg) -> list:
    """Ground truths without their frame, and frames with a ground truth that Info.cfg does not list."""
    from semiseg.data import volumes
    found = []
    for _, patient in _acdc_patients(_acdc_base(Path(root))):
        try:
            listed = set(_acdc_frames(patient))
        except DataError:
            listed = set()
        for path in _niftis(patient):
            stem = volumes.nifti_stem(path)
            if stem.endswith("_gt"):
                match = _ACDC_FRAME.match(stem[:-3])
                if _acdc_file(patient, stem[:-3]) is None:
                    found.append((str(path), "ground truth without its frame: ignored"))
                elif match and int(match.group(2)) not in listed:
                    found.append((str(path), f"frame {int(match.group(2))} is not ED or ES in Info.cfg: ignored"))
    return found


def detect_acdc(root: Path) -> bool:
    return bool(_acdc_patients(_acdc_base(root))[:1])


register_source("acdc", list_acdc_cases, load_any_case, detect_acdc, acdc_orphans, ACDC_LAYOUT)
