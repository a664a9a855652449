"""Run a function over chunks of cases in a pool of worker processes, with one progress bar over items.

    python main.py preprocess --data PATH --preset NAME --workers 4     # the slice cache is built through this

Workers are *spawned* (never forked): a forked copy of a process that already runs TensorFlow
threads can deadlock, and spawn behaves the same on Linux, macOS and clusters. A task may report
progress by calling the `tick` it receives (one call per finished item: a case); the parent moves
the bar. `workers <= 1` runs in this process, which tests and small data sets prefer (no start-up).
The chunks (`plan_chunks`) and the number of processes worth starting (`useful_workers`) are
decided here too, so that the checks and the slice cache work on the same chunks.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import queue as queue_module

_TICKS = None                         # the queue of this worker process, set by _init_worker
WORKER_BYTES = 16 * 2 ** 20          # input bytes that justify one more worker process


def available_cpus() -> int:
    """CPU cores this process may use (affinity mask / Slurm allocation, not the machine's total);
    $SEMISEG_WORKERS overrides (e.g. 1 on a shared login node)."""
    if os.environ.get("SEMISEG_WORKERS", "").isdigit():
        return max(1, int(os.environ["SEMISEG_WORKERS"]))
    if os.environ.get("SLURM_CPUS_PER_TASK", "").isdigit():
        return max(1, int(os.environ["SLURM_CPUS_PER_TASK"]))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


def _init_worker(ticks) -> None:
    global _TICKS
    _TICKS = ticks
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _tick() -> None:
    _TICKS.put(1)


def _run(fn_and_task):
    fn, task = fn_and_task
    return fn(task, _tick)


def run_tasks(fn, tasks: list, workers: int, total_items: int, desc: str, progress: bool = True) -> list:
    """[fn(task, tick) for task in tasks], in task order, on up to `workers` processes.

    `fn` must be a module-level function (it is pickled by name). The first exception raised by a
    task is re-raised here after the pool is stopped."""
    from semiseg.progress import progress_bar
    bar = progress_bar(total=total_items, desc=desc, unit="case", enabled=progress, leave=False)
    workers = max(1, min(int(workers), len(tasks)))
    try:
        if workers == 1:
            return [fn(task, lambda: bar.update(1)) for task in tasks]
        ctx = mp.get_context("spawn")
        ticks = ctx.Queue()
        with ctx.Pool(workers, initializer=_init_worker, initargs=(ticks,)) as pool:
            pending = [pool.apply_async(_run, ((fn, task),)) for task in tasks]
            while not all(r.ready() for r in pending):
                try:
                    ticks.get(timeout=0.2)
                    bar.update(1)
                except queue_module.Empty:
                    pass
                for r in pending:          # fail fast: stop the others on the first error
                    if r.ready() and not r.successful():
                        r.get()
            return [r.get() for r in pending]
    finally:
        bar.close()


def plan_chunks(cases: list) -> list[list]:
    """Cases grouped into chunks, each written to its own shard files by one worker. The grouping
    depends on the cases only, never on the number of workers, so every machine builds the same
    cache (same shards, same record order) and training streams stay reproducible."""
    chunks, current, weight = [], [], 0
    for case in cases:
        current.append(case)
        # ~4 volumes (tens of MB each at 256x256) or 64 pictures per chunk: shards of ~100 MB.
        weight += 16 if case.kind == "3d" else 1
        if weight >= 64:
            chunks.append(current)
            current, weight = [], 0
    if current:
        chunks.append(current)
    return chunks


def useful_workers(cases: list, chunks: list, workers: int = 0) -> int:
    """Processes worth starting, at most one per chunk: the request, or for 0 (auto) every
    available core but at most one per WORKER_BYTES of input files, since a spawned worker pays for
    its own imports (TensorFlow: seconds) and small data sets are faster in this process."""
    if workers > 0:
        return max(1, min(workers, len(chunks)))
    total = sum(os.path.getsize(p) for c in cases for p in (c.image, c.label) if p and os.path.exists(p))
    return max(1, min(available_cpus(), len(chunks), 1 + total // WORKER_BYTES))
