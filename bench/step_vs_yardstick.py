"""Benchmark 0: semiseg's supervised and Mean Teacher steps vs the plain yardstick, side by side.

    python bench/step_vs_yardstick.py [--quick] [--out bench/results_step_vs_yardstick.json]

The yardstick (`plain_step.py`, found as bench/common.py says) is a Mean Teacher / supervised step written as
plainly as TF allows on a 1.9M-parameter U-Net (16-256 channels, conv+BN+LeakyReLU(0.01)),
128x128 (32x32 with --quick), 4 labeled + 4 unlabeled, trained on one fixed tensor. semiseg runs the same shape through
its real Trainer loop (strategy, config, clipping, EMA, logs), with `--set` overrides only:
  memory: the loop fed one repeated in-memory batch (no input pipeline, like the yardstick)
  cache : the loop fed by the real tf.data stream (slice cache + weak augmentation)
at steps_per_loop 1 and 10, float32 and mixed_bfloat16. The yardstick's own `step` is loaded in this
process (runpy of plain_step.py) so that candidates run in interleaved rounds; the figures are
median(semiseg) / median(yardstick) in wall time and in this process's CPU time per step (the
latter is less inflated by other processes on a shared machine). Outside --quick the yardstick also
runs as a subprocess once per case and its own JSON is recorded next to them.
Ablations (steps_per_loop 1, clip_norm=0, SGD instead of Adam, Mean Teacher without EMA) say where
a gap above 5% comes from.
Known differences, kept on purpose: semiseg uses Adam (yardstick SGD+momentum), no conv bias before
BN, the teacher in inference mode (yardstick: batch-statistics mode), independent noise per view.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import common  # noqa: E402

UNET_SETS = ["data.synthetic_cases=48",
             "data.labeled_fraction=0.25", "model.base_filters=16", "model.depth=4",
             "model.activation=leaky_relu", "model.dropout=0", "model.batchnorm=true",
             "train.batch_size=4", "train.unlabeled_ratio=1", "train.steps_per_epoch=1000", "train.epochs=100"]


def yardstick_subprocess(policy: str, supervised: bool, steps: int, warmup: int, size: int) -> dict:
    args = [str(common.yardstick("plain_step.py")), "--size", str(size), "--batch", "8", "--labeled", "4",
            "--policy", policy, "--steps", str(steps), "--warmup", str(warmup)]
    if supervised:
        args.append("--supervised")
    return common.run_json_script(args)


# The yardstick's teacher sees the unlabelled half only; semiseg's default (the paper's) applies the
# consistency to labelled images too, 8 teacher images instead of 4: 14% more work per step (student
# 3 x 8 + teacher 8 = 32 vs 28 forward-image units). Compared on equal work here.
MT_SETS = ["mean_teacher.consistency_on_labeled=false"]


def step_trainer(method: str, policy: str, size: int, spl: int, extra=()):
    """semiseg's Trainer for the yardstick's setup (UNET_SETS, Mean Teacher on equal work) at `size`,
    `policy` and steps_per_loop `spl`, with `extra` overrides; shared by the step benchmarks."""
    extra = (MT_SETS if method == "mean_teacher" else []) + list(extra)
    return common.build_trainer(method, UNET_SETS + [f"data.image_size={size}", f"data.synthetic_size={size}",
                                                     f"train.precision={policy}", f"train.steps_per_loop={spl}",
                                                     *extra])


def semiseg(method: str, policy: str, spl: int, data: str, size: int, extra=(), calls: int = 1,
            no_ema: bool = False, warmup_calls: int = 2):
    trainer = step_trainer(method, policy, size, spl, extra)
    if no_ema:
        trainer.on_step_end = lambda step: None
    return common.loop_timer(trainer, data, warmup_calls=warmup_calls, calls=calls)


def registered(method: str) -> bool:
    from semiseg.methods import get_method
    try:
        get_method(method)
        return True
    except ValueError:
        return False


FEEDS = ("memory", "cache")


def run(quick: bool, policies=("float32", "mixed_bfloat16"), size: int = 0, ablations: bool | None = None,
        feeds=FEEDS) -> dict:
    """Quick: 32x32 (the yardstick takes --size), memory feed, 3 rounds, no ablations: a regression
    check of the per-step framework cost, which weighs most at small sizes; full: 128x128, 5 rounds."""
    os.environ.setdefault("SEMISEG_CACHE", str(Path(tempfile.gettempdir()) / "semiseg-bench-cache"))
    rounds = 3 if quick else 5
    size = size or (32 if quick else 128)
    feeds = ("memory",) if quick and feeds == FEEDS else feeds
    ablations = (not quick) if ablations is None else ablations
    warm = 1 if quick else 2
    methods = ["supervised"] + (["mean_teacher"] if registered("mean_teacher") else [])
    notes = [] if "mean_teacher" in methods else [
        "mean_teacher is not registered in this checkout: supervised step only"]
    result = {"machine": common.machine_info(), "quick": quick, "image_size": size, "batch_labeled": 4,
              "batch_unlabeled": 4, "rounds": rounds, "notes": notes, "by_policy": {}}
    for policy in policies:
        cands = {}
        for method in methods:
            cands["yardstick_" + method] = common.yardstick_in_process(policy, method == "supervised", size=size)
            for feed in feeds:
                cands[f"{method}_spl10_{feed}"] = semiseg(method, policy, 10, feed, size, warmup_calls=warm)
            if ablations:
                cands[f"{method}_spl1_memory"] = semiseg(method, policy, 1, "memory", size, calls=5)
                cands[f"{method}_spl10_memory_noclip"] = semiseg(method, policy, 10, "memory", size,
                                                                 ["train.clip_norm=0"])
                cands[f"{method}_spl10_memory_sgd"] = semiseg(method, policy, 10, "memory", size,
                                                              ["train.optimizer=sgd", "train.lr=0.01"])
                if method == "mean_teacher":
                    cands[f"{method}_spl10_memory_noema"] = semiseg(method, policy, 10, "memory", size,
                                                                    no_ema=True)
        timed = common.interleaved(cands, rounds)
        rows = []
        for name, t in timed.items():
            if name.startswith("_"):
                continue
            method = name.split("_spl")[0] if not name.startswith("yardstick_") else name[len("yardstick_"):]
            ref = timed["yardstick_" + method]["median"]
            cpu_ref = timed["yardstick_" + method]["cpu_median"]
            rows.append({"candidate": name, "ms_per_step": t["median"], "all_ms": t["all"],
                         "ratio_vs_yardstick": round(t["median"] / ref, 3), "cpu_ms_per_step": t["cpu_median"],
                         "cpu_ratio_vs_yardstick": round(t["cpu_median"] / cpu_ref, 3)})
        block = {"rows": rows, "load_avg_1min": timed["_load_avg_1min"], "diagnosis": diagnose(timed, methods)}
        if not quick:
            block["yardstick_subprocess"] = {m: yardstick_subprocess(policy, m == "supervised", 10, 3, size)
                                             for m in methods}
            block["yardstick_subprocess_load_avg"] = common.load()
        result["by_policy"][policy] = block
    return result


def diagnose(timed: dict, methods: list[str]) -> list[str]:
    """Name what each ablation saves, for any method whose memory-fed step is >5% slower."""
    out = []
    for m in methods:
        ref = timed["yardstick_" + m]["median"]
        cpu_ref = timed["yardstick_" + m]["cpu_median"]
        for variant in ("spl10_memory", "spl10_cache"):
            ms = timed.get(f"{m}_{variant}", {}).get("median")
            if ms is None:
                continue
            gap = ms / ref - 1
            cpu_gap = timed[f"{m}_{variant}"]["cpu_median"] / cpu_ref - 1
            verdict = "within 5%" if gap <= 0.05 else "SLOWER by more than 5%"
            out.append(f"{m} {variant}: {ms:.1f} ms vs yardstick {ref:.1f} ms ({gap:+.1%} wall, "
                       f"{cpu_gap:+.1%} CPU time; {verdict})")
        if f"{m}_spl10_memory" not in timed:
            continue
        base = timed[f"{m}_spl10_memory"]["median"]
        for key, what in (("spl10_cache", "tf.data input pipeline (cache read + augmentation on the same cores)"),
                          ("spl1_memory", "one tf.function call per step instead of 10 (Python/dispatch)"),
                          ("spl10_memory_noclip", "global-norm gradient clipping (saved by clip_norm=0)"),
                          ("spl10_memory_sgd", "Adam instead of the yardstick's SGD+momentum (saved by train.optimizer=sgd)"),
                          ("spl10_memory_noema", "EMA teacher update (saved without it)")):
            if f"{m}_{key}" in timed:
                d = timed[f"{m}_{key}"]["median"] - base
                if key in ("spl10_memory_noclip", "spl10_memory_noema", "spl10_memory_sgd"):
                    d = -d
                out.append(f"{m}: {what}: {d:+.1f} ms/step")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repo", default=None, help="semiseg checkout to benchmark (default: this one)")
    parser.add_argument("--policies", default="float32,mixed_bfloat16")
    parser.add_argument("--size", type=int, default=0, help="image size (default 32 with --quick, else 128)")
    parser.add_argument("--ablations", choices=["auto", "on", "off"], default="auto",
                        help="time the diagnosis variants (default: off with --quick)")
    parser.add_argument("--feeds", default=",".join(FEEDS),
                        help="memory (one repeated batch) and/or cache (tf.data); --quick: memory only")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results_step_vs_yardstick.json"))
    args = parser.parse_args(argv)
    common.use_repo(args.repo)
    ablations = {"auto": None, "on": True, "off": False}[args.ablations]
    result = run(args.quick, tuple(args.policies.split(",")), args.size, ablations, tuple(args.feeds.split(",")))
    for policy, block in result["by_policy"].items():
        print(f"\n[{policy}] load {block['load_avg_1min']}")
        common.print_table(block["rows"], ["candidate", "ms_per_step", "ratio_vs_yardstick", "cpu_ms_per_step",
                                           "cpu_ratio_vs_yardstick"])
        print("\n".join("  " + d for d in block["diagnosis"]))
    print("\n".join(result["notes"]))
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
