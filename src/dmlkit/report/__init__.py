"""Run reports: ``write_report(run_dir)`` writes one self-contained ``report.html`` beside a run — its
resolved configuration, training curves, the test table before and after training, per-class metrics
(worst first) and a grid of the worst test queries. ``dmlkit report RUN_DIR`` on the command line; the
curves need matplotlib (``pip install 'dmlkit[plot]'``). See ``docs/reports.md``.
"""

from dmlkit.report.builder import REPORT_FILE, write_report
from dmlkit.report.figures import Curve, curves, render_png
from dmlkit.report.run import RunRecord, read_run
from dmlkit.report.test_split import TestSplitView, evaluate_test_split, worst_queries

__all__ = [
    "REPORT_FILE",
    "Curve",
    "RunRecord",
    "TestSplitView",
    "curves",
    "evaluate_test_split",
    "read_run",
    "render_png",
    "worst_queries",
    "write_report",
]
