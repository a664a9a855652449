"""The slice cache: every case of a data set, normalised, sliced and resized once, in TFRecord shards.

    python main.py preprocess --data PATH --preset NAME [--workers N]   # builds (or reuses) the cache
                                                  # NAME, --set data.*: those of the training command

Layout: CACHE_ROOT/<format>-<key>/ with shard-XXXXX.tfrecord files and manifest.json. The key hashes
what the cache was made from (each file's size and mtime, the preprocessing settings, the cache
version), so training reuses a matching cache and builds a new one when anything changed.
A cache is built in a private `*.partial-HOST-PID` folder and renamed into place only when complete
(manifest written last), so a killed preprocess is never read, and two jobs racing to build the
same cache both end up reading one complete copy.

One record per slice, every slice of every case: image (float16 [H, W, C]), mask (uint8 [H, W]
class indices: {0, 1} with one class, 0..K with K classes in data.classes),
has_label, case id, slice index, and train_keep (1 if the slice is used for training: with
data.foreground_only only foreground slices plus a share of empty ones; evaluation reads all).
The manifest lists per case n_slices, n_train_slices, train_slices, spacing, original_shape, meta,
and the key with the settings and file digest it was made from: when no cache matches, the log
names the nearest cache and the settings it differs in (`explain_miss`).
Workers (spawned processes, all cores by default) each write whole chunks of cases to their own shards.
`ensure_cache` is the stage the loader calls: reuse a matching cache, else check the data set
(semiseg.data.checks) and build one.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

import numpy as np

from semiseg import config
from semiseg.data import checks as data_checks
from semiseg.data import workers as worker_pool
from semiseg.data.sources import Case, DataError, LoadedCase, get_source
from semiseg.runs import atomic_write

CACHE_VERSION = 2
SHARD_BYTES = 128 * 2 ** 20          # a shard holds whole cases, up to about this much
# DataConfig fields that do not change the cached slices (splits and streaming only).
_NOT_IN_KEY = {"labeled_fraction", "val_fraction", "test_fraction", "hide_labels", "shuffle_buffer", "shuffle_buffer_mb",
               "shard_policy", "cache_dir", "unlabeled_test_images", "split_file", "labeled_cases"}
# Fields added after caches existed, left out of the key at the value that reproduces the old
# slices, so a binary data set keeps its cache (and its key): one class of any name (masks merge
# label_set as before) and the embedded 2D set.
_KEY_ONLY_WHEN = {"classes": lambda v: len(v) >= 2, "synthetic_kind": lambda v: v != "2d"}


def cache_root(data_cfg) -> Path:
    """The folder the slice caches live in: semiseg's cache home (data.cache_dir, else
    $SEMISEG_CACHE, else ~/.cache/semiseg)."""
    return config.cache_home(data_cfg)

def key_settings(data_cfg) -> dict:
    """The data.* settings a cache key hashes (recorded in the manifest to explain a miss)."""
    return {k: v for k, v in dataclasses.asdict(data_cfg).items()
            if k not in _NOT_IN_KEY and _KEY_ONLY_WHEN.get(k, lambda _: True)(v)}


def _file_stamps(cases: list[Case]) -> list[bytes]:
    """Per file: case id, absolute path, size and mtime ('-' for a missing label)."""
    stamps = []
    for case in sorted(cases, key=lambda c: c.case_id):
        for path in (case.image, case.label):
            if path is None:
                stamps.append(b"-")
                continue
            try:
                st = os.stat(path)
            except OSError as err:
                raise DataError(f"{path}: cannot read ({err.strerror}); case {case.case_id}") from None
            stamps.append(f"{case.case_id}|{os.path.abspath(path)}|{st.st_size}|{st.st_mtime_ns}".encode())
    return stamps


def files_digest(cases: list[Case]) -> str:
    """Hash of the files alone: tells 'other settings' from 'other files' when a key misses."""
    return hashlib.sha256(b"".join(_file_stamps(cases))).hexdigest()[:16]


def cache_key(fmt: str, cases: list[Case], data_cfg) -> str:
    """Hash of everything the cached slices depend on."""
    h = hashlib.sha256()
    h.update(json.dumps({"version": CACHE_VERSION, "format": fmt, "settings": key_settings(data_cfg)},
                        sort_keys=True).encode())
    for stamp in _file_stamps(cases):
        h.update(stamp)
    return h.hexdigest()[:16]


def key_of(path: Path) -> str:
    """The key of a cache folder named <format>-<key>."""
    return Path(path).name.rsplit("-", 1)[-1]


def resize_slices(image: np.ndarray, label, size: int, num_classes: int = 2):
    """[S, H, W, C] float and [S, H, W] uint8 class indices -> size x size. Binary masks are resized
    as float and thresholded at 0.5, which keeps thin structures that nearest-neighbour sampling can
    drop. With more classes each class's indicator is resized the same way and every pixel takes the
    class of largest weight (background on ties): never an index between two classes (resizing the
    indices themselves would turn an RV/LV border into MYO), and thin structures survive as in binary."""
    from PIL import Image
    s, h, w, c = image.shape
    if (h, w) == (size, size):
        return image.astype(np.float32), label

    def resize(plane):
        return np.asarray(Image.fromarray(plane.astype(np.float32), mode="F").resize((size, size), Image.BILINEAR))

    out = np.empty((s, size, size, c), np.float32)
    for i in range(s):
        for ch in range(c):
            out[i, :, :, ch] = resize(image[i, :, :, ch])
    out_label = None
    if label is not None and num_classes > 2:
        out_label = np.stack([np.argmax(np.stack([resize((label[i] == k).astype(np.float32))
                                                  for k in range(num_classes)]), axis=0).astype(np.uint8)
                              for i in range(s)])
    elif label is not None:
        out_label = np.stack([(resize(label[i]) >= 0.5).astype(np.uint8) for i in range(s)])
    return np.clip(out, 0.0, 1.0), out_label


def train_keep_flags(loaded: LoadedCase, data_cfg, case_id: str) -> np.ndarray:
    """Per slice: 1 if the slice is used for *training*, else 0. All slices, unless foreground_only:
    then the foreground slices (any class > 0) plus a seeded random `background_ratio` share of the empty ones
    (pancreas is small; most slices are empty). Evaluation always reads every slice: metrics are
    per whole volume."""
    n = loaded.image.shape[0]
    if not data_cfg.foreground_only or loaded.label is None or n == 1:
        return np.ones(n, np.int64)
    has_fg = loaded.label.reshape(n, -1).any(axis=1)
    rng = np.random.default_rng(int(hashlib.sha256(case_id.encode()).hexdigest()[:8], 16))
    keep_bg = rng.random(n) < data_cfg.background_ratio
    return (has_fg | keep_bg).astype(np.int64)


def _serialize(tf, image, mask, has_label: bool, case_id: str, index: int, train_keep: int) -> bytes:
    feature = {
        "image": tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.astype(np.float16).tobytes()])),
        "mask": tf.train.Feature(bytes_list=tf.train.BytesList(value=[mask.astype(np.uint8).tobytes()])),
        "has_label": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(has_label)])),
        "case": tf.train.Feature(bytes_list=tf.train.BytesList(value=[case_id.encode()])),
        "index": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(index)])),
        "train_keep": tf.train.Feature(int64_list=tf.train.Int64List(value=[int(train_keep)])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_dead_partials(root: Path) -> None:
    host = socket.gethostname()
    for path in root.glob("*.partial-*"):
        try:
            _, tag = path.name.rsplit(".partial-", 1)
            path_host, pid = tag.rsplit("-", 1)
        except ValueError:
            continue
        if path_host == host and not _pid_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)


def load_manifest(path: Path) -> dict | None:
    try:
        with open(path / "manifest.json") as fh:
            manifest = json.load(fh)
    except (OSError, json.JSONDecodeError):
        return None
    if manifest.get("version") != CACHE_VERSION:
        return None
    if not all((path / s["file"]).is_file() for s in manifest["shards"]):
        return None
    return manifest


def find_cache(fmt: str, cases: list[Case], data_cfg) -> Path | None:
    """The folder of a complete cache for exactly these files and settings, or None."""
    final = cache_root(data_cfg) / f"{fmt}-{cache_key(fmt, cases, data_cfg)}"
    return final if load_manifest(final) is not None else None


def reuse_message(path: Path) -> str:
    return f"slice cache: reusing {key_of(path)} at {path}"


def _differences(ours: dict, theirs: dict) -> list[str]:
    return [f"data.{k} {ours.get(k, '(unset)')} vs {theirs.get(k, '(unset)')}"
            for k in sorted(set(ours) | set(theirs)) if ours.get(k) != theirs.get(k)]


def explain_miss(fmt: str, cases: list[Case], data_cfg) -> str:
    """Why no cache matches: the key, the root searched, and how the closest complete cache of this
    format differs (settings here vs there, or other files), so a preprocess run with other
    settings than training is visible in the log instead of a silent rebuild."""
    root = cache_root(data_cfg)
    key = cache_key(fmt, cases, data_cfg)
    message = f"no slice cache with key {key} under {root}"
    ours, digest = key_settings(data_cfg), files_digest(cases)
    nearest, unexplained = None, 0
    for path in sorted(root.glob(f"{fmt}-*")) if root.is_dir() else []:
        manifest = None if ".partial-" in path.name or key_of(path) == key else load_manifest(path)
        if manifest is None:
            continue
        if "settings" not in manifest:           # built before manifests recorded their settings
            unexplained += 1
            continue
        same_files = manifest.get("files_digest") == digest
        diffs = _differences(ours, manifest["settings"])
        rank = (not same_files, len(diffs))
        if nearest is None or rank < nearest[0]:
            nearest = (rank, path, same_files, diffs)
    if nearest is not None:
        _, path, same_files, diffs = nearest
        what = "for this data" if same_files else "(made from other files or file versions)"
        message += (f"; the nearest existing cache {what} is {path.name}, which differs in "
                    f"(here vs there): {', '.join(diffs) or 'no data.* setting'}")
    elif unexplained:
        message += f"; {unexplained} older {fmt} cache(s) there record no settings to compare"
    else:
        message += f"; no {fmt} cache exists there yet"
    return message


def ensure_cache(fmt: str, root, cases: list[Case], data_cfg, progress: bool = True, log=print) -> Path:
    """The folder of a complete cache for `cases`: a matching one, else the data set is checked and
    the cache built. A matching cache was checked when it was built from these very files (sizes,
    mtimes); otherwise the check runs before anything is written, so an unusable data set stops here."""
    try:
        cached = find_cache(fmt, cases, data_cfg)
    except DataError:         # e.g. a listed file is missing: the checks below name every problem
        cached = None
    if cached is not None:
        log(reuse_message(cached))
        return cached
    report = data_checks.check_data(fmt, root, cases, data_cfg, progress=progress)
    if report.warnings:
        log(f"check-data: {len(report.warnings)} warnings\n" + report.table(report.warnings, limit=10))
    report.raise_if_unusable()
    return build_cache(fmt, cases, data_cfg, progress=progress, log=log)

def build_cache(fmt: str, cases: list[Case], data_cfg, progress: bool = True, log=print, workers: int = 0) -> Path:
    """Return the folder of a complete cache for `cases`, building it if needed (on `workers`
    processes; 0 = every available core)."""
    root = cache_root(data_cfg)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"{fmt}-{cache_key(fmt, cases, data_cfg)}"
    if load_manifest(final) is not None:
        log(reuse_message(final))
        return final
    if final.exists():          # a folder without a valid manifest is not a cache: never read it
        log(f"slice cache {final} is incomplete or stale: rebuilding it")
        shutil.rmtree(final, ignore_errors=True)
    else:
        log(explain_miss(fmt, cases, data_cfg) + "; building it")
    _remove_dead_partials(root)
    partial = root / f"{final.name}.partial-{socket.gethostname()}-{os.getpid()}"
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir()
    t0 = time.time()
    try:
        manifest = write_shards(fmt, cases, data_cfg, partial, progress, workers)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    manifest["build_seconds"] = round(time.time() - t0, 2)
    # What the key was made from, so that a later miss can say which setting differs.
    manifest.update(key=key_of(final), settings=key_settings(data_cfg), files_digest=files_digest(cases))
    atomic_write.write_text(partial / "manifest.json", json.dumps(manifest, indent=1))
    try:
        os.rename(partial, final)
    except OSError:             # another job finished the same cache first: use theirs
        shutil.rmtree(partial, ignore_errors=True)
        if load_manifest(final) is None:
            raise
    log(f"slice cache written: {final} ({manifest['n_slices']} slices, {manifest['n_train_slices']} for training, "
        f"{len(manifest['shards'])} shards, {manifest['workers']} workers, {manifest['build_seconds']} s)")
    return final


def write_shards(fmt: str, cases: list[Case], data_cfg, out: Path, progress: bool, workers: int = 0) -> dict:
    chunks = worker_pool.plan_chunks(cases)
    workers = worker_pool.useful_workers(cases, chunks, workers)
    tasks = [(fmt, chunk, data_cfg, str(out), k) for k, chunk in enumerate(chunks)]
    parts = worker_pool.run_tasks(write_chunk, tasks, workers, len(cases), "preprocess", progress)
    manifest = {"version": CACHE_VERSION, "format": fmt, "image_size": data_cfg.image_size, "channels": None,
                "shards": [], "cases": {}, "n_slices": 0, "n_train_slices": 0, "workers": workers}
    for part, chunk in zip(parts, chunks):
        if part["channels"] is not None:
            if manifest["channels"] is None:
                manifest["channels"] = part["channels"]
            elif manifest["channels"] != part["channels"]:
                raise DataError(f"{chunk[0].image}: {part['channels']} channels, but earlier cases have "
                                f"{manifest['channels']}; set data.channels to convert all images")
        offset = len(manifest["shards"])
        manifest["shards"] += part["shards"]
        for case_id, info in part["cases"].items():
            info["shard"] += offset
            manifest["cases"][case_id] = info
            manifest["n_slices"] += info["n_slices"]
            manifest["n_train_slices"] += info["n_train_slices"]
    return manifest


def write_chunk(task, tick) -> dict:
    """Worker: load, slice, resize and write one chunk of cases to its own shard files."""
    import tensorflow as tf
    fmt, cases, data_cfg, out, chunk_index = task
    out = Path(out)
    source = get_source(fmt)
    part = {"channels": None, "shards": [], "cases": {}}
    writer, shard_bytes, shard = None, 0, None
    try:
        for case in cases:
            loaded = source.load_case(case, data_cfg)
            keep = train_keep_flags(loaded, data_cfg, case.case_id)
            image, label = resize_slices(loaded.image, loaded.label, data_cfg.image_size, config.num_classes(data_cfg))
            channels = int(image.shape[-1])
            if part["channels"] is None:
                part["channels"] = channels
            elif part["channels"] != channels:
                raise DataError(f"{case.image}: {channels} channels, but earlier cases have {part['channels']}; "
                                f"set data.channels to convert all images")
            if writer is None or shard_bytes > SHARD_BYTES:
                if writer is not None:
                    writer.close()
                shard = {"file": f"shard-{chunk_index:05d}-{len(part['shards']):02d}.tfrecord", "cases": [], "n": 0}
                part["shards"].append(shard)
                writer, shard_bytes = tf.io.TFRecordWriter(str(out / shard["file"])), 0
            empty = np.zeros(image.shape[1:3], np.uint8)
            for i in range(len(image)):
                mask = label[i] if label is not None else empty
                record = _serialize(tf, image[i], mask, label is not None, case.case_id, i, int(keep[i]))
                writer.write(record)
                shard_bytes += len(record)
            shard["cases"].append(case.case_id)
            shard["n"] += len(image)
            h, w = loaded.image.shape[1:3]
            # In-plane spacing grows by the resize factor: distances stay in mm after resizing.
            spacing = [loaded.spacing[0] * h / data_cfg.image_size, loaded.spacing[1] * w / data_cfg.image_size,
                       loaded.spacing[2]]
            part["cases"][case.case_id] = {
                "n_slices": int(len(image)), "n_train_slices": int(keep.sum()), "has_label": label is not None,
                "spacing": spacing, "spacing_unit": loaded.spacing_unit,
                "original_shape": list(loaded.image.shape[:3]), "train_slices": np.flatnonzero(keep).tolist(),
                "shard": len(part["shards"]) - 1, "meta": loaded.meta,
            }
            tick()
    finally:
        if writer is not None:
            writer.close()
    return part
