"""Benchmark: MIRA-U's M Monte-Carlo dropout passes of the ViT teacher, batched vs looped.

    python bench/mc_dropout.py                                   # 64x64x3, batch 4, M=20
    python bench/mc_dropout.py --image-size 128 --batch 2 --out bench/results/mc_dropout.json

Four ways to get the per-pixel mean and std of M passes (all give the same numbers, see
tests/test_models_transformer.py):
  batched_graph     mc_dropout_stats: the batch tiled M times, one forward, in a tf.function
  chunked_graph     the same, --chunk passes per forward (bounds memory), in a tf.function
  loop_graph        mc_dropout_stats_loop (M calls) traced into one tf.function (unrolled)
  loop_eager        mc_dropout_stats_loop run eagerly: M Python-dispatched calls
Reported: median seconds per call over --repeats after --warmup calls, and images/s (batch / s;
each image gets all M passes). The teacher has the seed's width (embed 256, depth 4, 4 heads).
"""
import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import tensorflow as tf  # noqa: E402

from semiseg.models.transformer import build_mim_teacher, mc_dropout_stats, mc_dropout_stats_loop  # noqa: E402


def time_call(fn, warmup, repeats):
    for _ in range(warmup):
        fn()[0].numpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()[0].numpy()            # .numpy() waits for the device
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--passes", type=int, default=20)
    p.add_argument("--chunk", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="bench/results/mc_dropout.json")
    args = p.parse_args(argv)

    teacher = build_mim_teacher(args.image_size, 3)
    images = tf.random.stateless_uniform([args.batch, args.image_size, args.image_size, 3], [1, 2])
    m, seed = args.passes, [0, 1]
    variants = {
        "batched_graph": tf.function(lambda: mc_dropout_stats(teacher, images, m, seed=seed)),
        "chunked_graph": tf.function(lambda: mc_dropout_stats(teacher, images, m, chunk=args.chunk, seed=seed)),
        "loop_graph": tf.function(lambda: mc_dropout_stats_loop(teacher, images, m, seed=seed)),
        "loop_eager": lambda: mc_dropout_stats_loop(teacher, images, m, seed=seed),
    }
    rows = []
    for name, fn in variants.items():
        s = time_call(fn, args.warmup, args.repeats)
        rows.append({"variant": name, "seconds": round(s, 4), "images_per_s": round(args.batch / s, 3)})
    base = next(r["seconds"] for r in rows if r["variant"] == "loop_eager")
    for r in rows:
        r["speedup_vs_loop_eager"] = round(base / r["seconds"], 2)

    devices = [d.name for d in tf.config.list_logical_devices()]
    print(f"MC dropout, M={m}, {args.image_size}x{args.image_size}x3, batch {args.batch}, "
          f"teacher {teacher.count_params():,} params, devices {devices}")
    print(f"{'variant':<15}{'s/call':>10}{'images/s':>11}{'x eager loop':>14}")
    for r in rows:
        print(f"{r['variant']:<15}{r['seconds']:>10.3f}{r['images_per_s']:>11.2f}{r['speedup_vs_loop_eager']:>14.2f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "devices": devices, "host": platform.node(),
                               "cpu_count": os.cpu_count(), "tensorflow": tf.__version__,
                               "results": rows}, indent=1))
    print(f"written: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
