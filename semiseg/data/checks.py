"""Validate a data set before it is cached or trained on, and print a table of its problems.

    python main.py check-data --data PATH [--format msd|acdc|isic|ph2|folders]

Checks: cases found; images without labels and labels without images; image/label shape or affine
mismatches (the message names both files); label values that are not integers, not in
data.label_set (per file: with K classes they become background), or not binary (pictures, one
class); multi-class picture masks that are not single-channel label maps; empty masks; unreadable or truncated files; NaN/Inf
voxels; channel counts that differ between cases; voxel spacings far from the data set's median.
Errors make the data set unusable (check-data exits 2, training stops before any run folder or
cache is touched); warnings are printed and training goes on. Cases are checked on worker
processes, in the same chunks the slice cache uses.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from semiseg.data.sources import Case, DataError, get_source

SPACING_FACTOR = 3.0          # a spacing this many times off the median is "wildly different"
AFFINE_TOLERANCE_MM = 1e-3    # label and image affines may differ by float noise, not by a voxel


@dataclass(frozen=True)
class Problem:
    severity: str             # error | warning
    path: str                 # the file (or files) concerned
    message: str


@dataclass
class CheckReport:
    fmt: str
    root: str
    cases: list
    problems: list = field(default_factory=list)
    case_info: dict = field(default_factory=dict)   # case id -> {shape, spacing, unit, channels}

    @property
    def errors(self) -> list:
        return [p for p in self.problems if p.severity == "error"]

    @property
    def warnings(self) -> list:
        return [p for p in self.problems if p.severity == "warning"]

    def summary(self) -> str:
        n_lab = sum(c.label is not None for c in self.cases)
        subsets = sorted({c.subset for c in self.cases if c.subset})
        by_subset = ", ".join(f"{s} {sum(c.subset == s for c in self.cases)}" for s in subsets)
        groups = {c.group for c in self.cases if c.group}
        patients = f" of {len(groups)} patients" if groups else ""
        return (f"{self.root} ({self.fmt}): {len(self.cases)} cases{patients}, {n_lab} with labels, "
                f"{len(self.cases) - n_lab} without" + (f" (subsets: {by_subset})" if by_subset else "")
                + f"; {len(self.errors)} errors, {len(self.warnings)} warnings")

    def table(self, problems=None, limit: int = 50) -> str:
        """severity | file | problem, errors first; paths shown relative to the data root."""
        rows = sorted(self.problems if problems is None else problems, key=lambda p: (p.severity != "error", p.path))
        if not rows:
            return "no problems found"

        def short(path):
            try:
                return str(Path(path).relative_to(self.root))
            except ValueError:
                return path

        shown = rows[:limit]
        width = min(60, max(len(short(p.path)) for p in shown))
        lines = [f"{'severity':8}  {'file':{width}}  problem", f"{'-' * 8}  {'-' * width}  {'-' * 7}"]
        lines += [f"{p.severity:8}  {short(p.path):{width}}  {p.message}" for p in shown]
        if len(rows) > limit:
            lines.append(f"... and {len(rows) - limit} more")
        return "\n".join(lines)

    def raise_if_unusable(self) -> None:
        if self.errors:
            raise DataError(f"{self.root}: data set unusable, {len(self.errors)} errors "
                            f"(python main.py check-data --data {self.root} lists all):\n"
                            + self.table(self.errors, limit=20))


# ---------------------------------------------------------------- one case (worker side)
def _check_volume(case: Case, data_cfg) -> tuple[list, dict]:
    from semiseg.data import volumes
    problems, info = [], {}
    try:
        img = volumes.open_nifti(case.image)
        voxels = volumes.read_voxels(img, case.image)
    except DataError as err:
        return [Problem("error", case.image, str(err).split(": ", 1)[-1])], info
    zooms = [float(z) for z in img.header.get_zooms()[:3]]
    info = {"shape": list(img.shape[:3]), "spacing": zooms, "unit": "mm",
            "channels": int(img.shape[3]) if len(img.shape) == 4 else 1}
    if len(img.shape) not in (3, 4):
        problems.append(Problem("error", case.image, f"expected a 3D or 4D volume, got shape {tuple(img.shape)}"))
    bad = int(np.count_nonzero(~np.isfinite(voxels)))
    if bad:
        problems.append(Problem("error", case.image, f"{bad} NaN/Inf voxels"))
    if case.label is None:
        return problems, info
    if not volumes.is_nifti(case.label):
        return problems + [Problem("error", case.label, f"label is not NIfTI but its image {case.image} is")], info
    try:
        lab = volumes.open_nifti(case.label)
        values = volumes.read_voxels(lab, case.label)
    except DataError as err:
        return problems + [Problem("error", case.label, str(err).split(": ", 1)[-1])], info
    if tuple(lab.shape[:3]) != tuple(img.shape[:3]):
        problems.append(Problem("error", f"{case.label} | {case.image}",
                                f"label {case.label} has shape {tuple(lab.shape[:3])} but image {case.image} "
                                f"has shape {tuple(img.shape[:3])}"))
        return problems, info
    gap = float(np.abs(np.asarray(lab.affine) - np.asarray(img.affine)).max())
    if gap > AFFINE_TOLERANCE_MM:
        problems.append(Problem("error", f"{case.label} | {case.image}",
                                f"label {case.label} and image {case.image} have different affines "
                                f"(largest difference {gap:.4g} mm): the mask would be misplaced"))
    problems += _check_label_values(case.label, values, data_cfg)
    return problems, info


def _check_label_values(path: str, values: np.ndarray, data_cfg) -> list:
    if not np.isfinite(values).all():
        return [Problem("error", path, "NaN/Inf label values")]
    ints = np.rint(values)
    if not np.array_equal(ints, values):
        return [Problem("error", path, "non-integer label values (an interpolated or probability map?)")]
    ints = ints.astype(np.int64)
    if ints.size and ints.min() < 0:
        return [Problem("error", path, f"negative label value {int(ints.min())}")]
    counts = np.bincount(ints.ravel()) if ints.size and ints.max() < 2 ** 16 else None
    present = np.flatnonzero(counts) if counts is not None else np.unique(ints)
    return _unexpected_values(path, present, data_cfg, "voxel")


def _unexpected_values(path: str, present, data_cfg, unit: str) -> list:
    """Warnings for label values outside data.label_set (background then) and for empty masks."""
    label_set = {int(v) for v in data_cfg.label_set}
    problems = []
    others = sorted(int(v) for v in present if v != 0 and v not in label_set)
    if others:
        if len(data_cfg.classes) >= 2:
            mapping = ", ".join(f"{label}->{name}" for label, name in zip(data_cfg.label_set, data_cfg.classes))
            problems.append(Problem("warning", path, f"unexpected label values {others}: data.label_set maps only "
                                                     f"{mapping}; these count as background"))
        else:
            problems.append(Problem("warning", path, f"label values {others} are not in data.label_set "
                                                     f"{sorted(label_set)}: they count as background"))
    if not any(int(v) in label_set for v in present):
        problems.append(Problem("warning", path, f"empty mask: no {unit} labelled {sorted(label_set)}"))
    return problems


def _open_picture(path: str):
    """(PIL image fully decoded, None) or (None, what is wrong)."""
    from PIL import Image, UnidentifiedImageError
    try:
        with Image.open(path) as img:
            img.load()
            return img.copy(), None
    except FileNotFoundError:
        return None, "file not found"
    except (OSError, UnidentifiedImageError, SyntaxError) as err:
        return None, f"unreadable or truncated image ({err})"


def _check_picture(case: Case, data_cfg) -> tuple[list, dict]:
    from semiseg.data import volumes
    problems = []
    img, error = _open_picture(case.image)
    if error:
        return [Problem("error", case.image, error)], {}
    channels = 1 if img.mode in ("L", "P", "1", "LA", "I", "I;16", "F") else 3
    info = {"shape": [img.height, img.width], "spacing": [1.0, 1.0], "unit": "px", "channels": channels}
    if img.mode == "F":
        bad = int(np.count_nonzero(~np.isfinite(np.asarray(img))))
        if bad:
            problems.append(Problem("error", case.image, f"{bad} NaN/Inf pixels"))
    if case.label is None:
        return problems, info
    if volumes.is_nifti(case.label):
        return problems + [Problem("error", case.label, f"label is NIfTI but its image {case.image} is a picture")], info
    mask, error = _open_picture(case.label)
    if error:
        return problems + [Problem("error", case.label, error)], info
    if mask.size != img.size:
        problems.append(Problem("error", f"{case.label} | {case.image}",
                                f"label {case.label} has shape {(mask.height, mask.width)} but image {case.image} "
                                f"has shape {(img.height, img.width)}"))
        return problems, info
    if len(data_cfg.classes) >= 2:        # a label map: pixel values are labels (sources.read_mask_picture)
        from semiseg.data.sources import LABEL_MAP_MODES
        if mask.mode not in LABEL_MAP_MODES:
            return problems + [Problem("error", case.label, f"a multi-class mask must be a single-channel label map "
                                                            f"(grey or palette PNG of label values), got mode {mask.mode}")], info
        return problems + _unexpected_values(case.label, np.unique(np.asarray(mask)), data_cfg, "pixel"), info
    values = np.unique(np.asarray(mask.convert("L")))
    if not (set(values.tolist()) <= {0, 1} or set(values.tolist()) <= {0, 255}):
        shown = ", ".join(str(v) for v in values[:6]) + (" ..." if len(values) > 6 else "")
        problems.append(Problem("warning", case.label, f"mask is not binary ({len(values)} grey levels: {shown}); "
                                                       f"pixels above 127 count as foreground"))
    if values.max() == 0:
        problems.append(Problem("warning", case.label, "empty mask: no foreground pixel"))
    return problems, info


def check_case(case: Case, data_cfg) -> tuple[list, dict]:
    from semiseg.data import volumes
    if volumes.is_nifti(case.image):
        return _check_volume(case, data_cfg)
    return _check_picture(case, data_cfg)


def check_chunk(task, tick) -> list:
    """Worker: [(case id, problems, info)] for one chunk of cases."""
    cases, data_cfg = task
    results = []
    for case in cases:
        problems, info = check_case(case, data_cfg)
        results.append((case.case_id, problems, info))
        tick()
    return results


# ---------------------------------------------------------------- the whole data set
def _unlabelled_notes(fmt: str, cases: list) -> list:
    if fmt in ("msd", "synthetic"):   # imagesTs (the 3D synthetic set's too) are unlabelled by design
        return []
    notes = []
    for case in cases:
        if case.label is None:
            where = f" in {case.subset}/" if case.subset in ("val", "test") else ""
            notes.append(Problem("warning", case.image, f"image without a label{where}: used as unlabelled training data"))
    return notes


def _spacing_outliers(infos: dict, cases_by_id: dict) -> list:
    ids = [i for i, info in infos.items() if info.get("unit") == "mm"]
    if len(ids) < 3:
        return []
    spacings = np.array([infos[i]["spacing"] for i in ids], dtype=float)
    median = np.median(spacings, axis=0)
    problems = []
    for case_id, spacing in zip(ids, spacings):
        ratio = np.maximum(spacing / median, median / np.maximum(spacing, 1e-9))
        if ratio.max() > SPACING_FACTOR:
            problems.append(Problem("warning", cases_by_id[case_id].image,
                                    f"voxel spacing {tuple(round(float(s), 3) for s in spacing)} mm is far from the "
                                    f"data set's median {tuple(round(float(s), 3) for s in median)}"))
    return problems


def _channel_mismatch(infos: dict, cases_by_id: dict, data_cfg) -> list:
    if data_cfg.channels:     # every image is converted to data.channels
        return []
    by_count: dict = {}
    for case_id, info in infos.items():
        if "channels" in info:
            by_count.setdefault(info["channels"], []).append(case_id)
    if len(by_count) < 2:
        return []
    common = max(by_count, key=lambda k: len(by_count[k]))
    return [Problem("error", cases_by_id[i].image, f"{n} channels but most images have {common}; "
                                                     f"set data.channels to convert all images")
            for n, ids in by_count.items() if n != common for i in ids]


def check_data(fmt: str, root, cases: list, data_cfg, workers: int = 0, progress: bool = False) -> CheckReport:
    """Run every check over a listed data set; returns the report (raise_if_unusable() to stop)."""
    from semiseg.data import workers as worker_pool
    source = get_source(fmt)
    report = CheckReport(fmt, str(root), list(cases))
    if source.find_orphans is not None and fmt != "synthetic":
        report.problems += [Problem("warning", path, what) for path, what in source.find_orphans(root, data_cfg)]
    report.problems += _unlabelled_notes(fmt, cases)
    chunks = worker_pool.plan_chunks(list(cases))
    workers = worker_pool.useful_workers(list(cases), chunks, workers)
    results = worker_pool.run_tasks(check_chunk, [(chunk, data_cfg) for chunk in chunks], workers,
                                    len(cases), "check-data", progress)
    for chunk_result in results:
        for case_id, problems, info in chunk_result:
            report.problems += problems
            report.case_info[case_id] = info
    cases_by_id = {c.case_id: c for c in cases}
    report.problems += _spacing_outliers(report.case_info, cases_by_id)
    report.problems += _channel_mismatch(report.case_info, cases_by_id, data_cfg)
    return report
