"""`main.py evaluate`: splits, TTA, the latest checkpoint and an external data set, on one smoke run."""
import json

import numpy as np
import pytest

from semiseg import cli as main
from semiseg.evaluation import predict

KEYS = ("dice", "iou", "accuracy", "precision", "recall", "sensitivity", "specificity", "hd95", "asd", "n_cases")


@pytest.fixture(scope="module")
def run(one_epoch_run):
    # One epoch (conftest): the best model and the latest checkpoint are the same weights.
    return one_epoch_run


def _payload(path):
    payload = json.loads(path.read_text())
    for key in KEYS:
        assert key in payload, key
    assert 0.0 <= payload["dice"] <= 1.0 and 0.0 <= payload["iou"] <= payload["dice"]
    return payload


def test_val_split_goes_to_eval_folder_and_keeps_run_metrics(run):
    before = (run / "metrics.json").read_bytes()
    assert main.main(["evaluate", str(run), "--split", "val"]) == 0
    payload = _payload(run / "eval" / "val" / "metrics.json")
    splits = json.loads((run / "splits.json").read_text())
    assert payload["split"] == "val" and payload["n_cases"] == len(splits["val"])
    assert payload["model"] == "student" and payload["tta"] is False
    assert payload["hd95"] is None or payload["hd95"] >= 0
    rows = (run / "eval" / "val" / "per_case.csv").read_text().strip().splitlines()
    assert len(rows) == 1 + len(splits["val"]) and rows[0].startswith("case_id,dice")
    assert (run / "metrics.json").read_bytes() == before


def test_no_progress_drops_the_progress_bar_only(run, capsys, monkeypatch):
    from semiseg import progress
    # Bars are drawn only on a terminal; capsys's stderr is not one, so stand in for a terminal
    # (the non-terminal case is tests/test_cluster_io.py's).
    monkeypatch.setattr(progress, "is_terminal", lambda stream=None: True)
    assert main.main(["evaluate", str(run), "--split", "val"]) == 0
    shown = capsys.readouterr()
    assert main.main(["evaluate", str(run), "--split", "val", "--no-progress"]) == 0
    quiet = capsys.readouterr()
    assert "evaluate val" in shown.err and "evaluate val" not in quiet.err      # tqdm's bar, on stderr
    metrics_line = [line for line in quiet.out.splitlines() if line.startswith("dice=")]
    assert metrics_line and metrics_line == [line for line in shown.out.splitlines() if line.startswith("dice=")]


def test_latest_checkpoint_restores_the_trained_weights(run):
    _, best, _ = predict.load_run_model(run, "best")
    _, latest, name = predict.load_run_model(run, "latest")
    assert name == "student"
    assert len(best.weights) == len(latest.weights)
    for a, b in zip(best.weights, latest.weights):          # BN moving statistics included
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    assert main.main(["evaluate", str(run), "--checkpoint", "latest"]) == 0
    payload = _payload(run / "eval" / "test_latest" / "metrics.json")
    default = _payload(run / "metrics.json")
    assert payload["n_cases"] == default["n_cases"]
    assert payload["dice"] == pytest.approx(default["dice"], abs=1e-6)


def test_tta_payload(run):
    before = (run / "metrics.json").read_bytes()
    assert main.main(["evaluate", str(run), "--tta"]) == 0
    payload = _payload(run / "eval" / "test_tta" / "metrics.json")
    assert payload["tta"] is True and payload["split"] == "test"
    assert payload["n_cases"] == json.loads(before)["n_cases"]
    assert (run / "metrics.json").read_bytes() == before


def test_external_data_set_is_split_external(run, tmp_path):
    from semiseg.data import synthetic as synthetic_data
    # RGB pictures at another size: the run's channels (grey) and image_size must be applied.
    ext = synthetic_data.generate_2d(tmp_path / "other_set", n_cases=4, size=40, seed=7, channels=3)
    assert main.main(["evaluate", str(run), "--data", str(ext), "--format", "isic"]) == 0
    payload = _payload(run / "eval" / "external_other_set" / "metrics.json")
    assert payload["split"] == "external" and payload["n_cases"] == 4


def test_bad_requests_exit_2(run, tmp_path, capsys):
    assert main.main(["evaluate", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main.main(["evaluate", str(run), "--data", str(tmp_path), "--split", "val"]) == 2
    assert "external" in capsys.readouterr().err
    empty = tmp_path / "run_without_model"
    empty.mkdir()
    (empty / "config.yaml").write_text((run / "config.yaml").read_text())
    assert main.main(["evaluate", str(empty)]) == 2
    assert "best_model.keras" in capsys.readouterr().err
    assert main.main(["evaluate", str(empty), "--checkpoint", "latest"]) == 2
    assert "no checkpoint" in capsys.readouterr().err
