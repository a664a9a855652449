"""The benchmark harness end to end, tiny: bench/step_vs_yardstick.py at 16x16, float32, memory-fed,
writes its JSON.

    python -m pytest tests/test_bench_quick.py

Runs in a subprocess (the yardstick sets Keras' global seed and dtype policy). Checks structure and
sanity of the numbers, never their size: timings on a shared machine are not assertable.
"""
import json

import pytest
import math
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


# The yardsticks live outside the repository (bench/README.md): run when their folder is present.
YARDSTICKS = Path(os.environ.get("SEMISEG_YARDSTICKS", REPO.parent / "shared" / "yardsticks"))


@pytest.mark.slow   # starts TF twice in subprocesses; a harness check, not a value check of semiseg
@pytest.mark.skipif(not (YARDSTICKS / "plain_step.py").exists(), reason=f"no yardsticks folder at {YARDSTICKS}")
def test_step_vs_yardstick_tiny_writes_ratios(tmp_path):
    out = tmp_path / "svy.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "step_vs_yardstick.py"), "--quick", "--size", "16",
                           "--policies", "float32", "--feeds", "memory", "--out", str(out)],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "PYTHONPATH": str(REPO)})     # semiseg without an install
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    machine = result["machine"]
    assert machine["cores"] >= 1 and machine["cpu"] and len(machine["load_avg"]) == 3
    assert result["image_size"] == 16 and result["quick"] is True
    block = result["by_policy"]["float32"]
    rows = {r["candidate"]: r for r in block["rows"]}
    assert {"yardstick_supervised", "supervised_spl10_memory"} <= set(rows)
    assert rows["yardstick_supervised"]["ratio_vs_yardstick"] == 1.0
    for r in rows.values():
        assert r["ms_per_step"] > 0 and r["cpu_ms_per_step"] > 0 and len(r["all_ms"]) == result["rounds"]
        assert math.isfinite(r["ratio_vs_yardstick"]) and r["ratio_vs_yardstick"] > 0
    assert len(block["load_avg_1min"]) == result["rounds"]
    assert any(d.startswith("supervised spl10_memory") for d in block["diagnosis"])
    if "mean_teacher is not registered" not in " ".join(result["notes"]):
        assert "mean_teacher_spl10_memory" in rows


@pytest.mark.slow   # builds 3-6 trainers in a subprocess; a harness check, not a value check of semiseg
def test_step_ablations_tiny_rows_and_readme_lines(tmp_path):
    out = tmp_path / "abl.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "step_ablations.py"), "--quick", "--size", "16",
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    from semiseg import precision
    assert result["auto_precision"] == precision.resolve("auto")[0] and result["image_size"] == 16
    rows = {r["candidate"]: r for r in result["by_method"]["supervised"]["rows"]}
    policies = ["float32"] + (["mixed_bfloat16"] if result["auto_precision"] == "mixed_bfloat16" else [])
    for policy in policies:
        base = rows[f"{policy}/base"]["ms_per_step"]
        assert base > 0
        for change in ("keras_bn", "no_clip"):
            r = rows[f"{policy}/{change}"]
            assert r["ms_saved"] == pytest.approx(base - r["ms_per_step"], abs=0.02) and r["verdict"]
    auto = rows[f"auto ({result['auto_precision']})"]
    assert auto["speedup_vs_float32"] == pytest.approx(rows["float32/base"]["ms_per_step"] / auto["ms_per_step"],
                                                       rel=1e-2)
    sys.path.insert(0, str(REPO / "bench"))
    import run_all
    lines = run_all.summary_lines({"machine": result["machine"], "quick": True, "gpu": "no GPU",
                                   "benchmarks": {"step_ablations": {"status": "ok", "result": result}}})
    assert sum("step_ablations" in line for line in lines) == 2 * len(policies) + 1     # + the auto row
