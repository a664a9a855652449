"""bench/profile_step.py: the profiler read-out (phases, busy/idle, op types) on a hand-built XSpace
(the script end to end, tiny: tests/test_bench_quick.py, slow).

    python -m pytest tests/test_profile_step.py -q
"""
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
import profile_step  # noqa: E402

LOOP = "while/body/_238/while/StatefulPartitionedCall/"


def test_phase_of_reads_graph_names():
    assert profile_step.phase_of(LOOP + "gradient_tape/student/up3_conv1/convolution/Conv2DBackpropFilter",
                                 "adam") == "backward"
    assert profile_step.phase_of(LOOP + "student/up3_conv1/convolution", "adam") == "forward"
    assert profile_step.phase_of(LOOP + "StatefulPartitionedCall/adam/Sub", "adam") == "update"
    assert profile_step.phase_of("clip_by_global_norm/mul", "adam") == "update"
    assert profile_step.phase_of(LOOP + "global_norm/L2Loss", "sgd") == "update"
    assert profile_step.phase_of(LOOP + "logistic_loss/Log1p", "adam") == "forward"
    assert profile_step.phase_of(LOOP + "adamw/Sub", "adam") == "forward"     # another optimizer's scope


def test_union_ps_merges_overlaps():
    assert profile_step.union_ps([]) == 0
    assert profile_step.union_ps([(0, 10), (5, 10), (30, 5), (31, 2)]) == 20
    assert profile_step.union_ps([(10, 5), (0, 30)]) == 30


def _xspace():
    """Two loop calls of 100 us (1 step each) on the Python line; ops on two compute threads, one op
    outside the calls (ignored), TF's own trace events (ignored)."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    xs = xplane_pb2.XSpace()
    plane = xs.planes.add(name="/host:CPU")
    names = {}

    def meta(name):
        if name not in names:
            names[name] = len(names) + 1
            plane.event_metadata[names[name]].name = name
        return names[name]

    def line(name, events):
        ln = plane.lines.add(name=name, timestamp_ns=1000)      # 1e6 ps
        for label, start_us, dur_us in events:
            ln.events.add(metadata_id=meta(label), offset_ps=start_us * 10**6, duration_ps=dur_us * 10**6)

    line("python", [("loop", 0, 100), ("loop", 200, 100)])
    line("tf_Compute/1", [("ExecutorState::Process", 0, 100), ("ThreadpoolListener::Record", 5, 0),
                          (LOOP + "student/c/convolution:_MklNativeConv2D", 0, 20),
                          (LOOP + "gradient_tape/student/c/convolution/Conv2DBackpropFilter:"
                                  "_MklNativeConv2DBackpropFilter", 30, 40),
                          (LOOP + "adam/Sub:Sub", 80, 10),
                          (LOOP + "student/c/convolution:_MklNativeConv2D", 200, 20),
                          (LOOP + "gradient_tape/student/c/convolution/Conv2DBackpropFilter:"
                                  "_MklNativeConv2DBackpropFilter", 230, 40),
                          ("metrics/Sum:Sum", 150, 30)])                    # between the calls
    line("tf_Compute/2", [(LOOP + "gradient_tape/student/c/convolution/Conv2DBackpropInput:"
                                  "_MklNativeConv2DBackpropInput", 35, 50)])
    return xs


def test_breakdown_of_a_known_profile():
    out = profile_step.breakdown(_xspace(), "adam", steps=2)
    # op time: forward 2 x 20 us, backward 2 x 40 + 50 us, update 10 us; per step (ms): / 2 / 1000
    assert out["op_ms"] == {"forward": 0.02, "backward": 0.065, "update": 0.005}
    assert out["backward_over_forward"] == 3.25
    assert out["backward_update_over_forward"] == 3.5
    # wall 200 us; busy: call 1 [0,20]+[30,85]+[80,90] = 20 + 60, call 2 [200,220]+[230,270] = 60: 140 us
    assert out["wall_ms"] == 0.1 and out["busy_ms"] == 0.07 and out["idle_ms"] == 0.03
    assert out["idle_share"] == 0.3
    top = {row["op"]: row["share"] for row in out["top_op_types"]}
    assert top == {"_MklNativeConv2DBackpropFilter": round(80 / 180, 4), "_MklNativeConv2DBackpropInput":
                   round(50 / 180, 4), "_MklNativeConv2D": round(40 / 180, 4), "Sub": round(10 / 180, 4)}


def test_breakdown_without_loop_calls_says_so():
    from tensorflow.tsl.profiler.protobuf import xplane_pb2
    with pytest.raises(RuntimeError, match="no call of the training loop"):
        profile_step.breakdown(xplane_pb2.XSpace(), "adam", steps=1)


def test_run_all_reports_the_profile_row():
    import run_all
    row = {"method": "supervised", "policy": "float32", **profile_step.breakdown(_xspace(), "adam", steps=2)}
    for serial, verdict in ((True, "| no |"), (False, "(phases: --serial) |  |")):
        result = {"image_size": 16, "rows": [row], "serial": serial}
        lines = run_all.summary_lines({"machine": {"date": "d", "host": "h", "cpu": "c", "cores": 2,
                                                   "avx512_bf16": False, "load_avg": [0, 0, 0]},
                                       "quick": True, "gpu": "no GPU",
                                       "benchmarks": {"profile_step": {"status": "ok", "result": result}}})
        (line,) = [x for x in lines if x.startswith("| profile_step")]
        assert "backward+update x3.5 the forward" in line and line.endswith(verdict)
        assert "idle 30.0% of the step" in line and "_MklNativeConv2DBackpropFilter 44%" in line
