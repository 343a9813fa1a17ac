"""Rows of the comparison: runs grouped over seeds, their statistics, summary.csv and the markdown tables.

Runs whose configs are equal up to the seed (and bookkeeping such as the run name, device or data root,
:data:`fedlt.report.runs.BOOKKEEPING`) and that trained and were tested on the same class counts form one *row*:
mean ± sample standard deviation (n − 1) over their seeds. The *data setting* of a row is its ``data`` and ``model``
sections and its training and test sets' class counts: federated and centralized rows of the same data setting are
compared (the gap to the best centralized accuracy).

numpy, not pandas, does the grouping: a row is keyed by its whole flattened setting and leaves out a
repeated seed, and its statistics are a mean and a standard deviation of a few numbers each.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fedlt.report.runs import Run, images_text
from fedlt.sweep import flatten

METRICS = ("accuracy", "balanced_accuracy", "many", "medium", "few", "ece", "local_accuracy")
HEADERS = {"accuracy": "Acc", "balanced_accuracy": "Bal. acc", "many": "Many", "medium": "Med.", "few": "Few",
           "ece": "ECE", "local_accuracy": "Local acc"}
# local_accuracy: the mean over clients of each personalised model's accuracy on its own local test set
# (fedlt/federation/local_eval.py; eval.local), beside the global model's accuracy; n/a where not evaluated.
# Throughput (mean over seeds): wall-clock seconds per round (federated) or epoch (centralized), evaluation
# included; training images per second of training time (images: epochs × examples of every trained client).
SPEED = ("seconds_per_round_or_epoch", "images_per_second")
SPEED_HEADERS = {"seconds_per_round_or_epoch": "s / round or epoch", "images_per_second": "img/s"}


def speed_value(summary: dict, key: str) -> float | None:
    """``key`` of :data:`SPEED` from a summary (None for runs written before fedlt recorded it)."""
    if key == "seconds_per_round_or_epoch":
        return summary.get("seconds_per_round", summary.get("seconds_per_epoch"))
    return summary.get(key)
# Keys that the table shows in their own columns.
DIRICHLET_PREFIX = {"creff_dirichlet": "CReFF", "multinomial_dirichlet": "multinomial"}  # other Dirichlet routines
COLUMN_KEYS = ("data.name", "data.imbalance_factor", "partition.method", "partition.alpha",
               "partition.num_clients", "partition.shards_per_client", "strategy.name", "centralized.method")


# ---------------------------------------------------------------------------------------------- rows
def mean_std(values: list[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of the non-null values; None for no value (the std: for
    fewer than two)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None)


@dataclass
class Row:
    """Runs of one mode, method and setting that differ only in their seed."""

    mode: str
    method: str
    setting: dict[str, Any]
    runs: list[Run]
    stats: dict[str, tuple[float | None, float | None]] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)  # seeds with a value of each metric (not null)
    gap: float | None = None  # accuracy minus the best centralized accuracy of the data setting
    # (key, value) of the keys that tell apart rows of the same method, e.g. ("strategy.mu", "0.1")
    other_items: list[tuple[str, str]] = field(default_factory=list)
    repeated: list[Run] = field(default_factory=list)  # runs of the same config and seed, left out

    @property
    def other(self) -> str:
        return ", ".join(f"{k}={v}" for k, v in self.other_items)

    @property
    def seeds(self) -> list:
        return [r.seed for r in self.runs]

    @property
    def data_key(self) -> str:
        return self.runs[0].data_key()

    def get(self, key: str, default: Any = None) -> Any:
        return self.setting.get(key, default)

    def column(self, name: str) -> str:
        """The value shown in the table column ``name`` (data, beta, alpha, clients)."""
        g = self.get
        if name == "data":
            return str(g("data.name"))
        if name == "beta":
            return "–" if g("data.profile") == "none" else fmt_value(g("data.imbalance_factor"))
        if self.mode == "centralized":
            return "–"
        if name == "alpha":
            method = g("partition.method")
            if method == "dirichlet":
                return fmt_value(g("partition.alpha"))
            if method in DIRICHLET_PREFIX:
                return f"{DIRICHLET_PREFIX[method]} {fmt_value(g('partition.alpha'))}"
            return "IID" if method == "iid" else f"{g('partition.shards_per_client')} shards"
        return str(g("partition.num_clients"))

    def partition_text(self) -> str:
        """The partition as a legend says it: ``α=0.5`` (Dirichlet), ``CReFF α=0.5`` (creff_dirichlet),
        ``multinomial α=0.5`` (multinomial_dirichlet), ``2 shards`` (per client), ``IID``; ``–`` for a centralized
        row."""
        alpha = fmt_value(self.get("partition.alpha"))
        method = self.get("partition.method")
        if self.mode == "federated" and method == "dirichlet":
            return f"α={alpha}"
        if self.mode == "federated" and method in DIRICHLET_PREFIX:
            return f"{DIRICHLET_PREFIX[method]} α={alpha}"
        return self.column("alpha")

    def per_class(self) -> np.ndarray:
        arr = np.array([[np.nan if a is None else a for a in r.summary["per_class"]] for r in self.runs], float)
        with np.errstate(all="ignore"):
            return np.nanmean(arr, axis=0)

    def reliability(self) -> dict[str, np.ndarray] | None:
        """Bins pooled over the seeds (counts summed, accuracy and confidence count-weighted)."""
        bins = [r.summary.get("reliability") for r in self.runs]
        if not bins or any(not isinstance(b, dict) or "count" not in b for b in bins):
            return None
        count = np.sum([b["count"] for b in bins], axis=0).astype(float)
        out = {"count": count}
        for k in ("accuracy", "confidence"):
            tot = np.sum([np.asarray(b[k], float) * np.asarray(b["count"], float) for b in bins], axis=0)
            with np.errstate(all="ignore"):
                out[k] = np.where(count > 0, tot / np.maximum(count, 1), np.nan)
        return out


def build_rows(runs: list[Run]) -> list[Row]:
    """Group runs into rows (same mode, method and setting up to the seed), with statistics and gaps."""
    groups: dict[str, list[Run]] = {}
    repeated: dict[str, list[Run]] = {}
    for r in sorted(runs, key=lambda r: (r.seed, str(r.path))):  # (seeds are whole numbers: read_run checks)
        key = json.dumps([r.mode, r.summary["method"], r.setting(), r.data_key()], sort_keys=True, default=str)
        if any(str(x.seed) == str(r.seed) for x in groups.get(key, [])):
            repeated.setdefault(key, []).append(r)  # the same run again (e.g. under another name)
            continue
        groups.setdefault(key, []).append(r)
    rows = [Row(g[0].mode, str(g[0].summary["method"]), g[0].setting(), g, repeated=repeated.get(k, []))
            for k, g in groups.items()]
    for row in rows:
        row.stats = {m: mean_std([r.summary.get(m) for r in row.runs]) for m in METRICS}
        row.counts = {m: sum(r.summary.get(m) is not None for r in row.runs) for m in METRICS}
        row.stats.update({k: mean_std([speed_value(r.summary, k) for r in row.runs]) for k in SPEED})
    best: dict[str, float] = {}
    for row in rows:
        acc = row.stats["accuracy"][0]
        if row.mode == "centralized" and acc is not None:
            best[row.data_key] = max(best.get(row.data_key, -1.0), acc)
    for row in rows:
        acc = row.stats["accuracy"][0]
        row.gap = acc - best[row.data_key] if acc is not None and row.data_key in best else None
    # keys (beyond the columns) whose values tell apart rows of the same method
    by_method: dict[tuple, list[Row]] = {}
    for row in rows:
        by_method.setdefault((row.mode, row.method), []).append(row)
    for same in by_method.values():
        keys = sorted({k for row in same for k in row.setting})
        varying = [k for k in keys  # (among the rows that read the key: α is no difference of an IID row)
                   if k not in COLUMN_KEYS
                   and len({json.dumps(r.get(k), default=str) for r in same if k in r.setting}) > 1]
        for row in same:
            row.other_items = [(k, fmt_value(row.get(k))) for k in varying if k in row.setting]
    rows.sort(key=lambda r: (str(r.get("data.name")), _num(r.get("data.imbalance_factor")), r.data_key,
                             r.mode != "centralized", r.method, str(r.get("partition.method")),
                             _num(r.get("partition.alpha")), _num(r.get("partition.num_clients")), r.other))
    return rows


def data_distinctions(rows: list[Row]) -> dict[str, str]:
    """For each data setting of ``rows`` (:attr:`Row.data_key`), the ``data`` / ``model`` keys that tell it apart
    from the other settings of the same data set and β, e.g. ``model.name=resnet8`` or ``train images=14886
    (6000→60)`` (two roots or list files of one config); ``""`` where none does."""
    settings = {r.data_key: json.loads(r.data_key) for r in rows}
    same: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        keys = same.setdefault((r.column("data"), r.column("beta")), [])
        if r.data_key not in keys:
            keys.append(r.data_key)
    out = {}
    for keys in same.values():
        names = sorted({k for d in keys for k in settings[d]} - {"data.name", "data.imbalance_factor"})
        varying = [k for k in names if len({json.dumps(settings[d].get(k), default=str) for d in keys}) > 1]
        out.update({d: ", ".join(f"{k}={fmt_value(settings[d].get(k))}" for k in varying) for d in keys})
    return out


def fmt_value(v: Any) -> str:
    """A config value as the table shows it (floats in ``%g``, ``?`` for a missing one)."""
    return f"{v:g}" if isinstance(v, float) else "?" if v is None else str(v)


def _num(v: Any) -> float:
    return float(v) if isinstance(v, (int, float)) else 0.0


def row_labels(rows: list[Row]) -> list[str]:
    """Short legend labels: mode and method, plus α / K / other only where they differ among ``rows``."""
    fed = [r for r in rows if r.mode == "federated"]
    vary_alpha = len({r.column("alpha") for r in fed}) > 1
    vary_k = len({r.column("clients") for r in fed}) > 1
    labels = []
    for row in rows:
        extra = []
        if row.mode == "federated" and vary_alpha:
            extra.append(row.partition_text())
        if row.mode == "federated" and vary_k:
            extra.append(f"K={row.column('clients')}")
        extra += [f"{k.split('.')[-1]}={v}" for k, v in row.other_items]
        name = ("FL " if row.mode == "federated" else "Central ") + row.method
        labels.append(name + (f" ({', '.join(extra)})" if extra else ""))
    return labels


# ---------------------------------------------------------------------------------------------- table
def pct(v: float | None, digits: int = 1) -> str:
    """A fraction in % (``–`` for None)."""
    return "–" if v is None else f"{100 * v:.{digits}f}"


def cell(stat: tuple[float | None, float | None], n: int | None = None, seeds: int | None = None) -> str:
    """``mean ± std`` in %, ``mean`` for one seed, n/a for none; `` (n/seeds)`` after it where only ``n`` of the
    row's ``seeds`` runs have the metric (the others' summary.json holds null: not measured, or not finite)."""
    mean, std = stat
    if mean is None:
        return "n/a"
    text = pct(mean) if std is None else f"{pct(mean)} ± {pct(std)}"
    return text + (f" ({n}/{seeds})" if n is not None and seeds is not None and n < seeds else "")


def some_seeds_lack_a_metric(rows: list[Row]) -> bool:
    """Whether some cell of the results table says ``(k/n)`` (:func:`cell`)."""
    return any(r.stats[m][0] is not None and r.counts.get(m) is not None and r.counts[m] < len(r.runs)
               for r in rows for m in METRICS)


def markdown_table(rows: list[Row]) -> str:
    """The results table (table.md): one line per row, metrics in % as mean ± std over seeds; the *Data* column
    adds the keys that tell apart data settings of the same data set and β (:func:`data_distinctions`); the
    *Other* column only where some row has keys that tell it apart from rows of the same method; *Local acc*
    only where some row has a local evaluation."""
    metrics = [m for m in METRICS if m != "local_accuracy" or any(r.stats[m][0] is not None for r in rows)]
    head = ["Mode", "Method", "Data", "β", "α", "K", "Other", "Seeds"] + [HEADERS[m] for m in metrics] + \
           ["Δ best central"] + [SPEED_HEADERS[k] for k in SPEED]
    if not any(r.other for r in rows):
        head.remove("Other")
    text = ("Mode", "Method", "Data", "Other")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in text else "--:" for h in head) + "|"]
    apart = data_distinctions(rows)
    for r in rows:
        data = r.column("data") + (f" ({apart[r.data_key]})" if apart[r.data_key] else "")
        cells = ["FL" if r.mode == "federated" else "Central", r.method, data, r.column("beta"),
                 r.column("alpha"), r.column("clients")] + ([r.other or "–"] if "Other" in head else []) + \
                [str(len(r.runs))] + [cell(r.stats[m], r.counts.get(m), len(r.runs)) for m in metrics] + \
                ["–" if r.gap is None else f"{100 * r.gap:+.1f}"] + \
                [_speed(r.stats["seconds_per_round_or_epoch"][0], "{:.1f}"),
                 _speed(r.stats["images_per_second"][0], "{:.0f}")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _speed(v: float | None, fmt: str) -> str:
    return "–" if v is None else fmt.format(v)


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per row; metrics as fractions (as in summary.json): <metric>_mean, <metric>_std, gap, and
    <metric>_n: the seeds whose summary has the metric (not null), of n_seeds."""
    cols = ["mode", "method", "data", "data_setting", "imbalance_factor", "alpha", "clients", "other", "n_seeds",
            "seeds"]
    cols += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["gap_to_best_centralized", "runs"]
    cols += [f"{k}_mean" for k in SPEED] + [f"{m}_n" for m in METRICS]
    apart = data_distinctions(rows)  # what tells a row's data setting apart from others of its data set and β
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            vals = [r.mode, r.method, r.column("data"), apart[r.data_key]]
            vals += [r.column(c).replace("–", "") for c in ("beta", "alpha", "clients")]
            vals += [r.other, len(r.runs), " ".join(str(s) for s in r.seeds)]
            for m in METRICS:
                mean, std = r.stats[m]
                vals += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
            vals += ["" if r.gap is None else repr(r.gap), " ".join(str(x.path) for x in r.runs)]
            vals += ["" if r.stats[k][0] is None else repr(r.stats[k][0]) for k in SPEED]
            vals += [r.counts.get(m, len(r.runs)) for m in METRICS]
            w.writerow(vals)


# ---------------------------------------------------------------------------------------------- settings
def _values(runs: list[Run], key: str) -> list:
    out = []
    for r in runs:
        v = flatten(r.config).get(key)
        if v is not None and v not in out:
            out.append(v)
    return sorted(out, key=str)


def _join(vals: list, none: str = "–") -> str:
    return ", ".join(fmt_value(v) for v in vals) if vals else none


def describe_test_sets(runs: list[Run]) -> str:
    """The runs' test sets as the report describes them: ``balanced`` where every run that recorded its test
    class counts was tested on the same number of images of each class, else their sizes (:func:`images_text`),
    smallest first, e.g. ``1000 (100→100), 14886 (6000→60) images`` (one run tested on its training images)."""
    recorded = [r.test_class_counts for r in runs if r.test_class_counts is not None]
    if all(len(set(c)) <= 1 for c in recorded):
        return "balanced"
    return _join([text for _, text in sorted({(sum(c), images_text(c)) for c in recorded})]) + " images"


def settings_table(runs: list[Run], rows: list[Row]) -> str:
    """The report's *Settings* table: what the runs have in common or span (data, partition, rounds,
    seeds, hardware, wall clock) — of the runs in ``rows``: those of ``runs`` left out as repeats of a config and
    seed are counted apart, not twice."""
    left_out = sum(len(r.repeated) for r in rows)
    runs = [x for r in rows for x in r.runs]
    fed = [r for r in runs if r.mode == "federated"]
    cen = [r for r in runs if r.mode == "centralized"]
    env = [r.env for r in runs if r.env]
    hardware = sorted({", ".join(x for x in (e.get("gpu") or e.get("device", "?"),
                                             f"{e['cpu_threads']} CPU threads" if e.get("cpu_threads") else "",
                                             f"torch {e.get('torch', '?')}", f"flwr {e.get('flwr', '?')}",
                                             e.get("platform", "")) if x) for e in env}) or ["unknown (no env.json)"]
    models = _values(runs, "model.name")
    dirichlet = [r for r in fed if str(flatten(r.config).get("partition.method")).endswith("dirichlet")]
    cut = [r for r in runs if flatten(r.config).get("data.profile") != "none"]  # β is unused with profile none
    seconds = sum(float(r.summary.get("wall_clock_seconds") or 0) for r in runs)
    peaks = [(float(e["peak_memory_mib"]), e.get("peak_memory_of", "")) for e in env if e.get("peak_memory_mib")]
    peak = max(peaks) if peaks else None
    items = [
        ("Runs", f"{len(runs)} ({len(fed)} federated, {len(cen)} centralized) in {len(rows)} table rows"
                 + (f"; {left_out} more left out (the same config and seed as a run counted)" if left_out else "")),
        ("Data", _join(_values(runs, "data.name")) + f" (long-tail profile: {_join(_values(runs, 'data.profile'))}; "
                                                     f"test set {describe_test_sets(runs)})"),
        ("Imbalance factor β = N_max/N_min", _join(_values(cut, "data.imbalance_factor"), "– (data.profile none)")),
        ("Model", _join(models, "data set default")),
        ("Partition", f"{_join(_values(fed, 'partition.method'))}; Dirichlet α: "
                      f"{_join(_values(dirichlet, 'partition.alpha'))}"),
        ("Clients K", _join(_values(fed, "partition.num_clients"))
         + f" (fraction per round: {_join(_values(fed, 'federation.fraction'))})"),
        ("Rounds", _join(_values(fed, "federation.rounds"))
         + f" (local epochs: {_join(_values(fed, 'train.local_epochs'))})"),
        ("Centralized epochs", _join(_values(cen, "centralized.epochs"))),
        ("Seeds", _join(sorted({r.seed for r in runs}))),
        ("Group rule", _join(sorted({str(r.summary.get("group_rule", "?")) for r in runs}))),
        ("Hardware", "; ".join(hardware)),
        ("Peak memory", "unknown (not in env.json)" if peak is None else
         f"{peak[0]:.0f} MiB ({peak[1]}; the largest of the runs)"),
        ("Wall clock", f"{seconds / 60:.1f} min of training and evaluation over all runs"),
    ]
    return "| Setting | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in items)
