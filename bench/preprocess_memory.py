"""Benchmark: peak memory and speed of `main.py preprocess` on 10 and 40 synthetic CT volumes.

    python bench/preprocess_memory.py [--shape 96 96 32] [--out bench/preprocess_memory.json]

Each configuration runs in a fresh child process (its own TensorFlow import, its own empty cache),
which runs the preprocess in-process and reports its peak RSS (resource.getrusage: ru_maxrss of
itself and of its reaped worker processes, the largest one). Peak memory must not grow with the
number of cases: every worker holds one case at a time and writes it to disk straight away.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def child(data: str, cache: str, workers: int, image_size: int) -> None:
    os.environ["SEMISEG_CACHE"] = cache
    from semiseg import cli as main
    from semiseg.data import cache as slice_cache
    t0 = time.time()
    rc = main.main(["preprocess", "--data", data, "--format", "msd", "--workers", str(workers), "--no-progress",
                    "--set", f"data.image_size={image_size}"])
    seconds = time.time() - t0
    (built,) = [p for p in Path(cache).iterdir() if p.is_dir()]
    manifest = slice_cache.load_manifest(built)
    print("RESULT " + json.dumps({
        "rc": rc, "seconds_total": round(seconds, 2), "seconds_build": manifest["build_seconds"],
        "n_cases": len(manifest["cases"]), "n_slices": manifest["n_slices"], "workers_used": manifest["workers"],
        # ru_maxrss is in KiB on Linux.
        "peak_rss_main_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "peak_rss_worker_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1)}), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=[96, 96, 32])
    parser.add_argument("--image-size", type=int, default=96)
    parser.add_argument("--counts", type=int, nargs="+", default=[10, 40])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--out", default=str(REPO / "bench" / "preprocess_memory.json"))
    parser.add_argument("--child", nargs=4, metavar=("DATA", "CACHE", "WORKERS", "SIZE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(args.child[0], args.child[1], int(args.child[2]), int(args.child[3]))
        return 0
    from semiseg.data import synthetic as synthetic_data
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.counts:
            data = Path(tmp) / f"vol{count}"
            synthetic_data.generate_3d(data, n_cases=count, shape=tuple(args.shape), n_test=0)
            for workers in args.workers:
                cache = Path(tmp) / f"cache{count}-{workers}"
                cache.mkdir()
                env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "SEMISEG_WORKERS": str(workers)}
                proc = subprocess.run([sys.executable, __file__, "--child", str(data), str(cache), str(workers),
                                       str(args.image_size)], capture_output=True, text=True, env=env)
                line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not line:
                    print(proc.stdout[-2000:], proc.stderr[-2000:], file=sys.stderr)
                    return 1
                row = {"volumes": count, "workers": workers, **json.loads(line[0][7:])}
                row["volumes_per_s_build"] = round(count / row["seconds_build"], 2)
                rows.append(row)
                print(f"{count:>3} volumes  {workers} workers: peak RSS main {row['peak_rss_main_mib']:7.1f} MiB, "
                      f"worker {row['peak_rss_worker_mib']:7.1f} MiB; build {row['seconds_build']:6.1f} s "
                      f"({row['volumes_per_s_build']:.2f} volumes/s), total {row['seconds_total']:.1f} s", flush=True)
    # Marginal speed between the smallest and largest count: start-up (TensorFlow imports in each
    # worker, the check pass) cancels out, leaving the per-volume cost.
    marginal = {}
    for workers in args.workers:
        mine = sorted((r for r in rows if r["workers"] == workers), key=lambda r: r["volumes"])
        if len(mine) >= 2 and mine[-1]["seconds_build"] > mine[0]["seconds_build"]:
            marginal[workers] = round((mine[-1]["volumes"] - mine[0]["volumes"])
                                      / (mine[-1]["seconds_build"] - mine[0]["seconds_build"]), 2)
            print(f"{workers} workers: {marginal[workers]} volumes/s marginal (start-up excluded)")
    payload = {"shape": args.shape, "image_size": args.image_size, "cpus": os.cpu_count(), "rows": rows,
               "marginal_volumes_per_s": marginal}
    Path(args.out).write_text(json.dumps(payload, indent=1))
    print(f"written: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
