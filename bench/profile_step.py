"""Benchmark 0c: where the training step's time goes, read from TensorFlow's profiler (issue 19).

    python bench/profile_step.py [--quick] [--size 128] [--methods supervised,mean_teacher]
                                 [--precisions float32,mixed_bfloat16] [--serial] [--trace DIR]

semiseg's own loop in the setup of step_vs_yardstick.py (U-Net 16-256, leaky ReLU, BN, 4 labelled
+ 4 unlabelled, memory feed, steps_per_loop 10) runs `calls` loop calls under `tf.profiler`. The
XSpace file the profiler writes (what TensorBoard's profile tab and xprof show; kept with --trace)
is read back with the protobuf module TensorFlow ships, and every executed op is put in a phase by
its graph name:

  backward : ops under `gradient_tape/` (the gradients of the loss)
  update   : the optimizer's ops (its name scope, e.g. `adam/`) and gradient clipping
  forward  : everything else inside the step: the networks in training mode and the losses
             (for Mean Teacher also the teacher's forward and the EMA update)

Figures per optimizer step: op time per phase (summed over TF's inter-op threads, so it can exceed
the wall time), backward / forward and (backward + update) / forward, the share of the top op
types, and the step's wall time split into "busy" (the union of all op intervals) and "idle" (no
op running: Python, function dispatch, the while loop's bookkeeping, waiting on the input
iterator): the host overhead the issue asks about.

The profiler adds a fixed cost to each op, which weighs most on small ones: shares, not absolute
milliseconds, are the figures to read; the step time measured without the profiler is given beside
them. TF runs independent ops at the same time (inter-op threads), and two convolutions that share
the cores each take longer than alone, so op time then overstates what a phase costs. --serial
runs one op at a time (inter-op parallelism 1, each op still on every core): the per-phase costs
(e.g. backward / forward) are read there, the step's wall time with the default.
--quick: 64x64, supervised only, float32.
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402
from step_vs_yardstick import step_trainer  # noqa: E402

TOP = 12                    # op types listed per profile
STEPS_PER_LOOP = 10         # optimizer steps per traced call of the loop

# Prefixes TF puts in front of the graph names of ops run inside nested functions and while loops.
_WRAPPERS = re.compile(r"(while/body/_\d+/)?(while/)?(StatefulPartitionedCall/|PartitionedCall/)+")


def phase_of(op_name: str, optimizer: str) -> str:
    """backward / update / forward for one executed op's graph name (wrappers stripped)."""
    name = _WRAPPERS.sub("", op_name)
    if "gradient_tape/" in name:
        return "backward"
    head = name.split("/", 1)[0]
    if head == optimizer or head.startswith(("clip_by_global_norm", "global_norm")):
        return "update"
    return "forward"


def op_events(xspace):
    """(name, type, start ps, duration ps) of every op executed on TF's CPU compute threads.

    On the CPU, the host plane holds one line per inter-op thread (`tf_Compute/...`); an op's event is
    named "graph name:op type". TF's own trace events there (ExecutorState::Process, the thread
    pool's ThreadpoolListener::Record, ...) are C++ names with "::", which graph names never have."""
    for plane in xspace.planes:
        if not plane.name.startswith("/host:"):
            continue
        for line in plane.lines:
            if not line.name.startswith("tf_Compute"):
                continue
            base = line.timestamp_ns * 1000
            for e in line.events:
                label = plane.event_metadata[e.metadata_id].name
                name, sep, op_type = label.rpartition(":")
                if not sep or not op_type or "::" in label:
                    continue
                yield name, op_type, base + e.offset_ps, e.duration_ps


def loop_calls(xspace, function: str = "loop") -> list[tuple]:
    """(start ps, duration ps) of each traced call of the training loop's tf.function, from the
    Python thread's line."""
    calls = []
    for plane in xspace.planes:
        for line in plane.lines:
            if line.name != "python":
                continue
            base = line.timestamp_ns * 1000
            for e in line.events:
                if plane.event_metadata[e.metadata_id].name == function:
                    calls.append((base + e.offset_ps, e.duration_ps))
    return calls


def union_ps(intervals) -> int:
    """Total length of the union of (start, duration) intervals."""
    total, end = 0, None
    for start, dur in sorted(intervals):
        stop = start + dur
        if end is None or start > end:
            total += dur
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total


def breakdown(xspace, optimizer: str, steps: int) -> dict:
    """The step's time by phase and op type, and its busy / idle split (ms per optimizer step)."""
    calls = loop_calls(xspace)
    if not calls:
        raise RuntimeError("the profile holds no call of the training loop (was the profiler running?)")
    windows = [(s, s + d) for s, d in calls]
    per_phase, per_type, intervals = collections.Counter(), collections.Counter(), []
    for name, op_type, start, dur in op_events(xspace):
        if not any(lo <= start < hi for lo, hi in windows):
            continue            # an op outside the loop calls (the warm-up's tail, the metrics' read-out)
        per_phase[phase_of(name, optimizer)] += dur
        per_type[op_type] += dur
        intervals.append((start, dur))
    if not intervals:
        raise RuntimeError("the profile holds no op events on the tf_Compute threads")
    ms = lambda ps: round(ps / 1e9 / steps, 3)  # noqa: E731
    wall = sum(d for _, d in calls)
    busy = union_ps(intervals)
    op_total = sum(per_type.values())
    fwd = per_phase["forward"]
    return {
        "wall_ms": ms(wall), "busy_ms": ms(busy), "idle_ms": ms(wall - busy),
        "idle_share": round((wall - busy) / wall, 4),
        "op_ms": {p: ms(per_phase[p]) for p in ("forward", "backward", "update")},
        "backward_over_forward": round(per_phase["backward"] / fwd, 3) if fwd else None,
        "backward_update_over_forward": round((per_phase["backward"] + per_phase["update"]) / fwd, 3) if fwd else None,
        "top_op_types": [{"op": t, "share": round(v / op_total, 4), "ms": ms(v)} for t, v in per_type.most_common(TOP)],
    }


def read_xspace(logdir: Path):
    from tensorflow.tsl.profiler.protobuf import xplane_pb2     # shipped with TensorFlow
    files = sorted(logdir.rglob("*.xplane.pb"), key=lambda p: p.stat().st_mtime)
    if not files:
        raise RuntimeError(f"tf.profiler wrote no .xplane.pb under {logdir}")
    xspace = xplane_pb2.XSpace()
    xspace.ParseFromString(files[-1].read_bytes())
    return xspace


def profile(method: str, policy: str, size: int, calls: int, logdir: Path, sets=()) -> dict:
    import tensorflow as tf
    trainer = step_trainer(method, policy, size, STEPS_PER_LOOP, sets)
    timer = common.loop_timer(trainer, "memory", warmup_calls=2)
    untraced = [timer() for _ in range(calls)]
    shutil.rmtree(logdir, ignore_errors=True)
    tf.profiler.experimental.start(str(logdir))
    try:
        for _ in range(calls):
            timer()
    finally:
        tf.profiler.experimental.stop()
    optimizer = getattr(trainer.optimizer, "inner_optimizer", trainer.optimizer).name
    row = breakdown(read_xspace(logdir), optimizer, calls * STEPS_PER_LOOP)
    return {"method": method, "policy": policy,
            "untraced_ms_per_step": round(sorted(w for w, _ in untraced)[len(untraced) // 2], 2), **row}


def run(quick: bool, size: int = 0, methods=None, precisions=None, trace: str | None = None, sets=(),
        serial: bool = False) -> dict:
    os.environ.setdefault("SEMISEG_CACHE", str(Path(tempfile.gettempdir()) / "semiseg-bench-cache"))
    import tensorflow as tf
    if serial:      # before TF's runtime starts (the first op)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    from semiseg import precision
    size = size or (64 if quick else 128)
    calls = 2 if quick else 3
    methods = methods or (["supervised"] if quick else ["supervised", "mean_teacher"])
    auto, why = precision.resolve("auto")
    if not precisions:
        precisions = ["float32"] + (["mixed_bfloat16"] if auto == "mixed_bfloat16" and not quick else [])
    root = Path(trace) if trace else Path(tempfile.mkdtemp(prefix="semiseg-profile-"))
    result = {"machine": common.machine_info(), "quick": quick, "image_size": size, "calls": calls, "sets": list(sets),
              "serial": serial,
              "steps_per_call": STEPS_PER_LOOP, "auto_precision": auto, "auto_reason": why, "rows": []}
    try:
        for method in methods:
            for policy in precisions:
                t0 = time.time()
                row = profile(method, policy, size, calls, root / f"{method}-{policy}", sets)
                row["seconds"] = round(time.time() - t0, 1)
                result["rows"].append(row)
    finally:
        if not trace:
            shutil.rmtree(root, ignore_errors=True)
    result["load_avg_end"] = common.load()
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    common.add_step_arguments(parser)
    parser.add_argument("--precisions", default="", help="comma-separated (default: float32, and mixed_bfloat16 "
                                                         "where train.precision=auto picks it; --quick: float32)")
    parser.add_argument("--trace", default=None, help="keep the profiler's files here (one folder per row) "
                                                      "for TensorBoard's profile tab; default: a temporary folder")
    parser.add_argument("--serial", action="store_true", help="one op at a time (inter-op parallelism 1): "
                                                               "per-phase costs without two ops sharing the cores")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE",
                        help="extra config overrides, e.g. train.fused_update=false")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results_profile_step.json"))
    args = parser.parse_args(argv)
    common.use_repo(args.repo)
    split = lambda s: [x for x in s.split(",") if x] or None  # noqa: E731
    result = run(args.quick, args.size, split(args.methods), split(args.precisions), args.trace, args.set,
                 args.serial)
    for r in result["rows"]:
        print(f"\n[{r['method']} {r['policy']} {result['image_size']}px{' serial' if result['serial'] else ''}] step {r['untraced_ms_per_step']} ms "
              f"untraced, {r['wall_ms']} ms traced: busy {r['busy_ms']} ms, idle {r['idle_ms']} ms "
              f"({r['idle_share']:.1%}); op time forward {r['op_ms']['forward']} / backward "
              f"{r['op_ms']['backward']} / update {r['op_ms']['update']} ms: backward x{r['backward_over_forward']}, "
              f"backward+update x{r['backward_update_over_forward']} the forward")
        common.print_table(r["top_op_types"], ["op", "share", "ms"])
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
