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


_EXIT_STATUS = {}


def pytest_sessionfinish(session, exitstatus):
    _EXIT_STATUS["code"] = int(exitstatus)


@pytest.hookimpl(trylast=True)
def pytest_unconfigure(config):
    """End the process as soon as pytest is done, without Python's finalisation.

    Many tests train in this process, and TensorFlow's tf.data iterators they leave alive can deadlock
    in their C++ destructors when the interpreter finalises (measured: the whole suite printed its
    result, then hung for over 20 minutes in RootDataset::Iterator's destructor, waiting on a
    ParallelMap runner thread that was never woken). The results are written by then, so nothing is
    lost by skipping finalisation; the CLI, which trains in its own process, exits normally."""
    if "code" in _EXIT_STATUS and os.environ.get("SEMISEG_TEST_NORMAL_EXIT") != "1":
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(_EXIT_STATUS["code"])
