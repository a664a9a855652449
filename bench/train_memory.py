"""Benchmark 5: peak resident memory of a smoke-sized training run, small vs 4x larger data set.

    python bench/train_memory.py [--quick] [--out bench/results_train_memory.json]

Each size is prepared first in its own process (`main.py preprocess`: the slice cache), then
`main.py train --preset smoke` runs in a child process whose peak RSS (ru_maxrss from wait4, that
child alone) is the figure. Goal: 4x the data within 10% of the memory (training streams the cache;
it does not load the data set). With the `msd` source available (branch `data`), the data are
synthetic CT volumes (`synthetic_data.generate_3d`, 10 vs 40 volumes); otherwise the embedded 2D
synthetic set with 40 vs 160 cases, and the result says so.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import common  # noqa: E402


def msd_available(repo: Path) -> bool:
    # The checkout may predate the semiseg package (bench --repo OTHER compares checkouts).
    code = ("try:\n    from semiseg.data import sources as d\nexcept ImportError:\n    import data_sources as d\n"
            "d.get_source('msd')")
    return subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True).returncode == 0


def peak_rss_mb(cmd: list[str], cwd: Path, env: dict) -> tuple[float, int]:
    """(peak RSS of the child in MiB, exit code), from the kernel's accounting of that child only."""
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    err = proc.stderr.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-800:]}")
    return usage.ru_maxrss / 1024.0, proc.returncode       # ru_maxrss is in KiB on Linux


def run(quick: bool, repo: Path) -> dict:
    work = Path(tempfile.mkdtemp(prefix="semiseg-bench-mem-"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "SEMISEG_CACHE": str(work / "cache")}
    steps = ["train.epochs=1", "train.steps_per_epoch=4"] if quick else ["train.epochs=2", "train.steps_per_epoch=10"]
    use_msd = msd_available(repo)
    sizes = (10, 40) if use_msd else (40, 160)
    rows = []
    for n in sizes:
        if use_msd:
            from semiseg.data import synthetic as synthetic_data
            data = work / f"msd{n}"
            synthetic_data.generate_3d(data, n_cases=n, shape=(64, 64, 24), n_test=2)
            data_args = ["--data", str(data), "--format", "msd"]
            sets = []
        else:
            data_args = []
            sets = [f"data.synthetic_cases={n}"]
        main = str(repo / "main.py")
        common_sets = ["--set", *sets, "data.image_size=32", *steps]
        subprocess.run([sys.executable, main, "preprocess", "--preset", "smoke", *data_args, *common_sets],
                       cwd=repo, env=env, check=True, capture_output=True)
        cmd = [sys.executable, main, "train", "--method", "supervised", "--preset", "smoke", *data_args,
               "--out", str(work / f"run{n}"), "--no-progress", *common_sets]
        rss, _ = peak_rss_mb(cmd, repo, env)
        rows.append({"cases": n, "peak_rss_mb": round(rss, 1), "load_avg": common.load()})
    shutil.rmtree(work, ignore_errors=True)
    growth = rows[1]["peak_rss_mb"] / rows[0]["peak_rss_mb"] - 1
    return {"machine": common.machine_info(), "quick": quick, "data": "msd volumes" if use_msd else "2D synthetic",
            "rows": rows, "growth": round(growth, 4), "goal_within_10pct": growth <= 0.10,
            "notes": [] if use_msd else ["msd source not in this checkout: 2D synthetic 40 vs 160 cases instead "
                                         "of 10 vs 40 volumes"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repo", default=None, help="semiseg checkout to benchmark (default: this one)")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results_train_memory.json"))
    args = parser.parse_args(argv)
    repo = common.use_repo(args.repo)
    result = run(args.quick, repo)
    common.print_table(result["rows"], ["cases", "peak_rss_mb"])
    print(f"growth {result['growth']:+.1%} ({result['data']}); goal within 10%: {result['goal_within_10pct']}")
    common.write_json(args.out, result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
