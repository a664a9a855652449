"""Bytes read and records decoded per input pipeline under data.shard_policy=record vs file.

    python bench/shard_policy.py [--size 128] [--cases 256] [--pipelines 1 2 4] [--passes 3] [--out FILE.json]

One real slice cache (the embedded synthetic set, `--cases` images at `--size`, grey: shard files
of 64 images), the 'unlabeled' training stream, no augmentation. For each policy and pipeline count
n, every pipeline p of n in turn (tf.distribute.InputContext(n, p, n), batch 1) is drained for its
records of `--passes` passes; measured per pipeline and pass: bytes the process read meanwhile
(`rchar` of /proc/self/io: every read() and pread(), page cache or not), records decoded (the
bundle's `parse_record` wrapped with a counter, in a second drain), and CPU seconds (including
the stream's set-up, which more passes amortise). record: every pipeline
reads every file and decodes ~1/n; file: every pipeline reads and decodes only its files.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def drain(bundle, n_pipe: int, pipe: int, records: int) -> None:
    import tensorflow as tf
    context = tf.distribute.InputContext(num_input_pipelines=n_pipe, input_pipeline_id=pipe,
                                         num_replicas_in_sync=n_pipe)
    it = iter(bundle.train_dataset("unlabeled", 1, context, 0, None, stream_id=2, with_mask=False))
    for _ in range(records):
        next(it)
    del it
    gc.collect()


def count_decodes(bundle, n_pipe: int, pipe: int, records: int) -> int:
    import tensorflow as tf
    parse, calls = type(bundle).parse_record.__get__(bundle), [0]

    def note(image):
        calls[0] += 1
        return image

    def counting(serialized):
        r = parse(serialized)
        image = tf.py_function(note, [r["image"]], tf.float32)
        image.set_shape(r["image"].shape)
        return {**r, "image": image}

    bundle.parse_record = counting
    try:
        drain(bundle, n_pipe, pipe, records)
    finally:
        bundle.parse_record = parse
    return calls[0]


def run(size: int, cases: int, pipelines: list[int], passes: int) -> dict:
    os.environ.setdefault("SEMISEG_CACHE", str(Path(tempfile.gettempdir()) / "semiseg-bench-cache"))
    from semiseg import config
    from semiseg.data import loader
    cfg = config.resolve("smoke", "", [f"data.image_size={size}", f"data.synthetic_size={size}",
                                       f"data.synthetic_cases={cases}", "data.labeled_fraction=0.25"])
    bundle = loader.prepare_data(cfg, log=lambda m: None, progress=False)
    files = bundle.split_files("unlabeled")
    split_bytes = sum(os.path.getsize(f) for f, _ in files)
    total = bundle.n_slices("unlabeled")
    rows = []
    drain(bundle, 1, 0, 4)                           # warm: TF start-up reads are not counted below
    for policy in ("record", "file"):
        bundle.data_cfg.shard_policy = policy
        for n in pipelines:
            if policy == "file" and n > len(files):
                continue
            for p in range(n):
                records = bundle.file_shard("unlabeled", n, p)[1] if policy == "file" else len(range(p, total, n))
                r0, c0 = rchar(), time.process_time()
                drain(bundle, n, p, records * passes)
                read, cpu = (rchar() - r0) / passes, (time.process_time() - c0) / passes
                decoded = count_decodes(bundle, n, p, records * passes) / passes
                rows.append({"policy": policy, "pipelines": n, "pipe": p, "records": records, "decoded": decoded,
                             "mb_read": round(read / 2 ** 20, 2), "read_share": round(read / split_bytes, 3),
                             "cpu_s": round(cpu, 3)})
                print(f"{policy:6s} n={n} pipe={p}, per pass: {records:4d} records, {decoded:6.1f} decoded, "
                      f"{read / 2 ** 20:7.2f} MB read ({read / split_bytes:5.2f} of the split's files), "
                      f"{cpu:6.2f} CPU s", flush=True)
    return {"machine": common.machine_info(), "size": size, "cases": cases, "passes": passes, "split": "unlabeled",
            "split_records": total, "split_files": len(files), "split_mb": round(split_bytes / 2 ** 20, 2),
            "rows": rows}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", type=int, default=128)
    ap.add_argument("--cases", type=int, default=256)
    ap.add_argument("--pipelines", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--passes", type=int, default=3)
    ap.add_argument("--out", default="")
    ap.add_argument("--repo", default=None, help="benchmark another checkout")
    args = ap.parse_args(argv)
    common.use_repo(args.repo)
    result = run(args.size, args.cases, args.pipelines, args.passes)
    print(f"unlabeled stream: {result['split_records']} records in {result['split_files']} files, "
          f"{result['split_mb']} MB")
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
