"""NIfTI volumes <-> normalised 2D slices, and predicted slices back to a NIfTI mask.

    python -m semiseg.data.volumes scan.nii.gz                 # print shape, spacing and orientation as read

API (NumPy and nibabel only; runs in preprocessing worker processes):
  load_volume(path, data_cfg, modality="auto") -> (image [S, H, W, C] float32 in [0, 1],
                                                    spacing (row, col, slice) mm, meta)
      scl_slope/scl_inter applied (get_fdata), reoriented to the closest canonical RAS+ axes,
      sliced along data_cfg.slice_axis (2 = axial), CT clipped to data_cfg.ct_window and scaled,
      MRI scaled between its 0.5 and 99.5 percentiles (per volume and channel); 4D keeps channels.
  load_label_volume(path, data_cfg) -> (label [S, H, W] uint8 class indices, meta)
      one class (data.classes): labels listed in data_cfg.label_set merge into one foreground {0, 1};
      K classes: label_set[i] becomes class i + 1 (0..K); all other values are background.
  restore_orientation(mask_slices [S, H, W], meta) -> array in the file's own voxel order/shape
      (mask_slices at the original in-plane size H, W, i.e. resized back from image_size first).
  mask_to_nifti(mask_slices, meta) -> nib.Nifti1Image  /  save_mask_nifti(mask_slices, meta, out_path)
      a uint8 mask with the input's affine, header (qform/sform, units) and 3D shape.
`meta` is a JSON-serialisable dict (it is stored in the slice cache's manifest): path, shape (the
file's), affine, ornt (file axes -> RAS+, nibabel's io_orientation), slice_axis, slice_shape
[S, H, W], channels, modality and the intensity range used.
Axes after slicing: slices run along RAS axis `slice_axis`; rows and columns are the two other RAS
axes in increasing order (axial: rows follow x towards R, columns follow y towards A), unrotated so
that the inverse is exact.
"""
from __future__ import annotations

import sys

import numpy as np

from semiseg.errors import DataError

CT_NAMES = {"ct", "cect", "ncct"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path) -> str:
    """File name without .nii/.nii.gz (or the last suffix for other files)."""
    name = str(path).replace("\\", "/").rsplit("/", 1)[-1]
    for suffix in (".nii.gz", ".nii"):
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name.rsplit(".", 1)[0] if "." in name else name


def open_nifti(path):
    """nib image with its header read; a DataError naming the file when it is not a NIfTI file."""
    import nibabel as nib
    try:
        return nib.load(str(path))
    except FileNotFoundError:
        raise DataError(f"{path}: file not found") from None
    except Exception as err:      # nibabel raises many types (ImageFileError, EOFError, zlib.error)
        raise DataError(f"{path}: unreadable NIfTI file ({type(err).__name__}: {err})") from None


def read_voxels(img, path) -> np.ndarray:
    """All voxels as float32 with the scaling slope/intercept applied; truncated files raise DataError."""
    try:
        return np.asarray(img.get_fdata(dtype=np.float32))
    except Exception as err:      # a truncated .nii.gz fails here, after a good header
        raise DataError(f"{path}: unreadable or truncated voxel data ({type(err).__name__}: {err})") from None


def _canonical(path):
    """(canonical RAS+ image, meta of the original) for a NIfTI file."""
    import nibabel as nib
    img = open_nifti(path)
    if len(img.shape) < 3:
        raise DataError(f"{path}: expected a 3D or 4D volume, got shape {tuple(img.shape)}")
    ornt = nib.orientations.io_orientation(img.affine)
    canonical = nib.as_closest_canonical(img)
    meta = {"path": str(path), "shape": [int(n) for n in img.shape],
            "affine": np.asarray(img.affine, dtype=float).tolist(), "ornt": ornt.tolist()}
    return canonical, meta


def _to_slices(volume: np.ndarray, slice_axis: int) -> np.ndarray:
    """[X, Y, Z, ...] (RAS+) -> [S, H, W, ...] with slices along `slice_axis`."""
    if slice_axis not in (0, 1, 2):
        raise DataError(f"data.slice_axis must be 0, 1 or 2, got {slice_axis}")
    return np.moveaxis(volume, slice_axis, 0)


def _spacing(canonical, slice_axis: int) -> tuple:
    zooms = [float(z) for z in canonical.header.get_zooms()[:3]]
    in_plane = [zooms[a] for a in range(3) if a != slice_axis]
    return (in_plane[0], in_plane[1], zooms[slice_axis])


def guess_modality(voxels: np.ndarray) -> str:
    """'ct' when values look like Hounsfield units (air near -1000), else 'mri'."""
    finite = voxels[np.isfinite(voxels)]
    return "ct" if finite.size and float(finite.min()) <= -500.0 else "mri"


def normalise(voxels: np.ndarray, modality: str, ct_window) -> tuple[np.ndarray, list]:
    """Scale to [0, 1]: CT by a fixed HU window, MRI by per-channel 0.5/99.5 percentiles
    (MRI intensities have no physical unit, so only the volume's own distribution can scale them)."""
    voxels = np.nan_to_num(voxels, nan=0.0, posinf=0.0, neginf=0.0)
    if modality == "ct":
        lo, hi = float(ct_window[0]), float(ct_window[1])
        if hi <= lo:
            raise DataError(f"data.ct_window must be [low, high] with low < high, got {list(ct_window)}")
        return np.clip((voxels - lo) / (hi - lo), 0.0, 1.0).astype(np.float32), [[lo, hi]]
    out = np.empty_like(voxels, dtype=np.float32)
    ranges = []
    for ch in range(voxels.shape[-1]):
        plane = voxels[..., ch]
        lo, hi = (float(v) for v in np.percentile(plane, [0.5, 99.5]))
        scale = hi - lo if hi > lo else 1.0
        out[..., ch] = np.clip((plane - lo) / scale, 0.0, 1.0)
        ranges.append([lo, hi])
    return out, ranges


def load_volume(path, data_cfg, modality: str = "auto"):
    """(image [S, H, W, C] float32 in [0, 1], spacing (row, col, slice) mm, meta); see module doc."""
    canonical, meta = _canonical(path)
    voxels = read_voxels(canonical, path)
    if voxels.ndim == 3:
        voxels = voxels[..., None]
    elif voxels.ndim != 4:
        raise DataError(f"{path}: expected a 3D or 4D volume, got shape {voxels.shape}")
    modality = (modality or "auto").lower()
    if modality == "auto":
        modality = (data_cfg.modality or "auto").lower()
    if modality == "auto":
        modality = guess_modality(voxels)
    modality = "ct" if modality in CT_NAMES else "mri"
    image, ranges = normalise(voxels, modality, data_cfg.ct_window)
    image = np.ascontiguousarray(_to_slices(image, data_cfg.slice_axis))
    meta.update({"slice_axis": int(data_cfg.slice_axis), "slice_shape": [int(n) for n in image.shape[:3]],
                 "channels": int(image.shape[-1]), "modality": modality, "intensity_range": ranges})
    return image, _spacing(canonical, data_cfg.slice_axis), meta


def merge_labels(values: np.ndarray, label_set) -> np.ndarray:
    """uint8 {0, 1}: 1 where the (rounded) label is in `label_set` (e.g. pancreas 1 + tumour 2)."""
    return np.isin(np.rint(values).astype(np.int64), [int(v) for v in label_set]).astype(np.uint8)


def map_labels(values: np.ndarray, label_set) -> np.ndarray:
    """uint8 class indices 0..K: label_set[i] -> i + 1, every other (rounded) value -> 0 (background).
    Kept apart, e.g. pancreas 1 -> class 1 and tumour 2 -> class 2, or ACDC's RV/MYO/LV 1/2/3."""
    values = np.rint(values).astype(np.int64)
    out = np.zeros(values.shape, np.uint8)
    for index, label in enumerate(label_set, start=1):
        out[values == int(label)] = index
    return out


def class_map(values: np.ndarray, data_cfg) -> np.ndarray:
    """The label map of a DataConfig: merged {0, 1} with one class (data.classes), else 0..K."""
    if len(data_cfg.classes) >= 2:
        return map_labels(values, data_cfg.label_set)
    return merge_labels(values, data_cfg.label_set)


def load_label_volume(path, data_cfg):
    """(label [S, H, W] uint8 class indices (`class_map`), meta): reoriented and sliced like `load_volume`."""
    canonical, meta = _canonical(path)
    values = read_voxels(canonical, path)
    if values.ndim == 4 and values.shape[-1] == 1:
        values = values[..., 0]
    if values.ndim != 3:
        raise DataError(f"{path}: a label volume must be 3D, got shape {values.shape}")
    label = np.ascontiguousarray(_to_slices(class_map(values, data_cfg), data_cfg.slice_axis))
    meta.update({"slice_axis": int(data_cfg.slice_axis), "slice_shape": [int(n) for n in label.shape]})
    return label, meta


def restore_orientation(mask_slices: np.ndarray, meta: dict) -> np.ndarray:
    """[S, H, W] slices (original in-plane size) -> the input file's voxel order and 3D shape."""
    import nibabel as nib
    mask_slices = np.asarray(mask_slices)
    expected = tuple(meta["slice_shape"][:3])
    if mask_slices.shape != expected:
        raise DataError(f"{meta.get('path', 'volume')}: mask slices have shape {mask_slices.shape}, "
                        f"expected {expected} (resize predictions back to the original in-plane size first)")
    canonical = np.moveaxis(mask_slices, 0, int(meta["slice_axis"]))
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    # The file was turned into RAS+ by `ornt`; going from RAS+ back to the file's axes inverts it.
    back = nib.orientations.ornt_transform(ras, np.asarray(meta["ornt"], dtype=float))
    voxels = nib.orientations.apply_orientation(canonical, back)
    if list(voxels.shape) != list(meta["shape"][:3]):
        raise DataError(f"{meta.get('path', 'volume')}: restored shape {voxels.shape} differs from the "
                        f"file's {meta['shape'][:3]}")
    return np.ascontiguousarray(voxels)


def mask_to_nifti(mask_slices: np.ndarray, meta: dict):
    """A uint8 NIfTI mask aligned with the input: its affine, and its header when the file is readable."""
    import nibabel as nib
    data = restore_orientation(mask_slices, meta).astype(np.uint8)
    affine = np.asarray(meta["affine"], dtype=float)
    header = None
    try:
        header = nib.load(meta["path"]).header.copy()
    except Exception:             # the input moved: the affine alone still places the mask right
        header = None
    img = nib.Nifti1Image(data, affine, header=header)
    img.header.set_data_dtype(np.uint8)
    img.header.set_slope_inter(1.0, 0.0)    # a mask stores labels, never scaled intensities
    if header is not None:
        img.set_qform(affine, code=int(header["qform_code"]) or 1)
        img.set_sform(affine, code=int(header["sform_code"]) or 1)
    return img


def save_mask_nifti(mask_slices: np.ndarray, meta: dict, out_path) -> None:
    import nibabel as nib

    from semiseg.runs import atomic_write
    img = mask_to_nifti(mask_slices, meta)
    atomic_write.write_with(out_path, lambda tmp: nib.save(img, str(tmp)))


def main(argv=None) -> int:
    import json

    from semiseg import config
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        print("usage: python -m semiseg.data.volumes VOLUME.nii[.gz]", file=sys.stderr)
        return 2
    try:
        image, spacing, meta = load_volume(args[0], config.DataConfig())
    except DataError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(json.dumps({"slices": list(image.shape), "spacing_mm": spacing, **meta}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
