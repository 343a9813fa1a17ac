"""The comparison report: read run directories, aggregate over seeds, write a table, figures and report.md.

Reads nothing but run directories (config.yaml, summary.json, metrics.jsonl, partition.json, env.json,
done). Runs whose configs are equal up to the seed form one *row* (mean ± sample std over seeds); each
figure is drawn per data setting (the ``data`` and ``model`` sections).

- :mod:`fedlt.report.runs`: finding, reading and validating run directories (one-line :class:`RunError`);
- :mod:`fedlt.report.tables`: rows over seeds, summary.csv, the markdown tables;
- :mod:`fedlt.report.figures`: the six figures (matplotlib);
- :mod:`fedlt.report.document`: report.md, written with everything else by :func:`write_report`.

``python -m fedlt.compare`` is the command line (:func:`make_report`).
"""

from __future__ import annotations

import sys
from pathlib import Path

from fedlt.errors import FedLTError
from fedlt.report.document import check_report_dir, write_report
from fedlt.report.figures import FIGURES
from fedlt.report.runs import Run, RunError, find_run_dirs, load_runs, read_run
from fedlt.report.tables import Row, build_rows

__all__ = ["FIGURES", "Row", "Run", "RunError", "build_rows", "check_report_dir", "find_run_dirs", "load_runs",
           "make_report", "read_run", "write_report"]


def make_report(paths: list[str | Path], out: str | Path, command: str | None = None) -> int:
    """Write the report of the runs under ``paths`` into ``out``; print unreadable runs to stderr and the
    report's path to stdout. Returns the exit status: 1 when no run could be read, 2 when ``out`` cannot be
    a report folder (:func:`check_report_dir`); then nothing is written."""
    try:
        check_report_dir(out)
    except FedLTError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    runs, errors = load_runs(paths)
    for e in errors:
        print(f"error: {e}", file=sys.stderr)
    if not runs:
        print("error: no run could be read; no report written", file=sys.stderr)
        return 1
    report = write_report(runs, out, errors, command)
    print(f"report of {len(runs)} runs: {report}", flush=True)
    return 0
