"""Binary runs are unchanged by multi-class support, bit for bit: one optimizer step of every method
on the binary smoke preset gives the same loss and the same updated weights as the code before
data.classes existed (commit ffc6614, computed there with tests/binary_step_script.py).

    python -m pytest tests/test_binary_unchanged.py -q

Tolerance 0: the loss as a float's hex and a SHA-256 of the trainable weights' float32 bytes. The
values are this machine's (TensorFlow 2.21.0 on CPU, deterministic ops, the embedded synthetic data);
another TensorFlow or another device sums in another order, so the test runs only on TF 2.21.0
without a GPU. Two platforms' values are recorded below. On a third (another CPU's kernels sum in
another order), the test computes the reference itself: it exports REFERENCE_COMMIT from this
checkout's git history, runs that commit's copy of the script on it, and asks for the same bits from
the current code on this machine. REFERENCE_COMMIT matched EXPECTED bit for bit on the first
platform, so equal bits here carry the chain back to the code before multi-class support.
"""
import json
import os
import subprocess
import sys
import tarfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# method -> (loss.hex(), sha256 of the trainable weights after the step)
EXPECTED = {
    "supervised": ("0x1.a235b80000000p-1", "c53e1cab83b5d28cfeb196e2da0ed76fef0377527afdbedd3f64b213495e87fe"),
    # Refreshed on 466a03b (the last commit before the multi-class merge; Mean Teacher's default
    # consistency had changed from 1.0 to 0.1 since the first reference) and equal after the merge.
    "mean_teacher": ("0x1.b8a3720000000p-1", "65c15a3e47e241cd10f9a9de3effbf2e691c21f9ddda03282a0740e80d483156"),
    "mixmatch": ("0x1.8435540000000p-1", "4de15a214bf1c73ac0f2908bf73d922af17b950703d97d759174524f7d0207b7"),
    "mira_u": ("0x1.6cb8720000000p+0", "9861fbff9d2d279b103e3fa3f68293341e184f1db09344c384664f5d29374e29"),
}


# The same step on a second platform (a 2-core Intel Xeon VM with AVX-512 and AMX, TensorFlow 2.21.0),
# whose kernels sum in another order: computed with the script on 35b62a9, a commit whose step matched
# EXPECTED bit for bit on the first platform. A run must match one platform's values for every method.
EXPECTED_XEON = {
    "supervised": ("0x1.a235b60000000p-1", "a51035ef2189167475d5a368758aca4608359d2ec5eddd8a7208f97de7cd8f0c"),
    "mean_teacher": ("0x1.b8a3720000000p-1", "e4d783e3f7cc5ce90a4235ce2dfb6924cf1ba5d874c4423810679c1f45742882"),
    "mixmatch": ("0x1.8435540000000p-1", "3d356a0c25d7124a21d5ab21e0d12e815ec1c9f919b031ebffef688998c84433"),
    "mira_u": ("0x1.6cb8700000000p+0", "5850c1a99cd5349bf58005233086633881bf5ce02a59e01fbbdc9b1159b5f660"),
}


# The commit whose step the recorded platforms' values came from (EXPECTED: equal on the first one).
REFERENCE_COMMIT = "35b62a9"


def step_digests(tree: str, cache: str) -> dict:
    """method -> (loss hex, weights sha256) of one step, by `tree`'s own copy of the script and code."""
    env = dict(os.environ, PYTHONPATH=tree, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="", SEMISEG_CACHE=cache)
    out = subprocess.run([sys.executable, os.path.join(tree, "tests", "binary_step_script.py"), *EXPECTED],
                         env=env, capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    got = json.loads([line for line in out.stdout.splitlines() if line.startswith("{")][-1])
    return {method: (got[method]["loss_hex"], got[method]["weights_sha256"]) for method in EXPECTED}


def export_commit(commit: str, dest) -> bool:
    """Write `commit`'s tree of this checkout into `dest`; False where git or the commit is not there
    (an installed copy, a shallow clone)."""
    try:
        archive = subprocess.run(["git", "-C", REPO, "archive", "--format=tar", commit],
                                 capture_output=True, timeout=120)
    except (OSError, subprocess.TimeoutExpired):
        return False
    if archive.returncode != 0:
        return False
    tar_path = dest.parent / "reference.tar"
    tar_path.write_bytes(archive.stdout)
    with tarfile.open(tar_path) as tar:
        tar.extractall(dest, filter="data")
    return True


def test_binary_step_bit_for_bit(tmp_path):
    tf = pytest.importorskip("tensorflow")
    if tf.__version__ != "2.21.0" or tf.config.list_physical_devices("GPU"):
        pytest.skip("reference values were computed with TensorFlow 2.21.0 on CPU")
    cache = os.environ.get("SEMISEG_CACHE", str(tmp_path / "cache"))
    steps = step_digests(REPO, cache)
    if steps in (EXPECTED, EXPECTED_XEON):
        return
    reference = tmp_path / "reference"
    if not export_commit(REFERENCE_COMMIT, reference):
        pytest.skip(f"this platform sums in another order than the two recorded ones ({steps}), and commit "
                    f"{REFERENCE_COMMIT} is not in this checkout's git history to compute its reference here")
    expected_here = step_digests(str(reference), str(tmp_path / "reference_cache"))
    assert steps == expected_here, {m: (v, expected_here[m]) for m, v in steps.items()}
