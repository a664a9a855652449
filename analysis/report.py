"""One self-contained HTML report of a sweep: results table, label efficiency, training curves
and qualitative overlays, images embedded as base64 PNG (one file to mail or attach).

    python analysis/report.py runs/sweep --out reports/sweep [--split test] [--formats png,pdf]

Writes FIGDIR/report.html and, next to it, the figures in --formats and the comparison tables.
Curves are drawn per labeled fraction; overlays for one run per (method, labeled fraction): the
seed with the median test Dice. A section whose files are missing says so instead of failing.
"""
from __future__ import annotations

import argparse
import html
import sys
from datetime import datetime
from pathlib import Path

if __package__ in (None, ""):  # run as `python analysis/report.py`: make `analysis` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from semiseg.runs import atomic_write  # noqa: E402
from analysis import compare, curves, figures, label_efficiency, overlays  # noqa: E402
from analysis.runs import Run, find_runs, percent, run_cli, unique_names, summary  # noqa: E402

STYLE = """
body { font-family: sans-serif; max-width: 1200px; margin: 2em auto; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f0f0f0; } td:first-child, th:first-child { text-align: left; }
img { max-width: 100%; } .note { color: #a33; } h2 { border-bottom: 1px solid #ddd; }
"""


class Report:
    """Collects HTML sections; figures are embedded and also saved as files."""

    def __init__(self, out_dir: Path, formats):
        self.out_dir, self.formats, self.parts = out_dir, formats, []

    def heading(self, text: str, level: int = 2):
        self.parts.append(f"<h{level}>{html.escape(text)}</h{level}>")

    def paragraph(self, text: str, css_class: str = ""):
        attribute = f' class="{css_class}"' if css_class else ""
        self.parts.append(f"<p{attribute}>{html.escape(text)}</p>")

    def table(self, header, body):
        rows = ["<tr>" + "".join(f"<th>{html.escape(str(c))}</th>" for c in header) + "</tr>"]
        rows += ["<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in cells) + "</tr>"
                 for cells in body]
        self.parts.append("<table>" + "".join(rows) + "</table>")

    def figure(self, figure, stem: str, caption: str):
        paths = figures.save_figure(figure, self.out_dir, stem, self.formats)
        png = [path for path in paths if path.suffix == ".png"]
        # Reuse the PNG just written rather than drawing the figure a second time.
        encoded = figures.png_base64(path=png[0]) if png else figures.png_base64(figure)
        figures.close(figure)
        self.parts.append(f'<figure><img alt="{html.escape(caption)}" '
                          f'src="data:image/png;base64,{encoded}"><figcaption>'
                          f"{html.escape(caption)}</figcaption></figure>")

    def section(self, title: str, build):
        """Run one section's builder; a missing file or unusable run becomes a note."""
        self.heading(title)
        try:
            build()
        except (FileNotFoundError, ValueError, KeyError) as error:
            self.paragraph(f"Not available: {error}", "note")

    def html(self, title: str) -> str:
        return (f"<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>{html.escape(title)}"
                f"</title><style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>\n"
                + "\n".join(self.parts) + "\n</body></html>\n")


def representative_runs(runs: list[Run]) -> list[Run]:
    """Per (method, labeled fraction), the evaluated run whose test Dice is the median seed's."""
    groups = {}
    for run in runs:
        if run.metrics is not None and run.metrics.get("dice") is not None:
            groups.setdefault((run.labeled_fraction, run.method != compare.BASELINE, run.method),
                              []).append(run)
    chosen = []
    for key in sorted(groups):
        members = sorted(groups[key], key=lambda run: run.metrics["dice"])
        chosen.append(members[len(members) // 2])
    return chosen


def build_report(runs: list[Run], out_dir, formats=("png",), split: str = "test") -> Path:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report = Report(out_dir, formats)
    report.paragraph(f"{len(runs)} runs; generated {datetime.now():%Y-%m-%d %H:%M}.")

    def results_table():
        table = compare.summary_table(runs)
        report.table(*compare.display_rows(table))
        compare.write_tables(runs, out_dir)
        report.paragraph("Mean ± std over seeds of each run's test-set mean; p: two-sided paired "
                         "Wilcoxon signed-rank test on per-case Dice against the supervised run "
                         "of the same labeled fraction and seed.")

    def efficiency():
        report.figure(label_efficiency.label_efficiency_figure(runs), "label_efficiency",
                      "Test Dice vs labeled fraction; band: min–max over seeds; dots: seeds.")

    def training_curves():
        by_fraction = {}
        for run in runs:
            if run.history is not None and len(run.history):
                by_fraction.setdefault(run.labeled_fraction, []).append(run)
        if not by_fraction:
            raise FileNotFoundError("no run has a history.csv")
        for fraction in sorted(by_fraction):
            report.figure(curves.curves_figure(by_fraction[fraction]),
                          f"curves_{percent(fraction).rstrip('%')}pct",
                          f"Training curves, {percent(fraction)} labeled.")

    def qualitative():
        chosen = representative_runs(runs)
        if not chosen:
            raise FileNotFoundError("no evaluated run (metrics.json) to show")
        for run, name in zip(chosen, unique_names(chosen)):
            try:
                figure = overlays.overlays_figure(run, split)
            except (FileNotFoundError, ValueError) as error:
                report.paragraph(f"{run.label}: not available: {error}", "note")
                continue
            report.figure(figure, f"overlays_{name}",
                          f"{run.label}: best, median and worst {split} cases by Dice.")

    def run_list():
        body = [[run.path, run.label, 0 if run.history is None else len(run.history),
                 "n/a" if run.metrics is None or run.metrics.get("dice") is None
                 else f"{run.metrics['dice']:.3f}"] for run in runs]
        report.table(["Run folder", "Run", "Epochs", "Test Dice"], body)

    report.section("Results", results_table)
    report.section("Label efficiency", efficiency)
    report.section("Training curves", training_curves)
    report.section("Qualitative results", qualitative)
    report.section("Runs", run_list)
    path = out_dir / "report.html"
    atomic_write.write_text(path, report.html("semiseg sweep report"))
    return path


def main(argv=None) -> Path:
    parser = argparse.ArgumentParser(description=summary(__doc__))
    figures.add_output_args(parser)
    parser.add_argument("--split", default="test", help="preview split for the overlays")
    args = parser.parse_args(argv)
    path = build_report(find_runs(args.run_dirs), args.out, args.formats, args.split)
    print(path)
    return path


if __name__ == "__main__":
    sys.exit(run_cli(main))
