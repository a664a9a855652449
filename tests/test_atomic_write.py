"""atomic_write and the writers built on it, against real write errors.

A disk that fills up is simulated with RLIMIT_FSIZE in a child process (SIGXFSZ ignored, so a
write past the limit fails with EFBIG, as a full disk fails with ENOSPC): the old file must stay
intact, no temporary file may be left, and the error must name the file.
"""
import errno
import gzip
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from semiseg.runs import atomic_write

REPO = Path(__file__).resolve().parents[1]

# Every writer gets content far beyond the limit; each target holds "old" content beforehand.
_FULL_DISK_SCRIPT = textwrap.dedent("""
    import json, resource, signal, sys
    from pathlib import Path
    from semiseg import config
    from semiseg.data import loader as data_loader_tf2
    from semiseg.evaluation import metrics
    from semiseg.runs import atomic_write, run_dir
    folder = Path(sys.argv[1])
    big = "x" * 50_000
    writers = {
        "text.txt": lambda p: atomic_write.write_text(p, big),
        "callback.npy": lambda p: atomic_write.write_with(p, lambda tmp: tmp.write_text(big)),
        "rows.csv": lambda p: atomic_write.append_csv_row(p, {"a": big}),
        "run_info.json": lambda p: run_dir.write_json(p, {"a": big}),
        "history.csv": lambda p: run_dir.append_history(p.parent, {"epoch": 2, "note": big}),
        "config.yaml": lambda p: config.save_yaml(config.resolve("smoke", overrides=[f"data.path={big}"]), p),
        "splits.json": lambda p: data_loader_tf2.save_splits({"test": [big]}, p),
        "metrics.json": lambda p: metrics.write_metrics_json(p, {"model": big}),
        "per_case.csv": lambda p: metrics.write_per_case_csv(p, [{"case_id": big}]),
    }
    for name in writers:
        (folder / name).write_text("epoch,a\\n1,old\\n" if name.endswith(".csv") else "old\\n")
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (4096, resource.RLIM_INFINITY))
    results = {}
    for name, write in writers.items():
        try:
            write(folder / name)
            results[name] = None
        except Exception as err:
            results[name] = [type(err).__name__, isinstance(err, OSError), getattr(err, "errno", None), str(err)]
    print(json.dumps(results))
""")


def test_every_writer_keeps_the_old_file_and_names_it_when_the_disk_is_full(tmp_path):
    script = tmp_path / "full.py"
    script.write_text(_FULL_DISK_SCRIPT)
    folder = tmp_path / "run"
    folder.mkdir()
    proc = subprocess.run([sys.executable, str(script), str(folder)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert len(results) == 9
    for name, outcome in results.items():
        assert outcome is not None, f"{name}: writing past the limit did not fail"
        kind, is_os_error, code, message = outcome
        assert (kind, is_os_error, code) == ("WriteError", True, errno.EFBIG), (name, outcome)
        assert message == f"cannot write {folder / name}: File too large", name
        old = "epoch,a\n1,old\n" if name.endswith(".csv") else "old\n"
        assert (folder / name).read_text() == old, f"{name} was changed"
    assert sorted(p.name for p in folder.iterdir()) == sorted(results), "a temporary file was left behind"


def test_write_text_replaces_the_file_with_normal_permissions(tmp_path):
    path = tmp_path / "a.json"
    path.write_text("old")
    previous = os.umask(0o022)
    try:
        assert atomic_write.write_text(path, "new ✓") == path
    finally:
        os.umask(previous)
    assert path.read_text(encoding="utf-8") == "new ✓"
    assert path.stat().st_mode & 0o777 == 0o644      # not mkstemp's 0600: others on a cluster may read runs
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_write_with_keeps_the_suffix_so_nibabel_compresses(tmp_path):
    import nibabel as nib
    seen = []
    target = tmp_path / "scan_mask.nii.gz"

    def save(tmp):
        seen.append(tmp)
        nib.save(nib.Nifti1Image(np.arange(8, dtype=np.uint8).reshape(2, 2, 2), np.eye(4)), str(tmp))
    atomic_write.write_with(target, save)
    assert seen[0].parent == tmp_path and seen[0].name.startswith(".tmp") and seen[0].name.endswith("-scan_mask.nii.gz")
    assert target.read_bytes()[:2] == b"\x1f\x8b"          # gzip: nibabel saw the .nii.gz suffix
    assert np.asarray(nib.load(target).dataobj).ravel().tolist() == list(range(8))
    assert gzip.decompress(target.read_bytes())[:4] == (348).to_bytes(4, "little")   # NIfTI-1 header size
    assert [p.name for p in tmp_path.iterdir()] == ["scan_mask.nii.gz"]


def test_a_bug_in_the_writer_passes_through_with_the_path_noted_and_no_temp_left(tmp_path):
    target = tmp_path / "out.png"
    target.write_text("old")

    def broken(tmp):
        tmp.write_text("half")
        raise ValueError("bad mode")
    with pytest.raises(ValueError, match="bad mode") as info:
        atomic_write.write_with(target, broken)
    assert f"while writing {target}" in info.value.__notes__
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["out.png"]


def test_append_csv_row_adds_rows_and_new_columns(tmp_path):
    path = tmp_path / "mim_history.csv"
    atomic_write.append_csv_row(path, {"epoch": 1, "loss_mim": "0.5"})
    atomic_write.append_csv_row(path, {"epoch": 2, "loss_mim": "0.25", "time_s": 3.5})
    assert path.read_text() == "epoch,loss_mim,time_s\n1,0.5,\n2,0.25,3.5\n"
    assert atomic_write.read_csv_rows(path)[1] == {"epoch": "2", "loss_mim": "0.25", "time_s": "3.5"}


def test_mira_u_mim_history_is_written_through_the_atomic_append(tmp_path):
    from semiseg.methods.mira_u import trainer as mira_u
    path = tmp_path / mira_u.MIM_HISTORY
    mira_u._append_csv(path, {"epoch": 1, "step": 3, "loss_mim": 0.123456789})
    mira_u._append_csv(path, {"epoch": 2, "step": 6, "loss_mim": 0.1, "time_s": 1.25})
    # the old in-place append kept the first header, leaving time_s without a column
    assert path.read_text().splitlines() == ["epoch,step,loss_mim,time_s", "1,3,0.123457,", "2,6,0.1,1.25"]


def test_write_error_is_an_os_error_that_survives_a_process_pool():
    import pickle
    err = pickle.loads(pickle.dumps(atomic_write.WriteError("/data/run/x.json", "No space left on device",
                                                            errno.ENOSPC)))
    assert isinstance(err, OSError) and err.errno == errno.ENOSPC
    assert str(err) == "cannot write /data/run/x.json: No space left on device"
