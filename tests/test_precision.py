"""Mixed precision on CPU: `train --preset smoke --set train.precision=mixed_float16` (and bfloat16).

    python -m pytest tests/test_precision.py -q

float16 runs with loss scaling (LossScaleOptimizer); bfloat16 without. Either way the exported
network computes in the low precision and returns float32 logits.
"""
import json

import numpy as np
import pytest

from semiseg import cli as main
from semiseg.runs import run_dir


@pytest.fixture
def restore_policy():
    import keras
    yield
    keras.mixed_precision.set_global_policy("float32")   # main.py sets it process-wide


@pytest.mark.parametrize("precision,compute", [("mixed_float16", "float16"), ("mixed_bfloat16", "bfloat16")])
def test_smoke_trains_in_mixed_precision(tmp_path, restore_policy, precision, compute):
    import keras
    out = tmp_path / precision
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", f"train.precision={precision}", "train.epochs=1"]) == 0
    history = run_dir.read_history(out)
    assert len(history) == 1 and np.isfinite(float(history[0]["loss"])) and float(history[0]["loss"]) > 0
    assert json.loads((out / "run_info.json").read_text())["status"] == "completed"
    model = keras.saving.load_model(out / "best_model.keras", compile=False)
    computes = {layer.dtype_policy.compute_dtype for layer in model.layers if layer.weights}
    assert compute in computes
    assert all(w.dtype == "float32" for w in model.weights)        # float32 master weights
    logits = model(np.zeros((1, *model.input_shape[1:]), "float32"))
    assert keras.backend.standardize_dtype(logits.dtype) == "float32"


# ----------------------------------------------------------------------------- train.precision=auto
@pytest.mark.parametrize("flags,gpus,want", [
    ({"fma", "avx512f", "avx512_bf16"}, [], "mixed_bfloat16"),          # Cooper Lake / Zen 4
    ({"fma", "amx_bf16", "amx_tile"}, [], "mixed_bfloat16"),            # Sapphire Rapids
    ({"fma", "avx2", "avx512f"}, [], "float32"),                        # bfloat16 only emulated
    (set(), [], "float32"),                                             # no /proc/cpuinfo
    ({"avx2"}, [(8, 0)], "mixed_bfloat16"),                              # A100
    ({"avx2"}, [(9, 0), (8, 6)], "mixed_bfloat16"),
    ({"avx512_bf16"}, [(7, 0)], "float32"),                             # V100: the GPU decides, no bf16
    ({"avx2"}, [(8, 0), (7, 5)], "float32"),                            # not every GPU has it
])
def test_auto_precision_decision(flags, gpus, want):
    from semiseg import precision
    got, why = precision.choose("auto", flags, gpus)
    assert got == want and why.startswith("auto: ")
    # float16 only when asked; an explicit request is never second-guessed.
    for asked in ("float32", "mixed_float16", "mixed_bfloat16"):
        assert precision.choose(asked, flags, gpus) == (asked, f"train.precision={asked} as asked")


@pytest.mark.parametrize("mine, other, want", [
    ("mixed_bfloat16", "mixed_bfloat16", "mixed_bfloat16"),   # every node native: bfloat16
    ("mixed_bfloat16", "float32", "float32"),                 # a node without it: float32 everywhere
    ("float32", "mixed_bfloat16", "float32"),
    ("float32", "float32", "float32")])
def test_auto_precision_agrees_across_workers(mine, other, want):
    """The collective is an OR over workers; here the other worker's flag is given."""
    from semiseg import precision
    flags_seen = []

    def any_worker_true(flag):
        flags_seen.append(flag)
        return flag or other != "mixed_bfloat16"
    got, why = precision.agree_across_workers("auto", mine, "mine", any_worker_true)
    assert got == want and flags_seen == [mine != "mixed_bfloat16"]
    assert (why == "mine") == (got == mine)
    # Asked for explicitly: kept, and no collective is run (every worker has the same config).
    assert precision.agree_across_workers("mixed_bfloat16", "mixed_bfloat16", "asked", any_worker_true) == (
        "mixed_bfloat16", "asked") and len(flags_seen) == 1


def test_cpu_flags_read_from_cpuinfo(tmp_path):
    from semiseg import precision
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC\nflags\t\t: fpu avx2 avx512_bf16 sse\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert precision.cpu_flags(info) == {"fpu", "avx2", "avx512_bf16", "sse"}
    assert precision.cpu_flags(tmp_path / "missing") == frozenset()


def test_smoke_train_with_auto_records_the_choice(tmp_path, restore_policy, capsys):
    import yaml
    from semiseg import precision
    out = tmp_path / "auto"
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", "train.precision=auto", "train.epochs=1"]) == 0
    want, why = precision.resolve("auto")
    info = json.loads((out / "run_info.json").read_text())
    assert (info["precision"], info["precision_reason"]) == (want, why)
    assert info["sessions"][0]["precision"] == want
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["precision"] == "auto"
    assert f"precision={want} ({why})" in capsys.readouterr().out     # printed at start-up
    # The 'latest' checkpoint is rebuilt in the precision that ran, not re-resolved from "auto".
    from semiseg.runs.load import load_run_model
    _, model, _ = load_run_model(out, "latest")
    compute = {"mixed_bfloat16": "bfloat16", "float32": "float32"}[want]
    assert compute in {layer.dtype_policy.compute_dtype for layer in model.layers if layer.weights}
