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


def run_tiny(script: str, tmp_path, *args) -> dict:
    """bench/SCRIPT --quick --size 16 ARGS in a subprocess (semiseg from this checkout, no install
    needed); the JSON it wrote."""
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, str(REPO / "bench" / script), "--quick", "--size", "16", *args,
                           "--out", str(out)], capture_output=True, text=True, timeout=900,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(out.read_text())


@pytest.mark.slow   # starts TF twice in subprocesses; a harness check, not a value check of semiseg
@pytest.mark.skipif(not (YARDSTICKS / "plain_step.py").exists(), reason=f"no yardsticks folder at {YARDSTICKS}")
def test_step_vs_yardstick_tiny_writes_ratios(tmp_path):
    result = run_tiny("step_vs_yardstick.py", tmp_path, "--policies", "float32", "--feeds", "memory")
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
    result = run_tiny("step_ablations.py", tmp_path)
    from semiseg import precision
    assert result["auto_precision"] == precision.resolve("auto")[0] and result["image_size"] == 16
    rows = {r["candidate"]: r for r in result["by_method"]["supervised"]["rows"]}
    policies = ["float32"] + (["mixed_bfloat16"] if result["auto_precision"] == "mixed_bfloat16" else [])
    for policy in policies:
        base = rows[f"{policy}/base"]["ms_per_step"]
        assert base > 0
        for change in ("keras_bn", "no_clip", "keras_update"):
            r = rows[f"{policy}/{change}"]
            assert r["ms_saved"] == pytest.approx(base - r["ms_per_step"], abs=0.02) and r["verdict"]
    auto = rows[f"auto ({result['auto_precision']})"]
    assert auto["speedup_vs_float32"] == pytest.approx(rows["float32/base"]["ms_per_step"] / auto["ms_per_step"],
                                                       rel=1e-2)
    sys.path.insert(0, str(REPO / "bench"))
    import run_all
    lines = run_all.summary_lines({"machine": result["machine"], "quick": True, "gpu": "no GPU",
                                   "benchmarks": {"step_ablations": {"status": "ok", "result": result}}})
    assert sum("step_ablations" in line for line in lines) == 3 * len(policies) + 1     # + the auto row


@pytest.mark.slow   # builds and profiles a trainer in a subprocess; the read-out: tests/test_profile_step.py
def test_profile_step_tiny_end_to_end(tmp_path):
    result = run_tiny("profile_step.py", tmp_path)
    (row,) = result["rows"]
    assert result["serial"] is False and row["method"] == "supervised" and row["policy"] == "float32"
    assert all(row["op_ms"][phase] > 0 for phase in ("forward", "backward", "update"))
    assert 0 < row["busy_ms"] <= row["wall_ms"] and row["idle_ms"] >= 0
    assert any("Conv2DBackpropFilter" in r["op"] for r in row["top_op_types"])
