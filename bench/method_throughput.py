"""Benchmark 1: images/s and ms/step of every registered method, and its cost vs the work it does.

    python bench/method_throughput.py [--quick] [--out bench/results_method_throughput.json]

Each method runs the Trainer's real loop (steps_per_loop 10) on one repeated in-memory batch, at
the same U-Net, image size and batch (B labeled + U unlabeled, U = B), candidates interleaved over
rounds, median. images/s counts the labeled + unlabeled images a step consumes.

Work per step is counted in forward-pass FLOPs of the networks involved, backward = 2 x forward
(so forward+backward = 3 units), per image:
  supervised    3B f                          (student fwd+bwd on the labeled batch)
  mean_teacher  3(B+U) f + (B+U) f            (student fwd+bwd on labeled+unlabeled, teacher fwd on both)
  mixmatch      K U f + 3(B + K U) f          (K guess forwards on U, one fwd+bwd on B + K U mixed images)
  mira_u        3(B+U) s + B e + 3B h + M U (e+h) + U s
                (hybrid student s fwd+bwd on labeled+strong unlabeled; frozen ViT encoder e on the
                 labeled batch, its head h fwd+bwd; M MC-dropout teacher passes on U; EMA student on U)
f, s, e, h are forward FLOPs of one image, counted by TF's graph profiler on each network (U-Net:
1.51 GFLOP per 128x128 image, as the yardstick counts it). The work ratio is a method's work over the
supervised step's work *on its own student* (mira_u: 3B s), and the goal is time ratio within 15%
of work ratio. Unregistered methods are listed as skipped.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import common  # noqa: E402

METHODS = ("supervised", "mean_teacher", "mixmatch", "mira_u")


def forward_flops(fn, input_shape) -> float:
    """Float ops of one call of `fn` on one input of `input_shape` (batch 1), from TF's profiler."""
    import tensorflow as tf
    from tensorflow.python.framework.convert_to_constants import convert_variables_to_constants_v2
    concrete = tf.function(fn).get_concrete_function(tf.TensorSpec([1, *input_shape], tf.float32))
    graph = convert_variables_to_constants_v2(concrete).graph
    opts = tf.compat.v1.profiler.ProfileOptionBuilder.float_operation()
    opts["output"] = "none"
    return float(tf.compat.v1.profiler.profile(graph=graph, options=opts).total_float_ops)


def work_units(trainer) -> tuple[float, float, str]:
    """(work of this method's step, work of a supervised step on its student), in FLOPs."""
    cfg, name = trainer.cfg, trainer.method_name
    size, ch = trainer.data.image_size, trainer.data.channels
    b = trainer.per_replica_batch
    u = b * cfg.train.unlabeled_ratio
    s = forward_flops(lambda x: trainer.models["student"](x, training=False), (size, size, ch))
    sup = 3 * b * s
    if name == "supervised":
        return sup, sup, "3B f"
    if name == "mean_teacher":
        return 4 * (b + u) * s, sup, "3(B+U) f + (B+U) f"
    if name == "mixmatch":
        k = cfg.mixmatch.k
        return k * u * s + 3 * (b + k * u) * s, sup, "K U f + 3(B + K U) f"
    if name == "mira_u":
        teacher = trainer.models["teacher"]
        e = forward_flops(lambda x: teacher.encode(x, training=False), (size, size, ch))
        full = forward_flops(lambda x: teacher(x, training=False), (size, size, ch))
        h = max(full - e, 0.0)
        m = cfg.mira_u.mc_samples
        return 3 * (b + u) * s + b * e + 3 * b * h + m * u * (e + h) + u * s, sup, \
            "3(B+U) s + B e + 3B h + M U (e+h) + U s"
    return float("nan"), sup, "not counted"


def run(quick: bool) -> dict:
    os.environ.setdefault("SEMISEG_CACHE", str(Path(tempfile.gettempdir()) / "semiseg-bench-cache"))
    size = 32 if quick else 128
    batch = 4
    rounds = 3 if quick else 5
    sets = [f"data.image_size={size}", f"data.synthetic_size={size}", "data.synthetic_cases=48",
            "data.labeled_fraction=0.25", "model.base_filters=16", "model.depth=4", f"train.batch_size={batch}",
            "train.unlabeled_ratio=1", "train.steps_per_loop=10", "train.steps_per_epoch=1000", "train.epochs=100",
            "train.precision=float32"]
    cands, trainers, skipped = {}, {}, {}
    for method in METHODS:
        try:
            trainer = common.build_trainer(method, sets)
        except ValueError as err:
            skipped[method] = str(err)
            continue
        trainers[method] = trainer
        cands[method] = common.loop_timer(trainer, "memory", warmup_calls=1 if quick else 2)
    if "mira_u" in trainers:
        # MIRA-U trains its own student: its baseline is the supervised step of that same network.
        base = trainers["mira_u"].cfg.mira_u.student_base_channels
        hybrid = common.build_trainer("supervised", sets + ["model.name=hybrid", f"model.base_filters={base}"])
        cands["supervised_hybrid"] = common.loop_timer(hybrid, "memory", warmup_calls=1 if quick else 2)
    timed = common.interleaved(cands, rounds)
    rows = []
    for method, trainer in trainers.items():
        work, sup_work, formula = work_units(trainer)
        images = trainer.per_replica_batch * (1 + (trainer.cfg.train.unlabeled_ratio if trainer.uses_unlabeled else 0))
        ms = timed[method]["median"]
        rows.append({"method": method, "ms_per_step": ms, "all_ms": timed[method]["all"],
                     "cpu_ms_per_step": timed[method]["cpu_median"], "images_per_step": images,
                     "images_per_s": round(images / ms * 1e3, 2), "work_gflop": round(work / 1e9, 2),
                     "work_formula": formula, "supervised_work_gflop_same_student": round(sup_work / 1e9, 2)})
    for r in rows:
        r["work_ratio"] = round(r["work_gflop"] / r["supervised_work_gflop_same_student"], 3)
        ref = "supervised_hybrid" if r["method"] == "mira_u" else "supervised"
        ref_ms, ref_cpu = timed.get(ref, {}).get("median"), timed.get(ref, {}).get("cpu_median")
        if ref_ms:
            r["time_ratio_vs"] = ref
            r["time_ratio"] = round(r["ms_per_step"] / ref_ms, 3)
            r["cpu_time_ratio"] = round(r["cpu_ms_per_step"] / ref_cpu, 3)
            r["time_over_work"] = round(r["time_ratio"] / r["work_ratio"], 3)
            r["goal_within_15pct"] = abs(r["time_over_work"] - 1) <= 0.15
    return {"machine": common.machine_info(), "quick": quick, "image_size": size, "batch_labeled": batch,
            "batch_unlabeled": batch, "rounds": rounds, "rows": rows, "skipped": skipped,
            "load_avg_1min": timed["_load_avg_1min"],
            "notes": ["mira_u runs its own networks (hybrid student, ViT teacher), not the U-Net: its ratios are "
                      "against the supervised step of its own student (model.name=hybrid, same base channels), "
                      f"timed at {timed.get('supervised_hybrid', {}).get('median')} ms"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repo", default=None, help="semiseg checkout to benchmark (default: this one)")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results_method_throughput.json"))
    args = parser.parse_args(argv)
    common.use_repo(args.repo)
    result = run(args.quick)
    common.print_table(result["rows"], ["method", "ms_per_step", "images_per_s", "work_gflop", "time_ratio",
                                        "work_ratio", "time_over_work"])
    for m, why in result["skipped"].items():
        print(f"skipped {m}: {why}")
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
