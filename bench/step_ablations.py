"""Benchmark 0b: what each candidate change saves on the training step, one at a time (issue 19).

    python bench/step_ablations.py [--quick] [--size 128] [--methods supervised,mean_teacher]

semiseg's own loop (the Trainer's, memory feed, steps_per_loop 10, the U-Net of
step_vs_yardstick.py: 16-256 channels, leaky ReLU, BN, 4 labelled + 4 unlabelled) is timed as built
today ("base": fused BatchNorm, global-norm clipping on) and with one thing changed:

  keras_bn : Keras 3's BatchNormalization instead of the fused kernel (semiseg.models.fused_batchnorm)
  no_clip  : train.clip_norm=0 (clipping costs a global norm over all gradients each step)
  keras_update : train.fused_update=false, Keras' own optimizer update ops instead of one kernel
             per variable (semiseg.training.fused_optimizers)
  xla      : train.jit_compile=true (with --xla only: compiling takes minutes on 2 cores)
  auto     : train.precision=auto, i.e. what semiseg.precision picks on this machine, vs
             float32 (the same candidate as base when auto picks float32)

in float32 and, where bfloat16 is native (auto would pick it), mixed_bfloat16. Candidates run in
interleaved rounds in one process; each row gives the median ms/step (wall and CPU time of this
process), ms saved against base (positive: the change is faster) and a verdict, decided on CPU time,
which other processes on a shared machine inflate far less than wall time: fused BN (the fused
update) is "kept" if base beats keras_bn (keras_update) by more than the noise (2%), clipping is a
training setting and stays on (the row states its cost), XLA is "rejected" unless it saves more
than 2%. --quick: 64x64, supervised only, 3 rounds.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
from pathlib import Path

import common  # noqa: E402
from step_vs_yardstick import step_trainer  # noqa: E402

NOISE = 0.02      # a change must move the median by more than this to count
# Rows that swap one of semiseg's fused kernels back for Keras' own: (ours, theirs, what both share).
BACK_TO_KERAS = {"keras_bn": ("fused BN", "Keras BN", "same weights"),
                 "keras_update": ("fused update", "Keras' update", "same equations")}


def candidate(method: str, policy: str, size: int, extra=(), keras_bn: bool = False):
    from semiseg.models import fused_batchnorm
    with fused_batchnorm.keras_batchnorm() if keras_bn else contextlib.nullcontext():
        trainer = step_trainer(method, policy, size, 10, extra)
    return common.loop_timer(trainer, "memory", warmup_calls=1)


def verdict(change: str, saved_ms: float, base_ms: float) -> str:
    frac = saved_ms / base_ms
    if change in BACK_TO_KERAS:     # the row times going back to Keras' version: ours saves -saved_ms
        ours, theirs, same = BACK_TO_KERAS[change]
        return f"kept ({ours})" if -frac > NOISE else (f"rejected: {theirs} faster" if frac > NOISE else
                                                       f"within noise; fused kept ({same})")
    if change == "no_clip":
        return f"kept on (training setting; costs {saved_ms:.1f} ms/step)" if abs(frac) > NOISE else \
            "kept on (cost within noise)"
    if change == "auto":
        return "auto is float32 here" if saved_ms == 0 else f"auto: x{base_ms / (base_ms - saved_ms):.2f} vs float32"
    return "kept" if frac > NOISE else "rejected"


def run(quick: bool, size: int = 0, methods=None, xla: bool = False) -> dict:
    os.environ.setdefault("SEMISEG_CACHE", str(Path(tempfile.gettempdir()) / "semiseg-bench-cache"))
    from semiseg import precision
    size = size or (64 if quick else 128)
    rounds = 3 if quick else 5
    methods = methods or (["supervised"] if quick else ["supervised", "mean_teacher"])
    auto, why = precision.resolve("auto")
    policies = ["float32"] + (["mixed_bfloat16"] if auto == "mixed_bfloat16" else [])
    result = {"machine": common.machine_info(), "quick": quick, "image_size": size, "rounds": rounds,
              "auto_precision": auto, "auto_reason": why, "by_method": {}}
    for method in methods:
        cands = {}
        for policy in policies:
            cands[f"{policy}/base"] = candidate(method, policy, size)
            cands[f"{policy}/keras_bn"] = candidate(method, policy, size, keras_bn=True)
            cands[f"{policy}/no_clip"] = candidate(method, policy, size, ["train.clip_norm=0"])
            cands[f"{policy}/keras_update"] = candidate(method, policy, size, ["train.fused_update=false"])
            if xla:
                cands[f"{policy}/xla"] = candidate(method, policy, size, ["train.jit_compile=true"])
        timed = common.interleaved(cands, rounds)
        rows = []
        for name, t in timed.items():
            if name.startswith("_"):
                continue
            policy, change = name.split("/")
            base = timed[f"{policy}/base"]["median"]
            row = {"candidate": name, "ms_per_step": t["median"], "all_ms": t["all"],
                   "cpu_ms_per_step": t["cpu_median"]}
            if change != "base":
                cpu_base = timed[f"{policy}/base"]["cpu_median"]
                row["ms_saved"] = round(base - t["median"], 2)
                row["cpu_ms_saved"] = round(cpu_base - t["cpu_median"], 2)
                row["verdict"] = verdict(change, row["cpu_ms_saved"], cpu_base)
            rows.append(row)
        key = f"{auto}/base" if f"{auto}/base" in timed else "float32/base"
        f32, auto_ms = timed["float32/base"]["median"], timed[key]["median"]
        cpu_f32, cpu_auto = timed["float32/base"]["cpu_median"], timed[key]["cpu_median"]
        rows.append({"candidate": f"auto ({auto})", "ms_per_step": auto_ms, "cpu_ms_per_step": cpu_auto,
                     "ms_saved": round(f32 - auto_ms, 2), "cpu_ms_saved": round(cpu_f32 - cpu_auto, 2),
                     "speedup_vs_float32": round(f32 / auto_ms, 3), "cpu_speedup_vs_float32": round(cpu_f32 / cpu_auto, 3),
                     "verdict": verdict("auto", round(cpu_f32 - cpu_auto, 2), cpu_f32)})
        result["by_method"][method] = {"rows": rows, "load_avg_1min": timed["_load_avg_1min"]}
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_step_arguments(parser)
    parser.add_argument("--xla", action="store_true", help="also time train.jit_compile=true")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results_step_ablations.json"))
    args = parser.parse_args(argv)
    common.use_repo(args.repo)
    result = run(args.quick, args.size, [m for m in args.methods.split(",") if m] or None, args.xla)
    print(f"auto -> {result['auto_precision']} ({result['auto_reason']})")
    for method, block in result["by_method"].items():
        print(f"\n[{method} {result['image_size']}px] load {block['load_avg_1min']}")
        common.print_table(block["rows"], ["candidate", "ms_per_step", "cpu_ms_per_step", "ms_saved", "cpu_ms_saved",
                                           "verdict"])
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
