"""``python -m fedlt.compare RUN_DIR... --out REPORT_DIR``: the comparison report of finished runs.

A RUN_DIR is a run directory or a folder holding run directories (searched recursively). Writes
summary.csv, table.md, figures (PNG and PDF) and report.md into REPORT_DIR. A run directory that cannot
be read is named in a one-line error on stderr and left out; the exit status is non-zero only when no
run could be read.
"""

from __future__ import annotations

import argparse
import shlex
import sys

from fedlt.report import make_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fedlt.compare", description=__doc__.split("\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directory, or a folder of them")
    parser.add_argument("--out", required=True, help="folder for the report (created)")
    args = parser.parse_intermixed_args(argv)
    command = "python -m fedlt.compare " + shlex.join(argv if argv is not None else sys.argv[1:])
    return make_report(args.runs, args.out, command)


if __name__ == "__main__":
    sys.exit(main())
