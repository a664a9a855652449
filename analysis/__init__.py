"""Analysis of semiseg run folders: plots, tables and reports, without TensorFlow.

    python analysis/report.py runs/sweep --out reports/sweep

Scripts: curves.py, compare.py, families.py, label_efficiency.py, overlays.py, report.py; runs.py reads run
folders, figures.py holds the shared figure plumbing. See docs/evaluation.md.
"""
