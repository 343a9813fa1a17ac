"""report.md: the settings, the results table, each data setting's figures with captions, and the run
directories; :func:`write_report` writes it with summary.csv, table.md and the figures."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path

from fedlt.errors import FedLTError
from fedlt.report.figures import (
    FIGURES,
    fig_accuracy_rounds,
    fig_group_accuracy,
    fig_partition,
    fig_per_class,
    fig_prior,
    fig_reliability,
)
from fedlt.report.runs import Run, enclosing_run
from fedlt.report.tables import (
    Row,
    build_rows,
    data_distinctions,
    describe_test_sets,
    markdown_table,
    row_labels,
    settings_table,
    some_seeds_lack_a_metric,
    write_csv,
)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def _data_title(row: Row) -> str:
    beta = row.column("beta")
    return f"{row.column('data')}" + ("" if beta == "–" else f", β={beta}")


def check_report_dir(out: str | Path) -> Path:
    """Raise :class:`FedLTError` (one line) unless a report can be written into the folder ``out``: it is a
    writable folder, or it can be created (its nearest existing parent is a writable folder). Creates
    nothing (a nameless temporary file tries the folder); returns ``out`` as a Path."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise FedLTError(f"report folder {out} is an existing file, not a folder")
    if (run := enclosing_run(out)) is not None:
        raise FedLTError(f"report folder {out} is inside the run directory {run}: give a folder outside it, so that "
                         f"the report's files do not mix with the run's")
    base = out
    while not base.exists() and base != base.parent:
        base = base.parent
    if not base.is_dir():
        raise FedLTError(f"report folder {out} cannot be created: {base} is not a folder")
    try:  # tried, not asked: os.access says yes to root everywhere, /proc and read-only mounts included
        with tempfile.TemporaryFile(dir=base):
            pass
    except OSError as exc:
        raise FedLTError(f"report folder {out} cannot be written: {base} is not writable "
                         f"({exc.strerror or exc})") from None
    return out


def write_report(runs: list[Run], out: str | Path, errors: list[str] | None = None,
                 command: str | None = None) -> Path:
    """Write summary.csv, table.md, the figures (PNG + PDF) and report.md into ``out``; return report.md.

    Everything is written into a temporary folder beside ``out`` first and moved into ``out`` at the end,
    so a failure leaves no partial report (and an earlier report in ``out`` untouched)."""
    out = check_report_dir(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        _write_report(runs, staging, errors, command)
        out.mkdir(exist_ok=True)
        for stem in FIGURES:  # figures of an earlier report in the same folder
            for old in [*out.glob(f"{stem}.*"), *out.glob(f"{stem}-*.*")]:
                if old.suffix in (".png", ".pdf"):
                    old.unlink()
        for f in sorted(staging.iterdir(), key=lambda f: f.name == "report.md"):  # report.md last
            f.replace(out / f.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out / "report.md"


def _free_suffix(sfx: str, used: set[str]) -> str:
    """``sfx``, or ``sfx-2``, ``sfx-3`` … where it is taken; recorded in ``used``."""
    out, i = sfx, 1
    while out in used:
        i += 1
        out = f"{sfx}-{i}"
    used.add(out)
    return out


def _write_report(runs: list[Run], out: Path, errors: list[str] | None, command: str | None) -> None:
    rows = build_rows(runs)
    write_csv(rows, out / "summary.csv")
    table = markdown_table(rows)
    (out / "table.md").write_text(table + "\n")

    by_data: dict[str, list[Row]] = {}
    for r in rows:
        by_data.setdefault(r.data_key, []).append(r)
    multi = len(by_data) > 1
    apart = data_distinctions(rows)
    sections: list[str] = []
    used: set[str] = set()  # figure file suffixes: one data setting's figures never overwrite another's
    for key, rs in by_data.items():
        labels = row_labels(rs)
        name = _data_title(rs[0]) + (f", {apart[key]}" if apart[key] else "")
        beta = rs[0].column("beta")
        sfx = (f"-{_slug(rs[0].column('data'))}" + ("" if beta == "–" else f"-beta{beta}")
               + (f"-{_slug(apart[key])}" if apart[key] else "")) if multi else ""
        sfx = _free_suffix(sfx, used)
        head = f"### {name}\n\n" if multi else ""
        part = [head]
        files = fig_accuracy_rounds(rs, labels, out, f"accuracy_rounds{sfx}", f"Test accuracy per round ({name})")
        part.append(_figure(files, "Accuracy per round",
                            "Test accuracy of the global model after each evaluated round (`eval.every`; mean over "
                            "seeds, at the rounds every seed of the row evaluated; band: min–max over seeds). "
                            "Horizontal lines: final accuracy of the centralized baselines "
                            "(mean over seeds)." if files else "No federated run in this setting."))
        files = fig_group_accuracy(rs, labels, out, f"group_accuracy{sfx}", f"Accuracy by class group ({name})")
        rule = rs[0].runs[0].summary.get("group_rule")
        part.append(_figure(files, "Many / medium / few-shot accuracy",
                            f"Mean over seeds; error bars: sample std. Groups: {rule}."))
        files = fig_per_class(rs, labels, out, f"per_class{sfx}", f"Per-class accuracy ({name})")
        part.append(_figure(files, "Per-class accuracy against training-set size",
                            "Each marker is one class (final model, mean over seeds); the x-axis is the class's "
                            "number of training samples in the long-tailed training set."))
        seen_parts: list[str] = []
        pfiles: list[str] = []
        for r in rs:
            if r.mode != "federated":
                continue
            run = r.runs[0]
            p, k = r.partition_text(), r.column("clients")
            desc = ("Dirichlet " if r.get("partition.method") == "dirichlet" else "") + f"{p}, K={k}"
            if desc in seen_parts:
                continue
            seen_parts.append(desc)
            pfiles.append(f"partition{sfx}-{_slug(p.replace('α=', 'alpha'))}-K{k}")
            fig_partition(run, out, pfiles[-1], f"Client × class partition ({desc}, seed {run.seed})")
        if len(pfiles) == 1:  # one partition setting: a plain name
            for ext in ("png", "pdf"):
                (out / f"{pfiles[0]}.{ext}").replace(out / f"partition{sfx}.{ext}")
            pfiles = [f"partition{sfx}"]
        pfiles = [f"{stem}.{ext}" for stem in pfiles for ext in ("png", "pdf")]
        part.append(_figure(pfiles, "Client × class partition",
                            "Training samples of each class held by each client (first seed of each partition "
                            "setting; log colour scale; white: none)."
                            if pfiles else "No federated run in this setting."))
        files = fig_prior(rs, labels, out, f"prior{sfx}", f"Global class prior ({name})")
        part.append(_figure(files, "Estimated vs true global prior",
                            "Grey bars: true class prior of the long-tailed training set; markers: the prior the "
                            "strategy estimated (mean over seeds), with the L1 distance of each seed's estimate to the truth, "
                            "averaged over seeds."
                            if files else "None of these runs estimates a global class prior (no "
                                          "`pi_hat` in summary.json); figure skipped."))
        files = fig_reliability(rs, labels, out, f"reliability{sfx}")
        part.append(_figure(files, "Reliability diagrams",
                            "Accuracy of the test predictions in each of 15 confidence bins (pooled over seeds); "
                            "dashed: perfect calibration; hatched: gap. The ECE over each panel is the results table's: the "
                            "mean of the seeds' ECEs (the pooled bins' own gap may differ slightly)."
                            if files else "No reliability bins in these runs' summary.json."))
        sections.append("\n".join(part))

    test_set = "balanced test set" if describe_test_sets(runs) == "balanced" else "test set of each row's data setting"
    lines = ["# fedlt comparison report", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += ["## Settings", "", settings_table(runs, rows), "",
              "## Results", "",
              f"Test metrics of the final model on the {test_set}, in %: mean ± sample standard deviation "
              "(n − 1) over seeds (no ± for a single seed). *Seeds*: number of seeds in the row. "
              "*Δ best central*: accuracy minus the best centralized accuracy of the same data setting, in "
              "percentage points. Lower ECE is better. "
              + ("*(k/n)* after a value: only k of the row's n seeds have that metric (the others' summary.json "
                 "holds null: not measured, or not finite); the mean and std are over those k. "
                 if some_seeds_lack_a_metric(rows) else "")
              + "The same numbers as fractions: [summary.csv](summary.csv).", "", table, ""]
    bad = [r for r in runs if r.summary.get("non_finite")]
    if bad:
        lines += ["## Runs with non-finite values", "",
                  "These runs' summary.json holds null where a value was NaN or infinite (e.g. a diverged run); "
                  "the table leaves those values out:", ""]
        lines += [f"- `{r.path}`: {_keys(r.summary['non_finite'])}" for r in bad] + [""]
    failed = [r for r in runs if isinstance(r.summary.get("failures"), dict) and r.summary["failures"].get("total")]
    if failed:
        lines += ["## Runs with client failures", "",
                  "In these runs some clients' replies failed and were left out of their rounds' aggregates "
                  "(within `federation.max_failures`); their rows above average them with the other seeds:", ""]
        lines += [f"- `{r.path}`: {_failures(r.summary['failures'])}" for r in failed] + [""]
    lines += ["## Figures", "", "Each figure is also saved as PDF (same name).", ""] + sections
    if errors:
        lines += ["## Runs that could not be read", ""] + [f"- {e}" for e in errors] + [""]
    lines += ["## Run directories", ""]
    for r, lab in zip(rows, row_labels(rows)):
        lines.append(f"- {lab}: " + ", ".join(f"`{x.path}`" for x in r.runs)
                     + "".join(f" (left out `{x.path}`: same config and seed as a run above)" for x in r.repeated))
    (out / "report.md").write_text("\n".join(lines) + "\n")


def _failures(failures: dict) -> str:
    """summary.json's ``failures`` as text: ``3 failed client replies (round 1: 1, round 4: 2)``."""
    where = [f"round {t}: {n}" for t, n in enumerate(failures.get("per_round") or [], 1) if n]
    if failures.get("setup"):
        where.insert(0, f"set-up queries: {failures['setup']}")
    total = failures["total"]
    return f"{total} failed client repl{'y' if total == 1 else 'ies'}" + (f" ({', '.join(where)})" if where else "")


def _keys(value: object) -> str:
    """summary.json's ``non_finite`` (a list of dotted keys) as text."""
    return ", ".join(map(str, value)) if isinstance(value, list) else str(value)


def _figure(files: list[str], heading: str, caption: str) -> str:
    pngs = [f for f in files if f.endswith(".png")]
    body = "".join(f"![{heading}]({f})\n" for f in pngs)
    pdfs = ", ".join(f"[{f}]({f})" for f in files if f.endswith(".pdf"))
    return f"#### {heading}\n\n{body}\n{caption}" + (f" PDF: {pdfs}." if pdfs else "") + "\n"
