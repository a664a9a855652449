"""Prediction: a trained run applied to pictures and NIfTI volumes outside its own splits.

    python main.py predict runs/sup photo.png photo_mask.png [--tta] [--threshold 0.5]
    python main.py predict runs/sup photos/ masks/                       # a folder of images
    python main.py predict runs/sup scan.nii.gz scan_mask.nii.gz --save-probabilities
    python main.py predict runs/mira lesion.png lesion_mask.png --uncertainty   # + lesion_mask_uncertainty.npy

    from semiseg.evaluation.predict import Predictor                                       # in a notebook
    p = Predictor("runs/sup", tta=True)
    prob = p.predict(image)              # [H,W] / [H,W,C] (uint8 or float in [0,1]) or a batch [B,H,W,C]
    mask, affine = p.predict_volume("scan.nii.gz")

Inputs are normalised as training normalised them (pictures by `data_sources.read_picture` with the
model's channel count, volumes by `volumes.load_volume` with the run's data config), resized to
the run's image_size by the slice cache's own resize, predicted, and the *probabilities* resized
back to the input's size before thresholding (thresholding at image_size first would give a
blocky mask). A volume's slices are stacked and turned back into the file's voxel order, so the
mask has the input's affine, header and shape.
Multi-class runs (data.classes with K >= 2 names) write integer label maps instead: NIfTI uint8
class indices with the input's affine; pictures as palette PNGs whose pixel values are the class
indices (0 black, 1 red, 2 green, 3 blue, ...: LABEL_PALETTE); `--save-probabilities` writes the
softmax probabilities per class ([H,W,C] .npy; a 4D NIfTI [X,Y,Z,C]); TTA averages the softmax
probabilities of the flipped views; --threshold does not apply.
The run's network comes from semiseg.runs.load (no training code); `external_bundle` (another
labelled data set as the split 'external') serves `main.py evaluate` as well.
"""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from semiseg.data.sources import IMAGE_SUFFIXES, DataError, read_picture
from semiseg.runs import atomic_write
from semiseg.runs.load import load_keras_model, load_run_model, model_channels
from semiseg.runs.run_dir import TEACHER_BEST_FILE, RunDirError

NIFTI_SUFFIXES = (".nii", ".nii.gz")
MASK_SUFFIXES = (".png", ".bmp", ".tif", ".tiff")    # lossless: a JPEG would smear 0/255 masks


class OutputError(DataError):
    """OUTPUT cannot be written as asked (it exists, or its suffix does not fit the input)."""


def is_nifti(path) -> bool:
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def _stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.lower().endswith(".nii.gz") else path.stem


def external_bundle(cfg, data_path: str, fmt: str | None, channels: int, log=print, progress: bool = True):
    """A DataBundle of another data set (e.g. PH2 for an ISIC model): every labelled case forms
    the split 'external', sliced and resized with the run's settings and the model's channels."""
    import copy

    from semiseg.data import cache as slice_cache
    from semiseg.data import loader as data_loader_tf2
    from semiseg.data import sources as data_sources
    from semiseg.data import splits as data_splits
    ext = copy.deepcopy(cfg)
    ext.data.path, ext.data.format, ext.data.channels = str(data_path), fmt or "auto", int(channels)
    found, root, cases = data_sources.resolve_source(ext.data, log)
    labelled = sorted(c.case_id for c in cases if c.label is not None)
    if not labelled:
        raise DataError(f"{root}: no case with a label, nothing to evaluate")
    if len(labelled) < len(cases):
        log(f"{root}: {len(cases) - len(labelled)} cases without labels are left out")
    cache_dir = slice_cache.build_cache(found, cases, ext.data, log=log, progress=progress)
    manifest = slice_cache.load_manifest(cache_dir)
    splits = {"seed": cfg.seed, "external": labelled, **{s: [] for s in data_splits.SPLITS}}
    return data_loader_tf2.DataBundle(cache_dir, manifest, splits, ext.data, cfg.seed, found)


def external_name(data_path: str) -> str:
    """eval/ folder name for an external data set: 'external_' + its folder name, made safe."""
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", Path(str(data_path).rstrip("/\\")).name) or "data"
    return f"external_{name}"


# ------------------------------------------------------------------ arrays in and out
def as_float_images(array, channels: int):
    """(images [B,H,W,channels] float32 in [0,1], batched?) from [H,W], [H,W,C] or [B,H,W,C].

    uint8 is divided by 255, other integers by their maximum (as 16-bit pictures are read); floats
    must already lie in [0,1]. RGB(A) becomes grey by ITU-R 601 luma, PIL's "L" conversion that
    `read_picture` applies; grey is repeated for an RGB model."""
    arr = np.asarray(array)
    if arr.ndim == 2:
        arr, batched = arr[None, ..., None], False
    elif arr.ndim == 3:
        if arr.shape[-1] not in (1, 3, 4):
            raise ValueError(f"a 3D array is read as one image [H, W, C] with C in 1, 3, 4; got shape {arr.shape} "
                             f"(pass a batch of grey images as [B, H, W, 1])")
        arr, batched = arr[None], False
    elif arr.ndim == 4:
        batched = True
    else:
        raise ValueError(f"expected [H, W], [H, W, C] or [B, H, W, C], got shape {arr.shape}")
    if arr.dtype == np.uint8:
        images = arr.astype(np.float32) / 255.0
    elif arr.dtype == np.bool_:
        images = arr.astype(np.float32)
    elif np.issubdtype(arr.dtype, np.integer):
        images = arr.astype(np.float32) / max(float(arr.max()), 1.0)
    else:
        images = arr.astype(np.float32)
        lo, hi = float(np.nanmin(images)), float(np.nanmax(images))
        if lo < -1e-3 or hi > 1.0 + 1e-3 or not np.isfinite(images).all():
            raise ValueError(f"float images must lie in [0, 1] (as training saw them), got values in [{lo:.4g}, {hi:.4g}]")
        images = np.clip(images, 0.0, 1.0)
    if images.shape[-1] == 4:
        images = images[..., :3]                         # alpha carries no image content
    if images.shape[-1] == 3 and channels == 1:
        # PIL's "L": L = R*299/1000 + G*587/1000 + B*114/1000
        images = (images @ np.array([0.299, 0.587, 0.114], np.float32))[..., None]
    elif images.shape[-1] == 1 and channels == 3:
        images = np.repeat(images, 3, axis=-1)
    if images.shape[-1] != channels:
        raise ValueError(f"images have {images.shape[-1]} channels, the model takes {channels}")
    return images, batched


def resize_probabilities(prob: np.ndarray, height: int, width: int) -> np.ndarray:
    """[S, h, w] -> [S, height, width] by bilinear interpolation (the inverse of the input resize);
    class probabilities [S, h, w, C] channel by channel (each stays in [0, 1]; the argmax is taken
    after resizing, as the binary threshold is)."""
    from PIL import Image
    if prob.shape[1:3] == (height, width):
        return prob.astype(np.float32)
    if prob.ndim == 4:
        return np.stack([resize_probabilities(prob[..., c], height, width) for c in range(prob.shape[-1])], axis=-1)
    return np.stack([np.asarray(Image.fromarray(p.astype(np.float32), mode="F").resize((width, height), Image.BILINEAR))
                     for p in prob]).clip(0.0, 1.0)


class Predictor:
    """A run's exported network, ready to segment arrays, picture files and NIfTI volumes."""

    def __init__(self, run_dir, tta: bool = False, checkpoint: str = "best", threshold: float = 0.5,
                 batch_size: int = 0, uncertainty: bool = False):
        from semiseg.evaluation import evaluate as evaluation
        self.run_dir = Path(run_dir)
        self.cfg, self.model, self.network = load_run_model(self.run_dir, checkpoint)
        self.image_size = int(self.cfg.data.image_size)
        self.channels = model_channels(self.model)
        self.tta, self.threshold = tta, float(threshold)
        self.batch_size = int(batch_size or self.cfg.train.eval_batch_size)
        self._predict = evaluation.make_predict_fn(self.model, tta)      # traced once, reused
        # Multi-class runs (data.classes with K >= 2 names): softmax probabilities [.., C], argmax labels.
        self.classes = list(getattr(self.cfg.data, "classes", ["foreground"]))
        self.multiclass = len(self.classes) >= 2
        # uncertainty=True loads the MIRA-U teacher now, so a run without one fails before any output
        self._uncertainty = _teacher_uncertainty_fn(self.run_dir, self.cfg) if uncertainty else None

    def _map_slices(self, fn, images: np.ndarray, progress=None) -> np.ndarray:
        """fn([b, size, size, C]) -> [b, size, size] (or [b, size, size, classes]) maps, batched over
        [S,H,W,C] and resized back."""
        import tensorflow as tf
        from semiseg.data.cache import resize_slices
        s, h, w, _ = images.shape
        out = None
        for start in range(0, s, self.batch_size):
            chunk = images[start:start + self.batch_size]
            small, _ = resize_slices(chunk, None, self.image_size)
            maps = resize_probabilities(fn(tf.constant(small, tf.float32)).numpy(), h, w)
            if out is None:
                out = np.empty((s,) + maps.shape[1:], np.float32)
            out[start:start + len(chunk)] = maps
            if progress is not None:
                progress.update(len(chunk))
        return out

    def predict_slices(self, images: np.ndarray, progress=None) -> np.ndarray:
        """[S,H,W,C] float32 in [0,1] -> probabilities [S,H,W] at the same H, W (multi-class: class
        probabilities [S,H,W,classes])."""
        return self._map_slices(self._predict, images, progress)

    def labels(self, prob: np.ndarray) -> np.ndarray:
        """uint8 label map from `predict_slices` probabilities: 0/1 at the threshold (binary), the
        argmax class index 0..K (multi-class; the threshold does not apply)."""
        if self.multiclass:
            return prob.argmax(-1).astype(np.uint8)
        return (prob >= self.threshold).astype(np.uint8)

    def uncertainty_slices(self, images: np.ndarray) -> np.ndarray:
        """[S,H,W,C] -> MIRA-U's per-pixel uncertainty [S,H,W]: the standard deviation of the
        teacher's foreground probability over mira_u.mc_samples MC-dropout passes (the sigma that
        weights its pseudo labels in training), from RUN/teacher_best.keras; a fixed MC seed, so
        the same input gives the same map. Other methods have no such teacher: RunDirError."""
        if self._uncertainty is None:
            self._uncertainty = _teacher_uncertainty_fn(self.run_dir, self.cfg)
        return self._map_slices(self._uncertainty, images)

    def predict(self, array) -> np.ndarray:
        """Foreground probabilities at the input's size: [H,W] for one image, [B,H,W] for a batch
        (multi-class: class probabilities [H,W,classes] / [B,H,W,classes]; `labels` makes the map)."""
        images, batched = as_float_images(array, self.channels)
        prob = self.predict_slices(images)
        return prob if batched else prob[0]

    def predict_file(self, path) -> np.ndarray:
        """Probabilities [H,W] of a picture file, read as training read pictures."""
        if is_nifti(path):
            raise DataError(f"{path}: a NIfTI volume; use predict_volume")
        return self.predict_slices(read_picture(path, self.channels)[None])[0]

    def uncertainty_file(self, path) -> np.ndarray:
        """Uncertainty [H,W] of a picture file (see uncertainty_slices)."""
        return self.uncertainty_slices(read_picture(path, self.channels)[None])[0]

    def read_volume(self, path):
        """(slices [S,H,W,C] normalised as training normalised them, meta of volumes.load_volume)."""
        from semiseg.data import volumes
        image, _spacing, meta = volumes.load_volume(path, self.cfg.data)
        if image.shape[-1] != self.channels:
            raise DataError(f"{path}: {image.shape[-1]} channel(s), but the model of {self.run_dir} takes {self.channels}")
        return image, meta

    def volume_probabilities(self, path, progress: bool = False, volume=None):
        """(probabilities [S,H,W] in slice order at the original in-plane size, meta of volumes.load_volume);
        `volume`: read_volume's result when the caller has read the file already."""
        from semiseg.progress import progress_bar
        image, meta = volume or self.read_volume(path)
        with progress_bar(total=len(image), desc=Path(path).name, unit="slice", enabled=progress, leave=False) as bar:
            prob = self.predict_slices(image, bar)
        return prob, meta

    def predict_volume(self, path, progress: bool = False):
        """(uint8 mask in the file's voxel order and shape, the file's affine [4,4]); multi-class: the
        label map of class indices."""
        from semiseg.data import volumes
        prob, meta = self.volume_probabilities(path, progress)
        mask = volumes.restore_orientation(self.labels(prob), meta)
        return mask, np.asarray(meta["affine"], dtype=float)


def _teacher_uncertainty_fn(run: Path, cfg):
    """A traced images -> sigma [b, size, size] function of a MIRA-U run's best-epoch teacher."""
    import tensorflow as tf
    from semiseg.models.transformer import mc_dropout_stats
    path = run / TEACHER_BEST_FILE
    if not path.exists():
        why = ("only MIRA-U runs have an MC-dropout teacher" if cfg.method != "mira_u"
               else "the run has not finished an epoch of stage 2 yet")
        raise RunDirError(f"--uncertainty: {path} does not exist ({cfg.method} run; {why})")
    teacher = load_keras_model(path)
    m = cfg.mira_u

    @tf.function(reduce_retracing=True)
    def sigma(images):
        mean, std = mc_dropout_stats(teacher, images, m.mc_samples, m.mc_chunk or None, seed=[cfg.seed, 7])
        if std.shape[-1] > 1:       # multi-class: the std of the predicted class's probability (as training weighs it)
            return tf.reduce_sum(std * tf.one_hot(tf.argmax(mean, axis=-1), std.shape[-1]), axis=-1)
        return std[..., 0]
    return sigma


# ------------------------------------------------------------------ files: what to write where
def list_inputs(path: Path) -> list[Path]:
    """The pictures and NIfTI volumes of a file or folder (not recursive, hidden files skipped)."""
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.is_file():
        if not (is_nifti(path) or path.suffix.lower() in IMAGE_SUFFIXES):
            raise DataError(f"{path}: not a picture ({', '.join(IMAGE_SUFFIXES)}) or NIfTI volume (.nii, .nii.gz)")
        return [path]
    found = sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith(".")
                   and (is_nifti(p) or p.suffix.lower() in IMAGE_SUFFIXES))
    if not found:
        raise DataError(f"{path}: no pictures ({', '.join(IMAGE_SUFFIXES)}) or NIfTI volumes found")
    return found


def plan_outputs(inputs: list[Path], output: Path, single: bool, save_probabilities: bool,
                 save_uncertainty: bool = False):
    """[(input, mask path, probability path or None, uncertainty path or None)]; refuses before
    anything is written when any target exists (an existing OUTPUT is used only as a folder to
    write new files into)."""
    if single and not output.is_dir():
        src = inputs[0]
        wanted = NIFTI_SUFFIXES if is_nifti(src) else MASK_SUFFIXES
        if not str(output).lower().endswith(wanted):
            raise OutputError(f"OUTPUT {output}: for {src.name} it must end with {' or '.join(wanted)} "
                              f"(or be an existing folder)")
        if output.exists():
            raise OutputError(f"OUTPUT {output} already exists; nothing was overwritten")
        mask_paths = [output]
    else:
        if output.exists() and not output.is_dir():
            raise OutputError(f"OUTPUT {output} is an existing file; a folder is needed for {len(inputs)} inputs")
        mask_paths = [output / (_stem(p) + (".nii.gz" if p.name.lower().endswith(".nii.gz") else ".nii")
                                if is_nifti(p) else _stem(p) + ".png") for p in inputs]
    plan = []
    for src, mask in zip(inputs, mask_paths):
        suffix = ".nii.gz" if is_nifti(src) else ".npy"
        prob = mask.with_name(_stem(mask) + "_prob" + suffix) if save_probabilities else None
        sigma = mask.with_name(_stem(mask) + "_uncertainty" + suffix) if save_uncertainty else None
        plan.append((src, mask, prob, sigma))
    targets = [p for _, *paths in plan for p in paths if p is not None]
    if len(set(targets)) != len(targets):
        raise OutputError(f"two inputs would write the same file in {output} (same name, different suffix)")
    clash = [str(p) for p in targets if p.exists()]
    if clash:
        raise OutputError(f"{len(clash)} output file(s) already exist, e.g. {clash[0]}; nothing was overwritten")
    return plan


# Multi-class picture masks: palette ("P") images whose pixel values are the class indices, shown in
# these colours: 0 background black, then red, green, blue, yellow, magenta, cyan, orange, purple,
# ... (index i > 9 repeats i % 9 + 1). Read back with PIL, np.asarray(Image.open(path)) gives the indices.
LABEL_PALETTE = [(0, 0, 0), (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (255, 0, 255),
                 (0, 255, 255), (255, 128, 0), (128, 0, 255), (128, 128, 128)]


def palette_bytes() -> list[int]:
    """The 256-entry RGB palette of multi-class picture masks (LABEL_PALETTE, then repeated)."""
    colours = [LABEL_PALETTE[0]] + [LABEL_PALETTE[(i - 1) % (len(LABEL_PALETTE) - 1) + 1] for i in range(1, 256)]
    return [c for rgb in colours for c in rgb]


def write_mask_picture(mask: np.ndarray, path: Path, multiclass: bool = False) -> None:
    """Binary: 0/255 grey. Multi-class: the class indices in a palette image (LABEL_PALETTE); BMP and
    TIFF keep the palette too."""
    from PIL import Image
    fmt = {".png": "PNG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF"}[path.suffix.lower()]
    if multiclass:
        picture = Image.fromarray(np.asarray(mask, np.uint8), mode="P")
        picture.putpalette(palette_bytes())
    else:
        picture = Image.fromarray((mask > 0).astype(np.uint8) * 255, mode="L")
    atomic_write.write_with(path, lambda tmp: picture.save(tmp, format=fmt))


def _save_npy(path: Path, prob: np.ndarray) -> None:
    with open(path, "wb") as fh:                 # a file object: np.save would append .npy to a name
        np.save(fh, prob.astype(np.float32))


def _probability_nifti(prob_slices: np.ndarray, meta: dict):
    """float32 maps (probabilities, uncertainty) in the file's voxel order, with the input's affine and header."""
    import nibabel as nib
    from semiseg.data import volumes
    if prob_slices.ndim == 4:       # class probabilities [S,H,W,C] -> a 4D image [X,Y,Z,C], class last
        data = np.stack([volumes.restore_orientation(prob_slices[..., c].astype(np.float32), meta)
                         for c in range(prob_slices.shape[-1])], axis=-1)
    else:
        data = volumes.restore_orientation(prob_slices.astype(np.float32), meta)
    affine = np.asarray(meta["affine"], dtype=float)
    header = nib.load(meta["path"]).header.copy()
    img = nib.Nifti1Image(data, affine, header=header)
    img.header.set_data_dtype(np.float32)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_qform(affine, code=int(header["qform_code"]) or 1)
    img.set_sform(affine, code=int(header["sform_code"]) or 1)
    return img


def run_prediction(run_dir, input_path, output_path, tta: bool = False, threshold: float = 0.5,
                   save_probabilities: bool = False, checkpoint: str = "best", progress: bool = True,
                   log=print, save_uncertainty: bool = False) -> list[Path]:
    """`main.py predict`: segment every input and write its mask; returns the files written."""
    import nibabel as nib
    from semiseg.progress import progress_bar
    if not 0.0 < threshold < 1.0:
        raise DataError(f"--threshold must be in (0, 1), got {threshold}")
    source, output = Path(input_path), Path(output_path)
    inputs = list_inputs(source)
    plan = plan_outputs(inputs, output, source.is_file(), save_probabilities, save_uncertainty)
    predictor = Predictor(run_dir, tta=tta, checkpoint=checkpoint, threshold=threshold, uncertainty=save_uncertainty)
    (output if not source.is_file() else output.parent).mkdir(parents=True, exist_ok=True)
    written = []
    bar = progress_bar(plan, desc="predict", unit="file", enabled=progress and len(plan) > 1)
    for src, mask_path, prob_path, sigma_path in bar:
        if is_nifti(src):
            from semiseg.data import volumes
            volume = predictor.read_volume(src)          # read once for probabilities and uncertainty
            prob, meta = predictor.volume_probabilities(src, progress, volume)
            mask_img = volumes.mask_to_nifti(predictor.labels(prob), meta)
            atomic_write.write_with(mask_path, lambda tmp: nib.save(mask_img, str(tmp)))
            if prob_path is not None:
                prob_img = _probability_nifti(prob, meta)
                atomic_write.write_with(prob_path, lambda tmp: nib.save(prob_img, str(tmp)))
            if sigma_path is not None:
                sigma_img = _probability_nifti(predictor.uncertainty_slices(volume[0]), meta)
                atomic_write.write_with(sigma_path, lambda tmp: nib.save(sigma_img, str(tmp)))
        else:
            images = read_picture(src, predictor.channels)[None]
            prob = predictor.predict_slices(images)[0]
            write_mask_picture(predictor.labels(prob), mask_path, predictor.multiclass)
            if prob_path is not None:
                atomic_write.write_with(prob_path, lambda tmp: _save_npy(tmp, prob))
            if sigma_path is not None:
                sigma = predictor.uncertainty_slices(images)[0]
                atomic_write.write_with(sigma_path, lambda tmp: _save_npy(tmp, sigma))
        written += [p for p in (mask_path, prob_path, sigma_path) if p is not None]
    rule = (f"argmax over {len(predictor.classes) + 1} classes" if predictor.multiclass else f"threshold {threshold}")
    log(f"predict: {len(plan)} input(s) -> {output} ({predictor.network} network, "
        f"{'TTA, ' if tta else ''}{rule})")
    return written
