"""Run every benchmark, each in its own process, and fold their JSON into bench/results.json.

    python bench/run_all.py --quick                  # the regression-check suite (minutes)
    python bench/run_all.py                          # more rounds, 128x128 everywhere
    python bench/run_all.py --only step_vs_yardstick,machine_limit
    python bench/run_all.py --quick --readme         # also rewrite README.md's "Latest results"

Each benchmark is a script in bench/ that writes its own JSON (`--out`); a process each, because
Keras' dtype policy is global and a fresh TF runtime keeps one benchmark's threads and caches out
of the next. Scripts written elsewhere (mc_dropout.py, preprocess_memory.py) run if present; a
missing one, or one that fails, is recorded with the reason instead of stopping the suite.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import common  # noqa: E402

# In the order; numbers are the item numbers.
BENCHMARKS = [
    ("step_vs_yardstick", 0), ("step_ablations", "0b"), ("profile_step", "0c"), ("method_throughput", 1),
    ("pipeline_headroom", 2), ("mc_dropout", 3),
    ("preprocess_memory", 4), ("train_memory", 5), ("machine_limit", 6),
]


def run_benchmark(name: str, quick: bool, repo: str | None, tmp: Path) -> dict:
    script = common.BENCH_DIR / f"{name}.py"
    if not script.exists():
        return {"status": "missing", "reason": f"bench/{name}.py is not in this checkout"}
    out = tmp / f"{name}.json"
    cmd = [sys.executable, str(script), "--out", str(out)]
    source = script.read_text()
    if quick and '"--quick"' in source:
        cmd.append("--quick")
    if repo and '"--repo"' in source:
        cmd += ["--repo", repo]
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3"})
    seconds = round(time.time() - t0, 1)
    print(proc.stdout, end="", flush=True)
    if proc.returncode != 0 or not out.exists():
        return {"status": "failed", "seconds": seconds, "returncode": proc.returncode,
                "stderr_tail": proc.stderr[-1500:]}
    return {"status": "ok", "seconds": seconds, "result": json.loads(out.read_text())}


def summary_lines(results: dict) -> list[str]:
    """Markdown for README.md: the machine, then one table row per measured figure and its goal."""
    m = results["machine"]
    lines = [f"Run {m['date']} on `{m['host']}`: {m['cpu']}, {m['cores']} cores "
             f"(AVX512_BF16: {'yes' if m['avx512_bf16'] else 'no'}), load average at start {m['load_avg']}, "
             f"at end {results.get('load_avg_end')}; {'--quick' if results['quick'] else 'full'} suite, "
             f"{results.get('total_seconds')} s. {results['gpu']}.", "",
             "| benchmark | figure | measured | goal | met |", "|---|---|---|---|---|"]
    row = lambda *cells: lines.append("| " + " | ".join(str(c) for c in cells) + " |")  # noqa: E731
    for name, entry in results["benchmarks"].items():
        if entry["status"] != "ok":
            row(name, "-", entry["status"] + (": " + entry.get("reason", "") if entry.get("reason") else ""), "", "")
            continue
        r = entry["result"]
        if name == "step_vs_yardstick":
            for policy, block in r["by_policy"].items():
                for x in block["rows"]:
                    if x["candidate"].startswith("yardstick"):
                        row(name, f"{x['candidate']} {policy} {r['image_size']}px", f"{x['ms_per_step']} ms "
                            f"(CPU {x['cpu_ms_per_step']} ms)", "reference", "")
                    else:
                        row(name, f"{x['candidate']} {policy}", f"{x['ms_per_step']} ms; x{x['ratio_vs_yardstick']} "
                            f"wall, x{x['cpu_ratio_vs_yardstick']} CPU", "<= x1.05",
                            "yes" if x["ratio_vs_yardstick"] <= 1.05 else "no")
        elif name == "step_ablations":
            for method, block in r["by_method"].items():
                for x in block["rows"]:
                    if "verdict" in x:
                        row(name, f"{method} {r['image_size']}px {x['candidate']}",
                            f"{x['ms_per_step']} ms (CPU {x['cpu_ms_per_step']} ms); saved vs base "
                            f"{x['ms_saved']:+} ms wall, {x['cpu_ms_saved']:+} ms CPU", "ms saved",
                            x["verdict"])
        elif name == "profile_step":
            for x in r["rows"]:
                top = ", ".join(f"{t['op']} {t['share']:.0%}" for t in x["top_op_types"][:3])
                # Op time splits into phases fairly only with one op at a time (profile_step.py --serial).
                serial = r.get("serial", False)
                row(name, f"{x['method']} {x['policy']} {r['image_size']}px" + (" serial" if serial else ""),
                    f"op time forward {x['op_ms']['forward']} / backward {x['op_ms']['backward']} / update "
                    f"{x['op_ms']['update']} ms: backward+update x{x['backward_update_over_forward']} the forward; "
                    f"idle {x['idle_share']:.1%} of the step; top: {top}",
                    "backward+update <= x2.5" if serial else "where the time goes (phases: --serial)",
                    ("yes" if x["backward_update_over_forward"] <= 2.5 else "no") if serial else "")
        elif name == "method_throughput":
            for x in r["rows"]:
                ratio = (f"time x{x['time_ratio']} vs work x{x['work_ratio']}" if "time_ratio" in x
                         else f"work {x['work_gflop']} GFLOP/step")
                row(name, f"{x['method']} {r['image_size']}px", f"{x['ms_per_step']} ms, {x['images_per_s']} img/s; "
                    + ratio, "time/work within 15%",
                    {True: "yes", False: "no"}.get(x.get("goal_within_15pct"), "-"))
            for method in r["skipped"]:
                row(name, method, "skipped: not registered in this checkout", "", "")
        elif name == "pipeline_headroom":
            for x in r["rows"]:
                row(name, x["stream"], f"{x['pipeline_images_per_s']} img/s vs step {x['step_consumes_images_per_s']}"
                    f" img/s: x{x['headroom']}", ">= x5", "yes" if x["goal_5x_met"] else "no")
        elif name == "train_memory":
            a, b = r["rows"]
            row(name, f"peak RSS {a['cases']} vs {b['cases']} cases ({r['data']})",
                f"{a['peak_rss_mb']} vs {b['peak_rss_mb']} MiB ({r['growth']:+.1%})", "within 10%",
                "yes" if r["goal_within_10pct"] else "no")
        elif name == "machine_limit":
            for x in r["rows"]:
                row(name, f"{x['what']} {x['policy']}", f"{x['achieved_gflops']} of {x['peak_gflops']} GFLOP/s "
                    f"({x['fraction_of_peak']:.0%})" + (f"; backward+update {x['backward_update_over_forward']}x "
                                                        f"the forward" if "backward_update_over_forward" in x else ""),
                    "as close as possible", "")
        elif name == "mc_dropout":
            by = {x["variant"]: x for x in r["results"]}
            eager = by.get("loop_eager", {}).get("seconds")
            for v, x in by.items():
                row(name, f"M=20 {v}", f"{x['seconds']} s/call, x{x['speedup_vs_loop_eager']} vs eager loop",
                    ">= x2 vs a Python loop" if v == "batched_graph" else "",
                    ("yes" if x["speedup_vs_loop_eager"] >= 2 else "no") if v == "batched_graph" and eager else "")
        elif name == "preprocess_memory":
            for x in r["rows"]:
                row(name, f"{x['volumes']} volumes, {x['workers']} worker(s)",
                    f"{x['volumes_per_s_build']} vol/s; peak RSS main {x['peak_rss_main_mib']} / worker "
                    f"{x['peak_rss_worker_mib']} MiB", "near-linear; memory within 10%", "")
            row(name, "marginal volumes/s (start-up excluded)", json.dumps(r.get("marginal_volumes_per_s")), "", "")
        else:
            row(name, "see results.json", json.dumps(r)[:200], "", "")
    return lines


def write_readme_results(results: dict, readme: Path) -> None:
    text = readme.read_text()
    head = text.split("## Latest results")[0]
    readme.write_text(head + "## Latest results\n\n" + "\n".join(summary_lines(results)) + "\n")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and smaller sizes")
    parser.add_argument("--only", default="", help="comma-separated benchmark names")
    parser.add_argument("--repo", default=None, help="semiseg checkout to benchmark (default: this one)")
    parser.add_argument("--out", default=str(common.BENCH_DIR / "results.json"))
    parser.add_argument("--readme", action="store_true", help="rewrite the results section of bench/README.md")
    args = parser.parse_args(argv)
    wanted = [n for n, _ in BENCHMARKS if not args.only or n in args.only.split(",")]
    unknown = set(filter(None, args.only.split(","))) - {n for n, _ in BENCHMARKS}
    if unknown:
        parser.error(f"--only: unknown benchmark(s) {sorted(unknown)}; known: {[n for n, _ in BENCHMARKS]}")
    started = time.time()
    results = {"machine": common.machine_info(), "quick": args.quick, "gpu": "no GPU lent to this run; CPU only",
               "benchmarks": {}}
    with tempfile.TemporaryDirectory(prefix="semiseg-bench-") as tmp:
        for name, number in BENCHMARKS:
            if name not in wanted:
                continue
            print(f"\n=== {number}. {name} (load {common.load()})", flush=True)
            entry = run_benchmark(name, args.quick, args.repo, Path(tmp))
            entry["issue_item"] = number
            results["benchmarks"][name] = entry
            if entry["status"] != "ok":
                print(f"{name}: {entry['status']}: {entry.get('reason') or entry.get('stderr_tail', '')[-400:]}")
    results["total_seconds"] = round(time.time() - started, 1)
    results["load_avg_end"] = common.load()
    common.write_json(args.out, results)
    if args.readme:
        write_readme_results(results, common.BENCH_DIR / "README.md")
    print(f"\nwrote {args.out} in {results['total_seconds']} s")
    return 0 if all(e["status"] in ("ok", "missing") for e in results["benchmarks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
