"""Shared test setup: quiet TF, one synthetic-data cache per session (pytest.ini puts the repo on the path)."""
import os
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
REPO = Path(__file__).resolve().parents[1]

import pytest  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def _session_cache(tmp_path_factory):
    """Every test shares one slice/synthetic cache, kept out of the user's ~/.cache."""
    if "SEMISEG_TEST_CACHE" in os.environ:
        os.environ["SEMISEG_CACHE"] = os.environ["SEMISEG_TEST_CACHE"]
    else:
        os.environ["SEMISEG_CACHE"] = str(tmp_path_factory.mktemp("semiseg-cache"))
    yield


@pytest.fixture(scope="session")
def one_epoch_run(tmp_path_factory, _session_cache):
    """One supervised smoke run of a single epoch (best model == latest checkpoint), shared by the
    evaluate and predict tests, which only read it or write under its eval/ folder."""
    from semiseg import cli as main
    out = tmp_path_factory.mktemp("runs") / "smoke"
    assert main.main(["train", "--method", "supervised", "--preset", "smoke", "--out", str(out), "--no-progress",
                      "--set", "train.epochs=1"]) == 0
    return out
