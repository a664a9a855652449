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
