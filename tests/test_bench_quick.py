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
