"""Atomic file writes: a reader finds the previous complete file or the new complete one, never half.

    from semiseg.runs import atomic_write
    atomic_write.write_text("runs/mt/config.yaml", text)
    atomic_write.write_with("runs/mt/best_model.keras", model.save)    # the writer gets a temporary path
    atomic_write.append_csv_row("runs/mt/mim_history.csv", {"epoch": 3, "loss_mim": 0.41})

Every semiseg file goes through here. The recipe: write a temporary file in the same folder (a
rename is atomic only within one file system), flush and fsync it (else a crash after the rename
can leave an empty file under the final name), `os.replace` it over the final name, fsync the folder
(so the rename itself survives a power cut). On any error the temporary file is removed, the old
file stays as it was, and `WriteError` (an `OSError` with the original errno) names the final path:
"cannot write runs/mt/best_model.keras: No space left on device". Errors that are not I/O errors
(a bug in the writer) pass through unchanged, with a note naming the path.

Temporary names are hidden (`.tmp<pid>-<hex>-<name>`, which `predict` skips when it lists a folder)
and end with the real name, since nibabel, Keras and PIL choose the format by suffix (`.nii.gz`).
"""
from __future__ import annotations

import csv
import errno as errno_codes
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable


from semiseg.errors import WriteError  # noqa: F401  (raised here; defined with the other errors)


def temporary_path(path) -> Path:
    """A fresh hidden name beside `path` that keeps its full suffix (`.tmp4242-9f3a1c-scan.nii.gz`)."""
    path = Path(path)
    return path.with_name(f".tmp{os.getpid()}-{uuid.uuid4().hex[:6]}-{path.name}")


def write_with(path, write: Callable[[Path], object]) -> Path:
    """Call write(temporary path), then move the result over `path` atomically. Returns `path`."""
    path = Path(path)
    tmp = temporary_path(path)
    try:
        write(tmp)
        _fsync_written(tmp)
        os.replace(tmp, path)
    except OSError as err:
        _remove(tmp)
        raise WriteError(path, err.strerror or str(err), err.errno) from err
    except BaseException as err:
        _remove(tmp)
        if isinstance(err, Exception):
            err.add_note(f"while writing {path}")
        raise
    _fsync_folder(path.parent)
    return path


def write_bytes(path, data: bytes) -> Path:
    def write(tmp: Path) -> None:
        # O_EXCL: never write through a stale file or link of the same name
        with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb") as fh:
            fh.write(data)
    return write_with(path, write)


def write_text(path, text: str, encoding: str = "utf-8") -> Path:
    return write_bytes(path, text.encode(encoding))


def csv_text(rows: list[dict], columns: list[str] | None = None) -> str:
    """CSV with a header: `columns`, else every key in order of first appearance; missing cells empty."""
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=columns, restval="", lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return out.getvalue()


def read_csv_rows(path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def append_csv_row(path, row: dict) -> Path:
    """Rewrite the CSV at `path` with `row` appended (new columns join the header): appending in
    place could leave half a row, or a header that no longer fits, after a crash."""
    return write_text(path, csv_text(read_csv_rows(path) + [row]))


def _fsync(path: Path) -> None:
    """fsync a file, or a folder's entries (os.fsync works on a read-only descriptor of either)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_written(tmp: Path) -> None:
    if tmp.is_dir():            # a writer that made a folder (e.g. a SavedModel): its files too
        for child in tmp.rglob("*"):
            if child.is_file():
                _fsync(child)
    _fsync(tmp)


def _fsync_folder(folder: Path) -> None:
    try:
        _fsync(folder)
    except OSError as err:
        # Some file systems (network mounts) cannot fsync a folder; the rename happened all the same.
        if err.errno not in (errno_codes.EINVAL, errno_codes.ENOTSUP, errno_codes.EACCES):
            raise WriteError(folder, f"renamed into it, but the folder could not be synced: {err.strerror}",
                             err.errno) from err


def _remove(tmp: Path) -> None:
    try:
        if tmp.is_dir() and not tmp.is_symlink():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)
    except OSError:
        pass                    # best effort: the original error is the one to report
