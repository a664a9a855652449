"""Figure plumbing shared by the analysis scripts: headless backend, saving, colours, CLI flags.

Not a script itself; the scripts use it, e.g.

    python analysis/curves.py runs/sweep --out figures --formats png,pdf
"""
from __future__ import annotations

import argparse
import base64
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # headless: cluster nodes and CI have no display
import matplotlib.pyplot as plt  # noqa: E402

from semiseg.runs import atomic_write  # noqa: E402  (the scripts put the repository root on sys.path)

SUPPORTED_FORMATS = ("png", "pdf", "svg")
DPI = 150


def add_output_args(parser, formats: bool = True) -> None:
    parser.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                        help="run folders, or folders searched recursively for run folders")
    parser.add_argument("--out", required=True, type=Path, metavar="FIGDIR",
                        help="folder the figures and tables are written to")
    if not formats:
        return
    parser.add_argument("--formats", default="png", type=parse_formats,
                        help="comma-separated figure formats out of png,pdf,svg (default png)")


def parse_formats(text: str) -> tuple[str, ...]:
    formats = tuple(part.strip().lower() for part in text.split(",") if part.strip())
    unknown = [name for name in formats if name not in SUPPORTED_FORMATS]
    if unknown or not formats:
        raise argparse.ArgumentTypeError(
            f"--formats: unknown {unknown or repr(text)}; choose from {SUPPORTED_FORMATS}")
    return formats


def save_figure(figure, out_dir, stem: str, formats=("png",)) -> list[Path]:
    """Write `figure` as out_dir/stem.<format> for each format; returns the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in formats:
        path = out_dir / f"{stem}.{name}"
        # No bbox_inches="tight": the figures use constrained layout, and a tight box would
        # draw every figure twice (seconds per figure on a busy 2-core node).
        atomic_write.write_with(path, lambda tmp: figure.savefig(tmp, dpi=DPI, format=name))
        paths.append(path)
    return paths


def write_figure(figure, out_dir, stem: str, formats=("png",)) -> list[Path]:
    """Save, close and print the paths: the ending every command-line script shares."""
    paths = save_figure(figure, out_dir, stem, formats)
    close(figure)
    for path in paths:
        print(path)
    return paths


def png_base64(figure=None, path=None) -> str:
    """A base64 PNG for embedding in HTML: of a PNG file already written, else of the figure."""
    if path is not None:
        return base64.b64encode(Path(path).read_bytes()).decode("ascii")
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def method_colors(methods) -> dict:
    """A fixed colour per method, the supervised baseline always first (grey-blue C0)."""
    ordered = sorted(set(methods), key=lambda name: (name != "supervised", name))
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    return {name: cycle[index % len(cycle)] for index, name in enumerate(ordered)}


def close(figure) -> None:
    plt.close(figure)
