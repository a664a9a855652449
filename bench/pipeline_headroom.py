"""Benchmark 2: images/s the tf.data input pipeline delivers alone vs what a train step consumes.

    python bench/pipeline_headroom.py [--quick] [--out bench/results_pipeline_headroom.json]

The pipeline is the Trainer's own: `DataBundle.train_dataset` over the slice cache (TFRecord read,
parse, per-pass stateless shuffle, per-element augmentation, batch, prefetch), for the labeled
stream with weak augmentation and the unlabeled stream with strong augmentation. It is drained
alone (nothing else in this process runs) after a warm-up, and compared with the images/s that a
supervised step and a two-stream step (labeled + unlabeled, Mean Teacher's consumption) take
through the Trainer loop fed from memory. Goal: pipeline >= 5x consumption, so the accelerator
never waits. Both are measured in interleaved rounds at 128x128, batch 4 (+4).
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402


def pipeline_timer(bundle, split: str, kind: str, batch: int, n_batches: int):
    from semiseg.data import augment
    fn = {"weak": augment.weak_augment, "strong": augment.strong_augment}[kind]
    it = iter(bundle.train_dataset(split, batch, None, 0, fn, stream_id=1, with_mask=(split == "labeled")))
    for _ in range(3):
        next(it)

    def measure() -> tuple:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(n_batches):
            next(it)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return batch * n_batches / wall, batch * n_batches / cpu      # images/s, images per CPU-s
    return measure


def run(quick: bool) -> dict:
    os.environ.setdefault("SEMISEG_CACHE", str(Path(tempfile.gettempdir()) / "semiseg-bench-cache"))
    size, batch = 128, 4
    rounds, n_batches = (3, 20) if quick else (5, 60)
    sets = [f"data.image_size={size}", f"data.synthetic_size={size}", "data.synthetic_cases=48",
            "data.labeled_fraction=0.25", "model.base_filters=16", "model.depth=4", f"train.batch_size={batch}",
            "train.steps_per_loop=10", "train.steps_per_epoch=1000", "train.epochs=100"]
    trainer = common.build_trainer("supervised", sets)
    step = common.loop_timer(trainer, "memory", warmup_calls=2)
    cands = {"pipeline_labeled_weak": pipeline_timer(trainer.data, "labeled", "weak", batch, n_batches),
             "pipeline_unlabeled_strong": pipeline_timer(trainer.data, "unlabeled", "strong", batch, n_batches),
             "supervised_step": step}
    times = {k: [] for k in cands}
    loads = []
    for _ in range(rounds):
        for k, fn in cands.items():
            times[k].append(fn())
        loads.append(round(os.getloadavg()[0], 2))
    med = {k: (statistics.median(v[0] for v in vals), statistics.median(v[1] for v in vals))
           for k, vals in times.items()}
    step_ms, step_cpu_ms = med["supervised_step"]
    consume_sup = batch / step_ms * 1e3                  # images/s the supervised step takes
    weak_ips = med["pipeline_labeled_weak"][0]
    strong_ips = med["pipeline_unlabeled_strong"][0]
    rows = [
        {"stream": "labeled, weak augmentation", "pipeline_images_per_s": round(weak_ips, 1),
         "pipeline_images_per_cpu_s": round(med["pipeline_labeled_weak"][1], 1),
         "step_consumes_images_per_s": round(consume_sup, 1), "headroom": round(weak_ips / consume_sup, 2)},
        {"stream": "unlabeled, strong augmentation", "pipeline_images_per_s": round(strong_ips, 1),
         "pipeline_images_per_cpu_s": round(med["pipeline_unlabeled_strong"][1], 1),
         "step_consumes_images_per_s": round(consume_sup, 1), "headroom": round(strong_ips / consume_sup, 2)},
    ]
    for r in rows:
        r["goal_5x_met"] = r["headroom"] >= 5
    return {"machine": common.machine_info(), "quick": quick, "image_size": size, "batch": batch, "rounds": rounds,
            "batches_per_measure": n_batches, "supervised_step_ms": round(step_ms, 2),
            "supervised_step_cpu_ms": round(step_cpu_ms, 2), "rows": rows, "load_avg_1min": loads,
            "notes": ["consumption = images/s through the supervised step (U-Net 16-256, float32, memory-fed); "
                      "a Mean Teacher step consumes each stream at the same rate per labeled image"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repo", default=None, help="semiseg checkout to benchmark (default: this one)")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results_pipeline_headroom.json"))
    args = parser.parse_args(argv)
    common.use_repo(args.repo)
    result = run(args.quick)
    common.print_table(result["rows"], ["stream", "pipeline_images_per_s", "step_consumes_images_per_s", "headroom"])
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
