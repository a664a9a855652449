"""Shared pieces of the benchmarks: the checkout to benchmark, machine description, interleaved timing,
a Trainer built as `main.py train` builds it, and JSON/table output.

    python bench/common.py          # prints the machine description the benchmarks record

Ratios are the figures to trust on a shared machine: every benchmark times its candidates in
interleaved rounds (A, B, A, B, ...) in one run and reports medians, and records the load average
next to each result, so a reader can see how busy the cores were.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
BENCH_DIR = Path(__file__).resolve().parent
REPO = BENCH_DIR.parent
# The yardsticks (plain_step.py: a Mean Teacher / supervised step written as plainly as TF allows;
# matmul_peak.py: the machine's matmul GFLOP/s) are reference scripts kept outside this repository.
# Benchmarks 0 and 6 look for them in $SEMISEG_YARDSTICKS, else in a `shared/yardsticks` folder beside
# the checkout, and stop with a message when the folder is not there (`yardstick(name)`).
YARDSTICKS = Path(os.environ.get("SEMISEG_YARDSTICKS", REPO.parent / "shared" / "yardsticks"))


def yardstick(name: str) -> Path:
    """Path of a yardstick script, or exit naming where it was looked for."""
    path = YARDSTICKS / name
    if not path.exists():
        sys.exit(f"yardstick {name} not found in {YARDSTICKS}: set SEMISEG_YARDSTICKS to the folder "
                 f"holding plain_step.py and matmul_peak.py (benchmarks 0 and 6 need them)")
    return path


def use_repo(path: str | None = None) -> Path:
    """The semiseg checkout to benchmark (default: this one, importable after `pip install -e .`).
    Another checkout: this script runs again with that checkout first on PYTHONPATH, so its
    `semiseg` package is the one imported (an installed copy comes later on the path)."""
    root = Path(path).resolve() if path else REPO
    if root != REPO and os.environ.get("SEMISEG_BENCH_REPO") != str(root):
        paths = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
        env = {**os.environ, "SEMISEG_BENCH_REPO": str(root), "PYTHONPATH": os.pathsep.join(paths)}
        os.execve(sys.executable, [sys.executable, *sys.argv], env)
    return root


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        flags = next((l for l in Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("flags")), "")
    except OSError:
        flags = ""
    return {"cpu": model, "cores": os.cpu_count(), "avx512_bf16": "avx512_bf16" in flags,
            "host": platform.node(), "python": platform.python_version(), "load_avg": load(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}


def interleaved(candidates: dict, rounds: int) -> dict:
    """Call every candidate once (not recorded), then once per round, in turn, `rounds` times. Each candidate returns one
    measurement (ms per step); returns {name: {"median": m, "all": [...]}} plus the load average.
    Interleaving spreads a burst of load from other processes over all candidates alike.
    A candidate may return (wall_ms, cpu_ms): CPU time of this process (all its threads) per
    step, which other processes' load inflates far less than wall time."""
    # One unrecorded round first: a candidate's first call after the others were built and traced
    # ran 3-6x slower than its later ones here (cold caches, thread pools spinning up), and with 2-3
    # rounds that one call moved the median.
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    loads = []
    for _ in range(rounds):
        for name, fn in candidates.items():
            times[name].append(fn())
        loads.append(os.getloadavg()[0])
    out = {}
    for name, v in times.items():
        wall = [x[0] if isinstance(x, tuple) else x for x in v]
        out[name] = {"median": round(statistics.median(wall), 2), "all": [round(x, 2) for x in wall]}
        if isinstance(v[0], tuple):
            out[name]["cpu_median"] = round(statistics.median(x[1] for x in v), 2)
    out["_load_avg_1min"] = [round(v, 2) for v in loads]
    return out


def add_step_arguments(parser) -> None:
    """--quick, --repo, --size, --methods: the options of the benchmarks that time semiseg's step at one
    image size for a list of methods (step_ablations.py, profile_step.py)."""
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repo", default=None, help="semiseg checkout to benchmark (default: this one)")
    parser.add_argument("--size", type=int, default=0, help="image size (default 64 with --quick, else 128)")
    parser.add_argument("--methods", default="", help="comma-separated (default: supervised with --quick, "
                                                      "else supervised,mean_teacher)")


def build_trainer(method: str, overrides: list[str], preset: str = ""):
    """A Trainer built the way `main.py train` builds it (strategy first, policy, seed, data),
    without a run folder. Raises ValueError if `method` is not registered."""
    from semiseg import config
    cfg = config.resolve(preset, "", overrides, method)
    return trainer_for(cfg, cfg.train.distribution)


def trainer_for(cfg, distribution: str, run_dir=None):
    """The Trainer of a resolved config (its method), built in `main.py train`'s order: strategy,
    precision policy, seed, data; with `run_dir`, on that run's saved splits."""
    from semiseg.training import distribute
    strategy, info = distribute.make_strategy(distribution)
    import keras
    from semiseg.data import loader as data_loader_tf2
    from semiseg.methods import get_method
    method_cls = get_method(cfg.method)
    from semiseg import precision
    keras.mixed_precision.set_global_policy(precision.resolve(cfg.train.precision)[0])
    keras.utils.set_random_seed(cfg.seed)
    bundle = data_loader_tf2.prepare_data(cfg, run_dir, log=lambda m: None, progress=False)
    return method_cls(cfg, bundle, strategy, info, log=lambda m: None)


def memory_iterators(trainer):
    """Iterators that repeat one fixed in-memory batch: the step without any input pipeline cost
    (the yardstick's setting: it trains on one tensor)."""
    import tensorflow as tf
    size, ch = trainer.data.image_size, trainer.data.channels
    b = trainer.per_replica_batch
    ub = b * trainer.cfg.train.unlabeled_ratio
    x = tf.random.uniform([b, size, size, ch], seed=1)
    y = tf.cast(tf.random.uniform([b, size, size, 1], seed=2) > 0.5, tf.float32)
    u = tf.random.uniform([ub, size, size, ch], seed=3)
    lab = trainer.strategy.distribute_datasets_from_function(
        lambda ctx: tf.data.Dataset.from_tensors((x, y)).repeat())
    unl = None
    if trainer.uses_unlabeled:
        unl = iter(trainer.strategy.distribute_datasets_from_function(
            lambda ctx: tf.data.Dataset.from_tensors(u).repeat()))
    return iter(lab), unl


def loop_timer(trainer, data: str = "memory", warmup_calls: int = 2, calls: int = 1):
    """A function returning (wall ms, CPU ms) per optimizer step of the Trainer's own loop (steps_per_loop steps
    per tf.function call), after `warmup_calls` calls that trace and warm the pipeline."""
    import tensorflow as tf
    its = memory_iterators(trainer) if data == "memory" else trainer._iterators(0)
    loop = trainer._make_loop(*its)
    n = trainer.cfg.train.steps_per_loop
    n_t = tf.constant(n)
    for _ in range(warmup_calls):
        float(loop(n_t)["loss"])

    def measure() -> tuple:
        ts, cs = [], []
        for _ in range(calls):
            t0, c0 = time.perf_counter(), time.process_time()
            float(loop(n_t)["loss"])           # the float() waits for the step to finish
            ts.append((time.perf_counter() - t0) / n)
            cs.append((time.process_time() - c0) / n)
        return statistics.median(ts) * 1e3, statistics.median(cs) * 1e3
    return measure


def yardstick_in_process(policy: str, supervised: bool, labeled: int = 4, batch: int = 8, size: int = 128):
    """The yardstick's own `step` function, loaded by running plain_step.py in this process
    (runpy, one warm-up step): timed like semiseg's loop, interleaved, wall and CPU time."""
    import runpy
    argv = sys.argv
    sys.argv = ["plain_step.py", "--size", str(size), "--batch", str(batch), "--labeled", str(labeled),
                "--policy", policy, "--steps", "1", "--warmup", "1"] + (["--supervised"] if supervised else [])
    try:
        import contextlib
        import io
        with contextlib.redirect_stdout(io.StringIO()):
            step = runpy.run_path(str(yardstick("plain_step.py")))["step"]
    finally:
        sys.argv = argv

    def measure(steps: int = 5) -> tuple:
        t0, c0 = time.perf_counter(), time.process_time()
        for _ in range(steps):
            float(step())
        return (time.perf_counter() - t0) / steps * 1e3, (time.process_time() - c0) / steps * 1e3
    return measure


def run_json_script(args: list[str], timeout: float = 600) -> dict:
    """Run a Python script that prints one JSON object on its last stdout line."""
    import subprocess
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed ({proc.returncode}): {proc.stderr[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def write_json(path, payload: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(payload, indent=1))
    tmp.replace(path)


def print_table(rows: list[dict], columns: list[str]) -> None:
    widths = {c: max(len(c), *(len(_fmt(r.get(c))) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(_fmt(r.get(c)).ljust(widths[c]) for c in columns))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 100 else f"{v:.1f}"
    return "-" if v is None else str(v)


if __name__ == "__main__":
    print(json.dumps(machine_info(), indent=1))
