"""Data: the streams, and `prepare_data`, which walks the data path once, one stage after the other:
source (sources.py: list the cases) -> check (checks.py) -> cache (cache.py: find or build) ->
splits (splits.py) -> streams (here). Each stage calls only the ones before it.

    python main.py check-data --data PATH          # list and validate a data set
    python main.py preprocess --data PATH --preset NAME   # build the slice cache once (train's preset)

`prepare_data(cfg)` returns a `DataBundle` whose methods build the streams the trainer consumes:
  labeled / unlabeled : infinite, shuffled per pass with a seed, augmented in the graph with
                        stateless ops seeded by (seed, pipeline, element index), batched per replica;
                        deterministic, so `--resume` at step s rebuilds exactly the stream it left;
                        split between workers by record (exact) or by cache file (data.shard_policy).
  eval(split)         : every slice of the split's cases in order, with case id and slice index,
                        so predictions stack back into whole cases for per-case metrics.
This module knows nothing of models or training.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path


from semiseg.errors import ConfigError
from semiseg.data import cache as slice_cache
from semiseg.data import splits as data_splits
from semiseg.data.sources import DataError, resolve_source
from semiseg.data.splits import SPLITS, make_splits, save_splits  # noqa: F401  (the loader's API before splits.py)

# Splits whose training stream keeps only the cache's train_keep slices. Not 'unlabeled': choosing
# unlabelled slices by their (hidden) labels would leak label information into the SSL stream.
TRAIN_FILTERED_SPLITS = ("labeled",)


def data_set_name(data_cfg, fmt: str = "") -> str:
    """How outputs name the data set: 'synthetic v2' (the embedded set and its generator version; "synthetic 3d v1" for the volumes),
    else the data folder's absolute path."""
    if (fmt or data_cfg.format) == "synthetic":
        from semiseg.data.synthetic import GENERATOR_VERSION, GENERATOR_VERSION_3D
        if data_cfg.synthetic_kind == "3d":
            return f"synthetic 3d {GENERATOR_VERSION_3D}"
        return f"synthetic {GENERATOR_VERSION}"
    return str(Path(data_cfg.path).expanduser().resolve())


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

    @property
    def num_classes(self) -> int:
        """C, classes including background: 2 for binary masks {0, 1}, K + 1 for K named structures
        (masks then hold class indices 0..K)."""
        from semiseg import config
        return config.num_classes(self.data_cfg)

    @property
    def class_names(self) -> list:
        """The structures of classes 1..K (data.classes); background (0) is implicit."""
        return list(self.data_cfg.classes)

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

    def split_files(self, split: str) -> list[tuple[str, int]]:
        """(shard file, records of the split's training stream in it) for every file holding some,
        in cache order. A case lives in exactly one shard file (the cache writes whole cases)."""
        key = "n_train_slices" if split in TRAIN_FILTERED_SPLITS else "n_slices"
        wanted = set(self.splits[split])
        files = []
        for shard in self.manifest["shards"]:
            n = sum(self.manifest["cases"][c][key] for c in shard["cases"] if c in wanted)
            if n:
                files.append((str(self.cache_dir / shard["file"]), n))
        return files

    def file_shard(self, split: str, n_pipe: int, pipe: int) -> tuple[list[str], int]:
        """data.shard_policy=file: (files, records per pass) that input pipeline `pipe` of `n_pipe` reads.

        Whole files go to pipelines, the largest (in records of the split) first, each to the pipeline
        with the fewest records so far: shares as even as whole files allow, and a pure function of
        the manifest, so every worker computes the same assignment without talking to the others.
        A pipeline keeps its files in cache order, so with one pipeline it reads what `record` reads.
        Refused when some pipeline would get no file: its stream would be empty and its worker would
        wait forever in the first all-reduce."""
        files = self.split_files(split)
        if len(files) < n_pipe:
            raise ConfigError(
                f"data.shard_policy=file: the training stream '{split}' has records in {len(files)} shard "
                f"file(s) of the slice cache {self.cache_dir}, fewer than the {n_pipe} input pipelines (one per "
                f"worker); use data.shard_policy=record (reads every file, decodes only a worker's share)")
        load, owner = [0] * n_pipe, {}
        for i in sorted(range(len(files)), key=lambda i: (-files[i][1], i)):
            p = min(range(n_pipe), key=lambda q: (load[q], q))
            owner[i] = p
            load[p] += files[i][1]
        mine = [files[i] for i in range(len(files)) if owner[i] == pipe]
        return [f for f, _ in mine], sum(n for _, n in mine)

    def record_bytes(self) -> int:
        """Bytes of one serialized cache record: float16 image, uint8 mask, a few small fields."""
        return self.image_size ** 2 * (2 * self.channels + 1) + 128

    def shuffle_window(self) -> int:
        """Records per shuffle window: data.shuffle_buffer, bounded by data.shuffle_buffer_mb of
        serialized records (every worker holds one window per stream)."""
        records, mb = self.data_cfg.shuffle_buffer, self.data_cfg.shuffle_buffer_mb
        return records if mb <= 0 else max(1, min(records, int(mb * 2 ** 20 // self.record_bytes())))

    def check_shard_policy(self, n_pipelines: int, splits) -> None:
        """Refuse data.shard_policy=file at start-up, before a run folder exists, when a training
        stream in `splits` has fewer shard files than there are input pipelines (one per worker)."""
        if self.data_cfg.shard_policy == "file":
            for split in splits:
                self.file_shard(split, n_pipelines, 0)

    def _records(self, case_ids, file_seed=None, train_only: bool = False, keep=None, decode: bool = True,
                 files=None):
        """Parsed records of the given cases, in cache order, or with the shard files in a
        stateless-random order when `file_seed` (a [2] int64 tensor) is given; `train_only` keeps
        the records flagged train_keep; `keep(position) -> bool` (position among the wanted records,
        from 0) selects records before their pixels are decoded; `decode=False` keeps them serialized
        (smaller in a shuffle window; decode later with `parse_record`); `files` reads only those
        shard files (default: every file holding one of the cases)."""
        import tensorflow as tf
        files = self._files(case_ids) if files is None else list(files)
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
        """A serialized cache record -> {'image' [H,W,C], 'mask' [H,W,1] (float32 class index: 0./1.
        binary, 0..K multi-class), 'case', 'index'}."""
        import tensorflow as tf
        size, ch = self.image_size, self.channels
        f = tf.io.parse_single_example(record, _record_features())
        image = tf.cast(tf.reshape(tf.io.decode_raw(f["image"], tf.float16), [size, size, ch]), tf.float32)
        mask = tf.cast(tf.reshape(tf.io.decode_raw(f["mask"], tf.uint8), [size, size, 1]), tf.float32)
        return {"image": image, "mask": mask, "case": f["case"], "index": f["index"]}

    def train_dataset(self, split: str, per_replica_batch: int, input_context=None, start_step: int = 0,
                      augment=None, stream_id: int = 0, with_mask: bool = True, log=None):
        """Infinite stream of batches of `split` for one input pipeline.

        `augment(image, mask, seed) -> (image, mask)` runs per element with seed (seed, stream, index);
        `log`, if given, receives one line describing this pipeline's share and shuffle window.
        How pipelines (one per worker) share the stream is `data.shard_policy`:

        record (default, exact): sharding is by record of one global stream (every pipeline reads the
        split and keeps records pipe, pipe + n, pipe + 2n, ... of the shared shuffled order, passes
        concatenated), so the records of global step s are exactly [s*G, (s+1)*G) of that order
        whatever the number of workers, and each record's augmentation is seeded by its global
        index: results do not depend on the number of workers (only the order within a batch).
        Every pipeline reads the split's serialized records (the shared order needs them all) and
        parses only their case/train_keep fields to filter; it decodes and augments only its own 1/n.

        file: pipeline p reads only its share of the cache's shard files (`file_shard`) and streams
        them alone: reads and decodes 1/n of the bytes, but which records meet in a global batch,
        and how often each is seen (shares are whole files, so not exactly equal), depend on the
        worker count, and so do the results. With one pipeline it is the record stream exactly.
        """
        import tensorflow as tf
        case_ids = self.splits[split]
        if not case_ids:
            raise DataError(f"split '{split}' has no cases")
        n_pipe = input_context.num_input_pipelines if input_context else 1
        pipe = input_context.input_pipeline_id if input_context else 0
        replicas = input_context.num_replicas_in_sync if input_context else 1
        by_file = self.data_cfg.shard_policy == "file"
        if self.n_slices(split) == 0:
            raise DataError(f"split '{split}' has no training slices (data.foreground_only keeps none; "
                            f"raise data.background_ratio or turn it off)")
        if by_file:
            files, total = self.file_shard(split, n_pipe, pipe)     # records per pass, this pipeline
            # This pipeline's records before start_step: its replicas' batches of every step.
            consumed = start_step * per_replica_batch * (replicas // n_pipe)
        else:
            files, total = None, self.n_slices(split)              # records per pass, all pipelines
            consumed = start_step * per_replica_batch * replicas   # global records before start_step
        first_pass, skip = divmod(consumed, total)
        seed, buffer = self.seed, self.shuffle_window()
        # Each file-policy pipeline shuffles its own files with its own seed (pipeline 0: the record
        # stream's seed, which makes one pipeline of either policy the same stream).
        stream_seed = seed * 1_000_003 + stream_id * 7919 + (pipe * 104_729 if by_file else 0)
        if log is not None:
            log(self.stream_note(split, n_pipe, pipe, files, total))

        def one_pass(p):
            # A fresh order every pass, a pure function of (seed, stream, pass): shard files in a
            # random order, then records sorted by stateless random keys within windows of
            # `shuffle_window()` records. (Dataset.shuffle cannot take a per-pass tensor seed, and its
            # reshuffling state would make --resume replay every earlier pass.) Under `record` the
            # order is the same on every worker, so sharding after it splits one global order.
            pass_seed = tf.stack([tf.constant(stream_seed, tf.int64), p])
            # Serialized records: a window holds bytes, not decoded float32 images, and each
            # pipeline decodes only the records its shard keeps (below).
            ds = self._records(case_ids, file_seed=pass_seed, train_only=split in TRAIN_FILTERED_SPLITS,
                               decode=False, files=files).enumerate()

            def keyed(i, r):
                key_seed = tf.stack([pass_seed[0] + 1, p * 2 ** 24 + i])
                return tf.random.stateless_uniform([], seed=key_seed), r

            def sort_window(keys, r):
                order = tf.argsort(keys)
                return tf.data.Dataset.from_tensor_slices(tf.nest.map_structure(lambda x: tf.gather(x, order), r))

            return ds.map(keyed).batch(buffer).flat_map(sort_window)

        # Shard the concatenated passes, not each pass: with a pass length not divisible by n_pipe,
        # per-pass shards would give pipelines unequal shares and break the global batch after
        # the first pass. k is the record's index in the global stream (under `file`: its index in
        # this pipeline's stream, interleaved with the other pipelines' so augmentation seeds differ).
        ds = tf.data.Dataset.range(first_pass, 2 ** 62).flat_map(one_pass).skip(skip).enumerate(start=consumed)
        if by_file:
            ds = ds.map(lambda k, r: (k * n_pipe + pipe, r))
        else:
            ds = ds.shard(n_pipe, pipe)

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

    def stream_note(self, split: str, n_pipe: int, pipe: int, files, records: int) -> str:
        """One log line: what input pipeline `pipe` reads of `split` and its shuffle window."""
        window = self.shuffle_window()
        all_files = self.split_files(split)
        if files is None:
            share = (f"data.shard_policy=record: reads all {len(all_files)} file(s), decodes 1/{n_pipe} of "
                     f"{records} records per pass")
        else:
            size = sum(os.path.getsize(f) for f in files) / 2 ** 20
            share = (f"data.shard_policy=file: reads {len(files)} of {len(all_files)} file(s) ({size:.1f} MB), "
                     f"{records} of {self.n_slices(split)} records per pass")
        return (f"input '{split}' pipeline {pipe + 1}/{n_pipe}: {share}; shuffle window {window} records "
                f"({window * self.record_bytes() / 2 ** 20:.1f} MB; data.shuffle_buffer={self.data_cfg.shuffle_buffer}, "
                f"data.shuffle_buffer_mb={self.data_cfg.shuffle_buffer_mb:g})")

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
    """The data path, one stage after the other: list the source's cases, find or (check and)
    build their slice cache, make (or reload) the run's splits; the bundle then makes the streams."""
    fmt, root, cases = resolve_source(cfg.data, log)
    cache_dir = slice_cache.ensure_cache(fmt, root, cases, cfg.data, progress=progress, log=log)
    manifest = slice_cache.load_manifest(cache_dir)
    splits = data_splits.run_splits(cases, cfg.data, cfg.seed, run_dir)
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
