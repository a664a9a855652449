"""Data: sources -> cases -> per-case splits -> slice cache -> tf.data streams.

    python main.py check-data --data PATH          # list and validate a data set
    python main.py preprocess --data PATH --preset NAME   # build the slice cache once (train's preset)

`prepare_data(cfg)` returns a `DataBundle` whose methods build the streams the trainer consumes:
  labeled / unlabeled : infinite, shuffled per pass with a seed, augmented in the graph with
                        stateless ops seeded by (seed, pipeline, element index), batched per replica;
                        deterministic, so `--resume` at step s rebuilds exactly the stream it left.
  eval(split)         : every slice of the split's cases in order, with case id and slice index,
                        so predictions stack back into whole cases for per-case metrics.
Splits are made per case (never slices of one patient on two sides) and saved to splits.json.
This module knows nothing of models or training.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from semiseg.runs import atomic_write
from semiseg.data import cache as slice_cache
from semiseg.data.sources import Case, DataError, detect_format, get_source, synthetic_root

SPLITS = ("labeled", "unlabeled", "val", "test")
# Splits whose training stream keeps only the cache's train_keep slices. Not 'unlabeled': choosing
# unlabelled slices by their (hidden) labels would leak label information into the SSL stream.
TRAIN_FILTERED_SPLITS = ("labeled",)


def resolve_source(data_cfg, log=print) -> tuple[str, Path, list[Case]]:
    """(format, root, cases) for the configured data; infers the format when asked to."""
    fmt = data_cfg.format
    if fmt == "synthetic":
        root = synthetic_root(data_cfg)
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


def data_set_name(data_cfg, fmt: str = "") -> str:
    """How outputs name the data set: 'synthetic v2' (the embedded set and its generator version),
    else the data folder's absolute path."""
    if (fmt or data_cfg.format) == "synthetic":
        from semiseg.data.synthetic import GENERATOR_VERSION
        return f"synthetic {GENERATOR_VERSION}"
    return str(Path(data_cfg.path).expanduser().resolve())


def make_splits(cases: list[Case], data_cfg, seed: int) -> dict:
    """Case-level split into labeled / unlabeled / val / test.

    Cases with labels are shuffled with numpy's PCG64 (same result on every machine) and cut into
    test, val and train; a data set's own subsets (Case.subset) are respected. Of the training cases
    `labeled_fraction` keep their labels (at least one); the rest become unlabelled, their labels
    kept only as hidden truth for scoring pseudo targets. Cases without labels are unlabelled.
    """
    labeled_pool = sorted(c.case_id for c in cases if c.label is not None and c.subset is None)
    fixed = {s: sorted(c.case_id for c in cases if c.subset == s and c.label is not None) for s in ("train", "val", "test")}
    no_label = sorted(c.case_id for c in cases if c.label is None)
    rng = np.random.default_rng(seed)
    order = [labeled_pool[i] for i in rng.permutation(len(labeled_pool))]
    n_test = int(round(data_cfg.test_fraction * len(order))) if not fixed["test"] else 0
    n_val = int(round(data_cfg.val_fraction * len(order))) if not fixed["val"] else 0
    test = fixed["test"] + order[:n_test]
    val = fixed["val"] + order[n_test:n_test + n_val]
    train = fixed["train"] + order[n_test + n_val:]
    train = [train[i] for i in rng.permutation(len(train))]
    if not train:
        raise DataError("no labelled training cases left after the val/test split; lower data.val_fraction/test_fraction")
    n_labeled = max(1, int(round(data_cfg.labeled_fraction * len(train))))
    labeled, hidden = sorted(train[:n_labeled]), sorted(train[n_labeled:])
    if not val:
        raise DataError("the validation split is empty: model selection needs it (raise data.val_fraction or add cases)")
    return {"seed": seed, "labeled_fraction": data_cfg.labeled_fraction,
            "labeled": labeled, "unlabeled": sorted(hidden + no_label), "hidden_truth": hidden,
            "val": sorted(val), "test": sorted(test)}


def save_splits(splits: dict, path) -> None:
    atomic_write.write_text(path, json.dumps(splits, indent=1))


@dataclass
class DataBundle:
    """A cache plus a split: everything the trainer needs to build its streams."""
    cache_dir: Path
    manifest: dict
    splits: dict
    data_cfg: object
    seed: int
    fmt: str = ""

    @property
    def image_size(self) -> int:
        return int(self.manifest["image_size"])

    @property
    def channels(self) -> int:
        return int(self.manifest["channels"])

    def n_slices(self, split: str) -> int:
        """Records the split's stream yields per pass: the training-kept slices for 'labeled'
        (data.foreground_only), every slice otherwise (evaluation scores whole volumes)."""
        key = "n_train_slices" if split in TRAIN_FILTERED_SPLITS else "n_slices"
        return sum(self.manifest["cases"][c][key] for c in self.splits[split])

    def case_info(self, case_id: str) -> dict:
        return self.manifest["cases"][case_id]

    # ------------------------------------------------------------------ tf.data
    def _files(self, case_ids) -> list[str]:
        wanted = set(case_ids)
        return [str(self.cache_dir / s["file"]) for s in self.manifest["shards"] if wanted & set(s["cases"])]

    def record_bytes(self) -> int:
        """Bytes of one serialized cache record: float16 image, uint8 mask, a few small fields."""
        return self.image_size ** 2 * (2 * self.channels + 1) + 128

    def shuffle_window(self) -> int:
        """Records per shuffle window: data.shuffle_buffer, bounded by data.shuffle_buffer_mb of
        serialized records (every worker holds one window per stream)."""
        records, mb = self.data_cfg.shuffle_buffer, self.data_cfg.shuffle_buffer_mb
        return records if mb <= 0 else max(1, min(records, int(mb * 2 ** 20 // self.record_bytes())))

    def _records(self, case_ids, file_seed=None, train_only: bool = False, keep=None, decode: bool = True):
        """Parsed records of the given cases, in cache order, or with the shard files in a
        stateless-random order when `file_seed` (a [2] int64 tensor) is given; `train_only` keeps
        the records flagged train_keep; `keep(position) -> bool` (position among the wanted records,
        from 0) selects records before their pixels are decoded; `decode=False` keeps them serialized
        (smaller in a shuffle window; decode later with `parse_record`)."""
        import tensorflow as tf
        files = self._files(case_ids)
        n_files = len(files)
        if file_seed is not None and n_files > 1:
            files = tf.random.experimental.stateless_shuffle(tf.constant(files), seed=file_seed)
        table = tf.lookup.StaticHashTable(
            tf.lookup.KeyValueTensorInitializer(tf.constant(sorted(case_ids), tf.string),
                                                tf.ones(len(case_ids), tf.int64)), default_value=0)
        features = _record_features()
        # Ordered reads (one file after the other) unless shuffling: evaluation relies on the
        # records of a case being contiguous, and parallel reads interleave shards record by record.
        ds = tf.data.TFRecordDataset(files, num_parallel_reads=(min(4, n_files) or None) if file_seed is not None else None)
        # Filter on the raw case (and train_keep) fields before decoding pixels this stream does not use.
        keys = {"case": features["case"], "train_keep": features["train_keep"]}

        def wanted(record):
            f = tf.io.parse_single_example(record, keys)
            ok = table.lookup(f["case"]) > 0
            return tf.logical_and(ok, f["train_keep"] > 0) if train_only else ok

        ds = ds.filter(wanted)
        if keep is not None:
            def kept(position, _record):
                return keep(position)

            def record_only(_position, record):
                return record
            ds = ds.enumerate().filter(kept).map(record_only)
        return ds.map(self.parse_record, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True) if decode else ds

    def parse_record(self, record):
        """A serialized cache record -> {'image' [H,W,C], 'mask' [H,W,1] (float32), 'case', 'index'}."""
        import tensorflow as tf
        size, ch = self.image_size, self.channels
        f = tf.io.parse_single_example(record, _record_features())
        image = tf.cast(tf.reshape(tf.io.decode_raw(f["image"], tf.float16), [size, size, ch]), tf.float32)
        mask = tf.cast(tf.reshape(tf.io.decode_raw(f["mask"], tf.uint8), [size, size, 1]), tf.float32)
        return {"image": image, "mask": mask, "case": f["case"], "index": f["index"]}

    def train_dataset(self, split: str, per_replica_batch: int, input_context=None, start_step: int = 0,
                      augment=None, stream_id: int = 0, with_mask: bool = True):
        """Infinite stream of batches of `split` for one input pipeline.

        Sharding across pipelines is by record of one global stream (every pipeline reads the
        split and keeps records pipe, pipe + n, pipe + 2n, ... of the shared shuffled order, passes
        concatenated), so the records of global step s are exactly [s*G, (s+1)*G) of that order
        whatever the number of workers, and each record's augmentation is seeded by its global
        index: results do not depend on the number of workers (only the order within a batch).
        `augment(image, mask, seed) -> (image, mask)` runs per element with seed (seed, stream, index).
        Reading: every pipeline reads the split's serialized records (the shared order needs them all)
        but decodes and augments only its own 1/n. Splitting the shard *files* between workers
        would read less, but would make the order, and so the result, depend on the worker count.
        """
        import tensorflow as tf
        case_ids = self.splits[split]
        if not case_ids:
            raise DataError(f"split '{split}' has no cases")
        n_pipe = input_context.num_input_pipelines if input_context else 1
        pipe = input_context.input_pipeline_id if input_context else 0
        replicas = input_context.num_replicas_in_sync if input_context else 1
        total = self.n_slices(split)                        # records per pass, all pipelines
        if total == 0:
            raise DataError(f"split '{split}' has no training slices (data.foreground_only keeps none; "
                            f"raise data.background_ratio or turn it off)")
        consumed = start_step * per_replica_batch * replicas   # global records before start_step
        first_pass, skip = divmod(consumed, total)
        seed, buffer = self.seed, self.shuffle_window()

        def one_pass(p):
            # A fresh order every pass, a pure function of (seed, stream, pass): shard files in a
            # random order, then records sorted by stateless random keys within windows of
            # `shuffle_window()` records. (Dataset.shuffle cannot take a per-pass tensor seed, and its
            # reshuffling state would make --resume replay every earlier pass.) The order is the
            # same on every worker, so sharding after it splits one global order.
            pass_seed = tf.stack([tf.cast(seed * 1_000_003 + stream_id * 7919, tf.int64), p])
            # Serialized records: a window holds bytes, not decoded float32 images, and each
            # pipeline decodes only the records its shard keeps (below).
            ds = self._records(case_ids, file_seed=pass_seed, train_only=split in TRAIN_FILTERED_SPLITS,
                               decode=False).enumerate()

            def keyed(i, r):
                key_seed = tf.stack([pass_seed[0] + 1, p * 2 ** 24 + i])
                return tf.random.stateless_uniform([], seed=key_seed), r

            def sort_window(keys, r):
                order = tf.argsort(keys)
                return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda x: tf.gather(x, order), r))

            return ds.map(keyed).batch(buffer).flat_map(sort_window)

        # Shard the concatenated passes, not each pass: with a pass length not divisible by n_pipe,
        # per-pass shards would give pipelines unequal shares and break the global batch after
        # the first pass. k is the record's index in the global stream.
        ds = tf.data.Dataset.range(first_pass, 2 ** 62).flat_map(one_pass).skip(skip)
        ds = ds.enumerate(start=consumed).shard(n_pipe, pipe)

        def prepare(k, serialized):
            r = self.parse_record(serialized)
            image, mask = r["image"], r["mask"]
            if augment is not None:
                aug_seed = tf.stack([tf.cast(seed * 1000 + stream_id * 100, tf.int64), k])
                image, mask = augment(image, mask, aug_seed)
            return (image, mask) if with_mask else image

        ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(per_replica_batch, drop_remainder=True)
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
        return ds.with_options(options).prefetch(tf.data.AUTOTUNE)

    def eval_dataset(self, split: str, batch: int, case_ids=None):
        """Ordered batches of {'image','mask','case','index'} for a split (or a list of cases)."""
        import tensorflow as tf
        ids = list(case_ids) if case_ids is not None else self.splits[split]
        if not ids:
            raise DataError(f"split '{split}' has no cases")
        return self._records(ids).batch(batch).prefetch(tf.data.AUTOTUNE)


    def sharded_eval_dataset(self, case_ids, per_replica_batch: int, input_context=None):
        """This input pipeline's share of the slices of `case_ids`, for evaluation on every replica.

        Pipeline p of P keeps the records p, p + P, ... of the cache order (selected before decoding),
        each as {'image','mask','case' (position in sorted case_ids),'valid'}, padded with invalid
        all-zero records to `eval_steps * replicas on this pipeline * per_replica_batch`: every
        replica of every worker then runs the same number of steps (collectives need it), and the
        padding, never counted, makes any case or slice count work."""
        import tensorflow as tf
        ids = sorted(case_ids)
        n_pipe = input_context.num_input_pipelines if input_context else 1
        pipe = input_context.input_pipeline_id if input_context else 0
        replicas = input_context.num_replicas_in_sync if input_context else 1
        local = replicas // n_pipe
        length = self.eval_steps(ids, per_replica_batch, replicas) * local * per_replica_batch
        table = tf.lookup.StaticHashTable(tf.lookup.KeyValueTensorInitializer(
            tf.constant(ids, tf.string), tf.range(len(ids), dtype=tf.int64)), default_value=-1)
        size, ch = self.image_size, self.channels
        ds = self._records(ids, keep=lambda i: i % n_pipe == pipe).map(
            lambda r: {"image": r["image"], "mask": r["mask"], "case": table.lookup(r["case"]), "valid": tf.constant(True)})
        pad = tf.data.Dataset.from_tensors({"image": tf.zeros([size, size, ch]), "mask": tf.zeros([size, size, 1]),
                                            "case": tf.constant(-1, tf.int64), "valid": tf.constant(False)}).repeat()
        return ds.concatenate(pad).take(length).batch(per_replica_batch, drop_remainder=True)

    def eval_steps(self, case_ids, per_replica_batch: int, replicas: int) -> int:
        """Steps of `sharded_eval_dataset`: the busiest pipeline's records over its replicas' batches
        (at most one pipeline per replica, so ceil over all replicas is enough)."""
        total = sum(self.manifest["cases"][c]["n_slices"] for c in case_ids)
        return max(1, math.ceil(total / (replicas * per_replica_batch)))


def _record_features() -> dict:
    import tensorflow as tf
    return {"image": tf.io.FixedLenFeature([], tf.string), "mask": tf.io.FixedLenFeature([], tf.string),
            "has_label": tf.io.FixedLenFeature([], tf.int64), "case": tf.io.FixedLenFeature([], tf.string),
            "index": tf.io.FixedLenFeature([], tf.int64), "train_keep": tf.io.FixedLenFeature([], tf.int64)}


def prepare_data(cfg, run_dir=None, log=print, progress: bool = True) -> DataBundle:
    """Resolve the source, build or reuse the cache, and make (or reload) the run's splits."""
    fmt, root, cases = resolve_source(cfg.data, log)
    try:
        cached = slice_cache.find_cache(fmt, cases, cfg.data)
    except DataError:         # e.g. a listed file is missing: the checks below name every problem
        cached = None
    if cached is None:
        # A matching cache was checked when it was built from these very files (sizes, mtimes);
        # otherwise check now, before anything is written: an unusable data set stops here.
        from semiseg.data import checks as data_checks
        report = data_checks.check_data(fmt, root, cases, cfg.data, progress=progress)
        if report.warnings:
            log(f"check-data: {len(report.warnings)} warnings\n" + report.table(report.warnings, limit=10))
        report.raise_if_unusable()
    if cached is not None:
        log(slice_cache.reuse_message(cached))
    cache_dir = cached or slice_cache.build_cache(fmt, cases, cfg.data, progress=progress, log=log)
    manifest = slice_cache.load_manifest(cache_dir)
    splits_path = Path(run_dir) / "splits.json" if run_dir else None
    if splits_path is not None and splits_path.exists():
        splits = json.loads(splits_path.read_text())       # --resume: the run's own split, always
    else:
        splits = make_splits(cases, cfg.data, cfg.seed)
    missing = [c for s in SPLITS for c in splits[s] if c not in manifest["cases"]]
    if missing:
        raise DataError(f"splits name cases missing from the cache {cache_dir}: {missing[:5]}")
    return DataBundle(cache_dir, manifest, splits, cfg.data, cfg.seed, fmt)


def steps_per_epoch(cfg, bundle: DataBundle) -> int:
    """Same for every method: one pass over the training slices (labelled + unlabelled) at the
    labelled batch size, so methods are compared at equal numbers of optimizer steps."""
    if cfg.train.steps_per_epoch > 0:
        return cfg.train.steps_per_epoch
    n = bundle.n_slices("labeled") + bundle.n_slices("unlabeled")
    return max(1, math.ceil(n / cfg.train.batch_size))
