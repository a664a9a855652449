"""Tiny data sets in each supported layout, for the data tests (not a test file itself)."""
import json
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image


def write_nifti(path, data, affine=None, zooms=None, slope=None, inter=None):
    affine = np.diag([0.8, 0.9, 2.5, 1.0]) if affine is None else np.asarray(affine, float)
    img = nib.Nifti1Image(np.asarray(data), affine)
    img.header.set_data_dtype(np.asarray(data).dtype)
    if zooms is not None:
        img.header.set_zooms(zooms)
    if slope is not None:
        img.header.set_slope_inter(slope, inter or 0.0)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, str(path))
    return path


def lesion_picture(size=24, seed=0, rgb=True):
    """(image uint8 [H, W, 3] or [H, W], mask uint8 0/255) with a bright disc."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    cy, cx = rng.integers(size // 3, 2 * size // 3, 2)
    disc = (yy - cy) ** 2 + (xx - cx) ** 2 < (size // 5) ** 2
    grey = (rng.uniform(0, 60, (size, size)) + 150 * disc).astype(np.uint8)
    image = np.stack([grey] * 3, -1) if rgb else grey
    return image, (disc * 255).astype(np.uint8)


def make_isic(root, n=8, unlabeled=2, size=24):
    root = Path(root)
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for i in range(n + unlabeled):
        image, mask = lesion_picture(size, i)
        Image.fromarray(image).save(root / "images" / f"ISIC_{i:07d}.jpg", quality=95)
        if i < n:       # releases differ in case: _Segmentation.png and _segmentation.png
            suffix = "_Segmentation.png" if i % 2 else "_segmentation.png"
            Image.fromarray(mask).save(root / "masks" / f"ISIC_{i:07d}{suffix}")
    return root


def make_isic_release(root, release="ISIC 2016", counts=None, size=40):
    """An official ISIC download's folder names (sources.ISIC_RELEASES) with tiny generated pictures:
    JPEG images, PNG masks (2016: _Segmentation.png, later releases: _segmentation.png); 2017's data
    folders also get the release's _superpixels.png files. Returns (root, {subset: [case ids]})."""
    from semiseg.data.sources import ISIC_RELEASES
    counts = counts or {"train": 6, "val": 2, "test": 3}
    root, ids, k = Path(root), {}, 0
    for subset, images, masks in ISIC_RELEASES[release]:
        if subset not in counts:
            continue
        (root / images).mkdir(parents=True)
        (root / masks).mkdir(parents=True)
        suffix = "_Segmentation.png" if "2016" in release else "_segmentation.png"
        for _ in range(counts[subset]):
            name = f"ISIC_{k:07d}"
            image, mask = lesion_picture(size, k)
            Image.fromarray(image).save(root / images / f"{name}.jpg", quality=95)
            Image.fromarray(mask).save(root / masks / f"{name}{suffix}")
            if "2017" in release:
                Image.fromarray(image).save(root / images / f"{name}_superpixels.png")
            ids.setdefault(subset, []).append(name)
            k += 1
    return root, ids


def make_ph2(root, n=8, size=24):
    base = Path(root) / "PH2 Dataset images"
    for i in range(n):
        name = f"IMD{i:03d}"
        image, mask = lesion_picture(size, 100 + i)
        (base / name / f"{name}_Dermoscopic_Image").mkdir(parents=True)
        (base / name / f"{name}_lesion").mkdir()
        Image.fromarray(image).save(base / name / f"{name}_Dermoscopic_Image" / f"{name}.bmp")
        Image.fromarray(mask).save(base / name / f"{name}_lesion" / f"{name}_lesion.bmp")
    return Path(root)


def make_folders_png(root, counts=(("train", 6), ("val", 2), ("test", 2)), size=24):
    root = Path(root)
    for subset, n in counts:
        (root / "images" / subset).mkdir(parents=True)
        (root / "labels" / subset).mkdir(parents=True)
        for i in range(n):
            image, mask = lesion_picture(size, hash((subset, i)) % 1000, rgb=False)
            Image.fromarray(image).save(root / "images" / subset / f"{subset}{i}.png")
            Image.fromarray(mask).save(root / "labels" / subset / f"{subset}{i}.png")
    return root


def ct_case(shape=(16, 16, 6), seed=0):
    """(HU int16, labels uint8 0/1/2) with a block of organ (1) holding a lesion (2) in some slices."""
    rng = np.random.default_rng(seed)
    hu = rng.integers(-200, 200, shape).astype(np.int16)
    labels = np.zeros(shape, np.uint8)
    labels[4:10, 5:11, 2:4] = 1
    labels[6:8, 6:8, 3] = 2
    hu[labels > 0] = 100
    return hu, labels


def make_folders_nifti(root, counts=(("train", 4), ("val", 2), ("test", 2))):
    root = Path(root)
    for subset, n in counts:
        for i in range(n):
            hu, labels = ct_case(seed=i + 10 * len(subset))
            write_nifti(root / "images" / subset / f"{subset}{i}.nii.gz", hu)
            write_nifti(root / "labels" / subset / f"{subset}{i}.nii.gz", labels)
    return root


def make_msd(root, n=6, n_test=1, shape=(16, 16, 6), modality="CT"):
    """Decathlon layout with flipped affines (so reorientation matters)."""
    root = Path(root)
    training, test = [], []
    flips = ([1, 1, 1], [-1, -1, 1], [1, -1, -1])
    for i in range(n + n_test):
        hu, labels = ct_case(shape, i)
        affine = np.diag([0.8 * flips[i % 3][0], 0.8 * flips[i % 3][1], 2.5 * flips[i % 3][2], 1.0])
        name = f"pancreas_{i:03d}.nii.gz"
        if i < n:
            write_nifti(root / "imagesTr" / name, hu, affine)
            write_nifti(root / "labelsTr" / name, labels, affine)
            training.append({"image": f"./imagesTr/{name}", "label": f"./labelsTr/{name}"})
        else:
            write_nifti(root / "imagesTs" / name, hu, affine)
            test.append(f"./imagesTs/{name}")
    (root / "dataset.json").write_text(json.dumps({
        "name": "Tiny", "modality": {"0": modality}, "labels": {"0": "background", "1": "pancreas", "2": "cancer"},
        "numTraining": n, "numTest": n_test, "training": training, "test": test}))
    return root


def make_folders_numbered_per_split(root, counts=(("train", 6), ("val", 2), ("test", 2)), size=24, unique=("extra",)):
    """folders layout that numbers files per split (images/train/img_000.png next to
    images/val/img_000.png, as many public data sets do), plus train files with unique names."""
    root = Path(root)
    for subset, n in counts:
        (root / "images" / subset).mkdir(parents=True)
        (root / "labels" / subset).mkdir(parents=True)
        names = [f"img_{i:03d}" for i in range(n)] + ([f"{u}_{subset}" for u in unique] if subset == "train" else [])
        for i, name in enumerate(names):
            image, mask = lesion_picture(size, hash((subset, i)) % 1000, rgb=False)
            Image.fromarray(image).save(root / "images" / subset / f"{name}.png")
            Image.fromarray(mask).save(root / "labels" / subset / f"{name}_mask.png")
    return root


def acdc_frame(shape=(20, 24, 5), seed=0, systole=False):
    """(cine MRI float32, labels uint8: 1 RV, 2 MYO, 3 LV) of one frame: a bright LV disc in a
    myocardium ring, the RV beside it; the cavities shrink at end-systole."""
    rng = np.random.default_rng(seed)
    xx, yy = np.mgrid[:shape[0], :shape[1]]
    cx, cy = shape[0] / 2 + rng.uniform(-1, 1), shape[1] / 2 + 2 + rng.uniform(-1, 1)
    r_lv = (3.0 if systole else 4.5) + rng.uniform(-0.3, 0.3)
    dist = np.sqrt((xx - cx) ** 2 + (yy - cy) ** 2)
    rv = np.sqrt((xx - cx) ** 2 + (yy - (cy - r_lv - 5)) ** 2) < (2.5 if systole else 3.5)
    plane = np.zeros(shape[:2], np.uint8)
    plane[rv] = 1
    plane[(dist >= r_lv) & (dist < r_lv + 2)] = 2
    plane[dist < r_lv] = 3
    labels = np.zeros(shape, np.uint8)
    for z in range(1, shape[2] - 1):          # base and apex slices without heart, as in real stacks
        labels[..., z] = plane
    intensity = np.choose(labels, [80.0, 300.0, 120.0, 320.0])
    image = (intensity + rng.normal(0, 15, shape)).astype(np.float32)
    return image, labels


def make_acdc(root, patients=(1, 2, 3, 4, 5, 6), testing=(), shape=(20, 24, 5), testing_labels=True):
    """ACDC layout: training/patientNNN/{Info.cfg, patientNNN_frameMM.nii.gz, ..._gt.nii.gz} for the
    ED and ES frames (ED frame 1, ES frame 8 + NNN % 5), testing/ the same; real affines (flipped
    axes, scanner origin, 1.5625 x 1.5625 x 10 mm) as the release's short-axis stacks."""
    root = Path(root)
    for subset, numbers in (("training", patients), ("testing", testing)):
        for number in numbers:
            name = f"patient{number:03d}"
            folder = root / subset / name
            folder.mkdir(parents=True)
            ed, es = 1, 8 + number % 5
            (folder / "Info.cfg").write_text(f"ED: {ed}\nES: {es}\nGroup: NOR\nHeight: 180.0\nNbFrame: 20\n"
                                             f"Weight: 75.0\n")
            affine = np.array([[-1.5625, 0, 0, 180.0], [0, -1.5625, 0, 150.0], [0, 0, 10.0, -40.0], [0, 0, 0, 1]])
            for frame in (ed, es):
                image, labels = acdc_frame(shape, seed=number * 100 + frame, systole=frame == es)
                write_nifti(folder / f"{name}_frame{frame:02d}.nii.gz", image, affine)
                if subset == "training" or testing_labels:
                    write_nifti(folder / f"{name}_frame{frame:02d}_gt.nii.gz", labels, affine)
            write_nifti(folder / f"{name}_4d.nii.gz", np.zeros(shape + (2,), np.float32), affine)
    return root
