"""No command prints TensorFlow's retracing warning: train, evaluate (TTA) and predict (TTA, pictures of
several sizes and a NIfTI volume) each trace one function per input shape.

    python -m pytest tests/test_no_retracing.py -q

TF warns ("N out of the last N calls to <function> triggered tf.function retracing") when the
functions built from one Python function trace 5 times or more: a tf.function made per batch or
per epoch, or one fed tensors of ever new shapes. Each command runs in its own process, as a user
runs it, so traces of other tests cannot add to its count.
"""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent


def _run(args, tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="",
               SEMISEG_CACHE=os.environ.get("SEMISEG_CACHE", str(tmp_path / "cache")))
    out = subprocess.run([sys.executable, str(REPO / "main.py"), *args, "--no-progress"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def test_train_evaluate_predict_print_no_retracing_warning(tmp_path):
    import nibabel as nib
    from PIL import Image
    inputs = tmp_path / "inputs"
    inputs.mkdir()
    rng = np.random.default_rng(0)
    for i, (h, w) in enumerate([(30, 40), (64, 64), (30, 40), (100, 80), (17, 23), (48, 48)]):
        Image.fromarray(rng.integers(0, 255, (h, w), dtype=np.uint8)).save(inputs / f"p{i}.png")
    nib.save(nib.Nifti1Image(rng.normal(50, 20, (40, 50, 7)).astype("float32"), np.eye(4)), inputs / "scan.nii.gz")
    run = tmp_path / "run"
    outputs = [_run(["train", "--method", "mean_teacher", "--preset", "smoke", "--out", str(run)], tmp_path),
               _run(["evaluate", str(run), "--split", "val", "--tta"], tmp_path),
               _run(["predict", str(run), str(inputs), str(tmp_path / "masks"), "--tta"], tmp_path)]
    assert len(list((tmp_path / "masks").iterdir())) == 7      # every input was predicted
    for text in outputs:
        assert "retracing" not in text, [line for line in text.splitlines() if "retracing" in line]
