"""The comparison report: read run directories, aggregate over seeds, write a table, figures and report.md.

Reads nothing but run directories (config.yaml, summary.json, metrics.jsonl, partition.json, env.json,
done). Runs whose configs are equal up to the seed (and bookkeeping such as the run name, device or
data root) form one *row*: mean ± sample standard deviation (n − 1) over their seeds. A centralized
run ignores the federated sections of its config (partition, federation, strategy, client), as in
:mod:`fedlt.sweep`. The *data setting* of a row is its ``data`` and ``model`` sections: federated and
centralized rows of the same data setting are compared, and each figure is drawn per data setting.
"""

from __future__ import annotations

import csv
import json
import math
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from fedlt.sweep import CENTRALIZED_ONLY, FEDERATED_ONLY, flatten

REQUIRED = ("config.yaml", "summary.json", "metrics.jsonl", "partition.json", "done")
MARKERS = ("config.yaml", "summary.json", "metrics.jsonl", "partition.json", "done")
METRICS = ("accuracy", "balanced_accuracy", "many", "medium", "few", "ece")
HEADERS = {"accuracy": "Acc", "balanced_accuracy": "Bal. acc", "many": "Many", "medium": "Med.", "few": "Few",
           "ece": "ECE"}
SUMMARY_KEYS = ("mode", "method", "accuracy", "balanced_accuracy", "ece", "per_class", "train_class_counts")
# Config keys that do not change a run's result.
BOOKKEEPING = ("name", "seed", "mode", "device", "eval.", "sweep", "plugins", "data.root", "data.train_list",
               "data.test_list", "federation.client_cpus", "federation.client_gpus",
               "federation.checkpoint_every", "federation.max_failures")
# Keys that the table shows in their own columns.
COLUMN_KEYS = ("data.name", "data.imbalance_factor", "partition.method", "partition.alpha",
               "partition.num_clients", "partition.shards_per_client", "strategy.name", "centralized.method")
FIGURES = ("accuracy_rounds", "group_accuracy", "per_class", "partition", "prior", "reliability")


class RunError(Exception):
    """A run directory that cannot be read; the message is one line naming it."""


# ---------------------------------------------------------------------------------------------- reading
@dataclass
class Run:
    path: Path
    config: dict
    summary: dict
    metrics: list[dict]
    partition: dict
    env: dict

    @property
    def mode(self) -> str:
        return self.summary["mode"]

    @property
    def seed(self) -> Any:
        return self.summary.get("seed", self.config.get("seed"))

    def setting(self) -> dict[str, Any]:
        """The flattened config that decides the result, without the seed and bookkeeping."""
        ignored = CENTRALIZED_ONLY if self.mode == "federated" else FEDERATED_ONLY
        flat = flatten({k: v for k, v in self.config.items() if k not in ignored})
        return {k: v for k, v in flat.items() if not _bookkeeping(k)}

    def data_key(self) -> str:
        s = self.setting()
        return json.dumps({k: v for k, v in s.items() if k.startswith(("data.", "model."))}, sort_keys=True)


def _bookkeeping(key: str) -> bool:
    return any(key == b or (b.endswith(".") and key.startswith(b)) or key.startswith(b + ".") for b in BOOKKEEPING)


def _read_json(path: Path, name: str) -> Any:
    try:
        return json.loads((path / name).read_text())
    except json.JSONDecodeError as exc:
        raise RunError(f"{path}: {name} is not valid JSON ({exc.msg} at line {exc.lineno})") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read {name} ({exc.__class__.__name__})") from None


def read_run(path: str | Path) -> Run:
    """Read one finished run directory; a missing or corrupt file raises :class:`RunError` naming it."""
    path = Path(path)
    if not path.is_dir():
        raise RunError(f"{path}: not a directory")
    missing = [n for n in REQUIRED if not (path / n).is_file()]
    if missing:
        what = "unfinished run (no 'done' file)" if missing == ["done"] else f"missing {', '.join(missing)}"
        raise RunError(f"{path}: {what}")
    try:
        config = yaml.safe_load((path / "config.yaml").read_text())
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: config.yaml is not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(config, dict):
        raise RunError(f"{path}: config.yaml does not hold a mapping")
    summary = _read_json(path, "summary.json")
    if not isinstance(summary, dict) or any(k not in summary for k in SUMMARY_KEYS):
        lacks = [k for k in SUMMARY_KEYS if not isinstance(summary, dict) or k not in summary]
        raise RunError(f"{path}: summary.json lacks {', '.join(lacks)}")
    if summary["mode"] not in ("federated", "centralized"):
        raise RunError(f"{path}: summary.json has unknown mode {summary['mode']!r}")
    metrics = []
    for i, line in enumerate((path / "metrics.jsonl").read_text().splitlines(), 1):
        if line.strip():
            try:
                metrics.append(json.loads(line))
            except json.JSONDecodeError:
                raise RunError(f"{path}: metrics.jsonl line {i} is not valid JSON") from None
    partition = _read_json(path, "partition.json")
    if not isinstance(partition, dict) or "client_class_counts" not in partition:
        raise RunError(f"{path}: partition.json lacks client_class_counts")
    env = _read_json(path, "env.json") if (path / "env.json").is_file() else {}
    return Run(path, config, summary, metrics, partition, env)


def find_run_dirs(path: str | Path) -> list[Path]:
    """``path`` itself if it is a run directory, else the run directories below it (sorted)."""
    path = Path(path)
    if any((path / m).exists() for m in MARKERS):
        return [path]
    if not path.is_dir():
        raise RunError(f"{path}: no such run directory or folder")
    found = sorted({p.parent for m in MARKERS for p in path.rglob(m)})
    # a run directory's own subfolders are not runs
    found = [p for p in found if not any(q != p and q in p.parents for q in found)]
    if not found:
        raise RunError(f"{path}: holds no run directories")
    return found


def load_runs(paths: list[str | Path]) -> tuple[list[Run], list[str]]:
    """All readable runs under ``paths`` and a one-line error for each unreadable one."""
    runs, errors, seen = [], [], set()
    for p in paths:
        try:
            dirs = find_run_dirs(p)
        except RunError as exc:
            errors.append(str(exc))
            continue
        for d in dirs:
            if d.resolve() in seen:
                continue
            seen.add(d.resolve())
            try:
                runs.append(read_run(d))
            except RunError as exc:
                errors.append(str(exc))
    return runs, errors


# ---------------------------------------------------------------------------------------------- rows
def mean_std(values: list[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (n − 1; None for one value) and count of the non-null values."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return None, None, 0
    return float(np.mean(v)), (float(np.std(v, ddof=1)) if len(v) > 1 else None), len(v)


@dataclass
class Row:
    mode: str
    method: str
    setting: dict[str, Any]
    runs: list[Run]
    stats: dict[str, tuple[float | None, float | None, int]] = field(default_factory=dict)
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
            return "–" if g("data.profile") == "none" else _fmt_value(g("data.imbalance_factor"))
        if self.mode == "centralized":
            return "–"
        if name == "alpha":
            method = g("partition.method")
            if method == "dirichlet":
                return _fmt_value(g("partition.alpha"))
            return "IID" if method == "iid" else f"{g('partition.shards_per_client')} shards"
        return str(g("partition.num_clients"))

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
    for r in sorted(runs, key=lambda r: (str(r.seed), str(r.path))):
        key = json.dumps([r.mode, r.summary["method"], r.setting()], sort_keys=True, default=str)
        if any(str(x.seed) == str(r.seed) for x in groups.get(key, [])):
            repeated.setdefault(key, []).append(r)  # the same run again (e.g. under another name)
            continue
        groups.setdefault(key, []).append(r)
    rows = [Row(g[0].mode, str(g[0].summary["method"]), g[0].setting(), g, repeated=repeated.get(k, []))
            for k, g in groups.items()]
    for row in rows:
        row.stats = {m: mean_std([r.summary.get(m) for r in row.runs]) for m in METRICS}
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
        varying = [k for k in keys
                   if k not in COLUMN_KEYS and len({json.dumps(r.get(k), default=str) for r in same}) > 1]
        for row in same:
            row.other_items = [(k, _fmt_value(row.get(k))) for k in varying if k in row.setting]
    rows.sort(key=lambda r: (str(r.get("data.name")), _num(r.get("data.imbalance_factor")), r.data_key,
                             r.mode != "centralized", r.method, str(r.get("partition.method")),
                             _num(r.get("partition.alpha")), _num(r.get("partition.num_clients")), r.other))
    return rows


def _fmt_value(v: Any) -> str:
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
            a = row.column("alpha")
            extra.append(f"α={a}" if a[0].isdigit() else a)
        if row.mode == "federated" and vary_k:
            extra.append(f"K={row.column('clients')}")
        extra += [f"{k.split('.')[-1]}={v}" for k, v in row.other_items]
        name = ("FL " if row.mode == "federated" else "Central ") + row.method
        labels.append(name + (f" ({', '.join(extra)})" if extra else ""))
    return labels


# ---------------------------------------------------------------------------------------------- table
def _pct(v: float | None, digits: int = 1) -> str:
    return "–" if v is None else f"{100 * v:.{digits}f}"


def cell(stat: tuple[float | None, float | None, int]) -> str:
    mean, std, _ = stat
    if mean is None:
        return "n/a"
    return _pct(mean) if std is None else f"{_pct(mean)} ± {_pct(std)}"


def markdown_table(rows: list[Row]) -> str:
    head = ["Mode", "Method", "Data", "β", "α", "K", "Other", "Seeds"] + [HEADERS[m] for m in METRICS] + \
           ["Δ best central"]
    if not any(r.other for r in rows):
        head.remove("Other")
    text = ("Mode", "Method", "Data", "Other")
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" if h in text else "--:" for h in head) + "|"]
    for r in rows:
        cells = ["FL" if r.mode == "federated" else "Central", r.method, r.column("data"), r.column("beta"),
                 r.column("alpha"), r.column("clients")] + (["Other"] if "Other" in head else []) + \
                [str(len(r.runs))] + [cell(r.stats[m]) for m in METRICS] + \
                ["–" if r.gap is None else f"{100 * r.gap:+.1f}"]
        if "Other" in head:
            cells[6] = r.other or "–"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(rows: list[Row], path: Path) -> None:
    """One line per row; metrics as fractions (as in summary.json): <metric>_mean, <metric>_std, gap."""
    cols = ["mode", "method", "data", "imbalance_factor", "alpha", "clients", "other", "n_seeds", "seeds"]
    cols += [f"{m}_{s}" for m in METRICS for s in ("mean", "std")] + ["gap_to_best_centralized", "runs"]
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in rows:
            vals = [r.mode, r.method] + [r.column(c).replace("–", "") for c in ("data", "beta", "alpha", "clients")]
            vals += [r.other, len(r.runs), " ".join(str(s) for s in r.seeds)]
            for m in METRICS:
                mean, std, _ = r.stats[m]
                vals += ["" if mean is None else repr(mean), "" if std is None else repr(std)]
            vals += ["" if r.gap is None else repr(r.gap), " ".join(str(x.path) for x in r.runs)]
            w.writerow(vals)


# ---------------------------------------------------------------------------------------------- figures
WIDTH = 3.5  # inches: one column of a two-column paper
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # Okabe–Ito
MARKERS_ = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
HATCHES = ("", "///", "\\\\\\", "xxx", "...", "ooo", "---", "+++")


def _style(i: int) -> dict:
    return {"color": COLORS[i % len(COLORS)], "marker": MARKERS_[i % len(MARKERS_)],
            "linestyle": LINESTYLES[(i // 2) % len(LINESTYLES)]}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "legend.fontsize": 8,
                         "xtick.labelsize": 8, "ytick.labelsize": 8, "figure.dpi": 100, "savefig.dpi": 200,
                         "pdf.fonttype": 42, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _save(fig, out: Path, stem: str) -> list[str]:
    files = []
    for ext in ("png", "pdf"):
        fig.savefig(out / f"{stem}.{ext}", bbox_inches="tight", pad_inches=0.03)
        files.append(f"{stem}.{ext}")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return files


def _ncol(labels: list[str]) -> int:
    """Two legend columns where the labels fit in half the figure width, else one."""
    return 2 if len(labels) > 1 and max(len(x) for x in labels) <= 22 else 1


def _legend_below(ax, labels: list[str]) -> None:
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=_ncol(labels), frameon=False,
              handlelength=2.6, columnspacing=1.0, borderaxespad=0.3)


def _height(base: float, labels: list[str]) -> float:
    return base + 0.17 * math.ceil(max(len(labels), 1) / _ncol(labels))


def fig_accuracy_rounds(rows: list[Row], labels: list[str], out: Path, stem: str, title: str) -> list[str]:
    """Test accuracy per round of each federated row (mean over seeds, band: min–max), with each
    centralized row's final accuracy as a horizontal line."""
    fed = [(r, lab) for r, lab in zip(rows, labels) if r.mode == "federated"]
    cen = [(r, lab) for r, lab in zip(rows, labels) if r.mode == "centralized"]
    if not fed:
        return []
    plt = _plt()
    legend = [lab for _, lab in fed] + [f"{lab} (final)" for _, lab in cen]
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.3, legend)))
    max_round = 1
    for i, (r, lab) in enumerate(fed):
        curves = [{m["round"]: m["accuracy"] for m in run.metrics if "round" in m and m.get("accuracy") is not None}
                  for run in r.runs]
        rounds = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not rounds:
            continue
        acc = 100 * np.array([[c[t] for t in rounds] for c in curves])
        st = _style(i)
        ax.plot(rounds, acc.mean(0), label=lab, markersize=3.5, linewidth=1.2, markevery=max(1, len(rounds) // 10),
                **st)
        if len(curves) > 1:
            ax.fill_between(rounds, acc.min(0), acc.max(0), color=st["color"], alpha=0.15, linewidth=0)
        max_round = max(max_round, rounds[-1])
    for j, (r, lab) in enumerate(cen):
        mean = r.stats["accuracy"][0]
        if mean is not None:
            ax.axhline(100 * mean, color=("0.15", "0.45", "0.6")[j % 3], linewidth=1.1,
                       linestyle=(":", "--", "-.")[j % 3], label=f"{lab} (final)")
    ax.set_xlim(0.5, max_round + 0.5)
    if max_round <= 12:
        ax.set_xticks(range(1, max_round + 1))
    ax.set_xlabel("Communication round")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, linewidth=0.5)
    _legend_below(ax, legend)
    return _save(fig, out, stem)


def fig_group_accuracy(rows: list[Row], labels: list[str], out: Path, stem: str, title: str) -> list[str]:
    """Many / medium / few-shot accuracy per row as grouped bars (error bars: std over seeds)."""
    groups = ("many", "medium", "few")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.2, labels)))
    n = len(rows)
    width = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    for i, (r, lab) in enumerate(zip(rows, labels)):
        means = [np.nan if r.stats[g][0] is None else 100 * r.stats[g][0] for g in groups]
        errs = [0 if r.stats[g][1] is None else 100 * r.stats[g][1] for g in groups]
        ax.bar(x - 0.4 + width * (i + 0.5), means, width, yerr=errs if any(errs) else None, label=lab,
               color=COLORS[i % len(COLORS)], hatch=HATCHES[i % len(HATCHES)], edgecolor="black", linewidth=0.5,
               error_kw={"elinewidth": 0.7, "capsize": 1.5})
    ax.set_xticks(x, ["Many-shot", "Medium-shot", "Few-shot"])
    ax.set_ylabel("Test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.5)
    _legend_below(ax, labels)
    return _save(fig, out, stem)


def fig_per_class(rows: list[Row], labels: list[str], out: Path, stem: str, title: str) -> list[str]:
    """Per-class test accuracy against the class's training-set size (log axis)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.3, labels)))
    for i, (r, lab) in enumerate(zip(rows, labels)):
        counts = np.asarray(r.runs[0].summary["train_class_counts"], float)
        acc = 100 * r.per_class()
        order = np.argsort(counts)
        ok = order[(counts[order] > 0) & ~np.isnan(acc[order])]
        ax.plot(counts[ok], acc[ok], label=lab, markersize=3, linewidth=0.9, alpha=0.9, **_style(i))
    rule = rows[0].runs[0].summary.get("group_rule", "") if rows else ""
    if str(rule).startswith("count"):
        for t in (20, 100):
            ax.axvline(t, color="0.6", linewidth=0.6, linestyle=":")
    ax.set_xscale("log")
    ax.set_xlabel("Training samples of the class (log scale)")
    ax.set_ylabel("Per-class test accuracy (%)")
    ax.set_ylim(-3, 103)
    ax.set_title(title)
    ax.grid(True, alpha=0.3, linewidth=0.5, which="both")
    _legend_below(ax, labels)
    return _save(fig, out, stem)


def fig_partition(run: Run, out: Path, stem: str, title: str) -> list[str]:
    """Samples of each class on each client (log colour scale; white: none)."""
    from matplotlib.colors import LogNorm

    counts = np.asarray(run.partition["client_class_counts"], float)
    k, c = counts.shape
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, min(4.5, max(1.6, 0.6 + 0.16 * k))))
    masked = np.ma.masked_where(counts <= 0, counts)
    cmap = plt.get_cmap("viridis").with_extremes(bad="white")
    im = ax.imshow(masked, aspect="auto", cmap=cmap, interpolation="nearest",
                   norm=LogNorm(vmin=max(1.0, counts[counts > 0].min() if (counts > 0).any() else 1.0),
                                vmax=max(1.0, counts.max())))
    ax.set_xlabel("Class (training size decreasing →)" if _decreasing(run) else "Class")
    ax.set_ylabel("Client")
    step_x, step_y = max(1, c // 10), max(1, k // 10)
    ax.set_xticks(range(0, c, step_x))
    ax.set_yticks(range(0, k, step_y))
    for side in ("top", "right"):
        ax.spines[side].set_visible(True)
    cb = fig.colorbar(im, ax=ax, pad=0.02, fraction=0.06)
    cb.set_label("Training samples")
    ax.set_title(title)
    return _save(fig, out, stem)


def _decreasing(run: Run) -> bool:
    t = np.asarray(run.partition.get("train_class_counts") or [], float)
    return len(t) > 1 and bool(np.all(np.diff(t) <= 0))


def fig_prior(rows: list[Row], labels: list[str], out: Path, stem: str, title: str) -> list[str]:
    """Estimated against true global class prior for the rows whose strategy estimates one."""
    have = [(r, lab) for r, lab in zip(rows, labels)
            if all(run.summary.get("estimated_prior") is not None for run in r.runs)]
    if not have:
        return []
    plt = _plt()
    legend = ["True prior"] + [lab + ": L1 0.000" for _, lab in have]
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.2, legend)))
    true = np.asarray(have[0][0].runs[0].summary.get("true_prior")
                      or _normalised(have[0][0].runs[0].summary["train_class_counts"]), float)
    x = np.arange(len(true))
    ax.bar(x, true, width=0.8, color="0.85", edgecolor="0.4", linewidth=0.5, label="True prior")
    for i, (r, lab) in enumerate(have):
        est = np.mean([np.asarray(run.summary["estimated_prior"], float) for run in r.runs], axis=0)
        l1 = mean_std([run.summary.get("prior_l1") for run in r.runs])[0]
        extra = f": L1 {l1:.3f}" if l1 is not None else ""
        st = _style(i)
        ax.plot(x, est, linestyle="none", marker=st["marker"], color=st["color"], markersize=3.5,
                label=f"{lab}{extra}")
    ax.set_yscale("log")
    ax.set_xlabel("Class")
    ax.set_ylabel("Class prior (log scale)")
    ax.set_title(title)
    _legend_below(ax, legend)
    return _save(fig, out, stem)


def _normalised(counts: list) -> np.ndarray:
    c = np.asarray(counts, float)
    return c / c.sum()


def fig_reliability(rows: list[Row], labels: list[str], out: Path, stem: str) -> list[str]:
    """Reliability diagram per row: accuracy of each confidence bin against the diagonal (bins pooled
    over seeds); the gap to the diagonal is hatched."""
    have = [(r, lab, r.reliability()) for r, lab in zip(rows, labels)]
    have = [h for h in have if h[2] is not None]
    if not have:
        return []
    plt = _plt()
    ncol = 1 if len(have) == 1 else 2
    nrow = math.ceil(len(have) / ncol)
    size = (WIDTH * (0.62 if ncol == 1 else 1.0), 1.85 * nrow + 0.25)
    fig, axes = plt.subplots(nrow, ncol, figsize=size, squeeze=False, sharex=True, sharey=True,
                             layout="constrained")
    for ax in axes.flat[len(have):]:
        ax.set_visible(False)
    for i, (ax, (r, lab, b)) in enumerate(zip(axes.flat, have)):
        nb = len(b["count"])
        centers = (np.arange(nb) + 0.5) / nb
        acc = np.where(b["count"] > 0, b["accuracy"], 0.0)
        ax.bar(centers, acc, width=1 / nb, color=COLORS[0], edgecolor="black", linewidth=0.4, label="Accuracy")
        gap_lo, gap_hi = np.minimum(acc, centers), np.maximum(acc, centers)
        with plt.rc_context({"hatch.linewidth": 0.4, "hatch.color": "#D55E00"}):
            ax.bar(centers, np.where(b["count"] > 0, gap_hi - gap_lo, 0), bottom=gap_lo, width=1 / nb,
                   facecolor=(0.84, 0.37, 0.0, 0.2), hatch="//", edgecolor="#D55E00", linewidth=0.4, label="Gap")
        ax.plot([0, 1], [0, 1], color="0.3", linestyle="--", linewidth=0.8)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_aspect("equal")
        ece = r.stats["ece"][0]
        ax.set_title(textwrap.fill(lab, 26 if ncol == 2 else 40) + f"\nECE {_pct(ece)}%", fontsize=8)
        if i % ncol == 0:
            ax.set_ylabel("Accuracy")
        if i // ncol == nrow - 1 or i + ncol >= len(have):
            ax.set_xlabel("Confidence")
            ax.tick_params(labelbottom=True)
    return _save(fig, out, stem)


# ---------------------------------------------------------------------------------------------- report
def _values(runs: list[Run], key: str) -> list:
    out = []
    for r in runs:
        v = flatten(r.config).get(key)
        if v is not None and v not in out:
            out.append(v)
    return sorted(out, key=str)


def _join(vals: list, none: str = "–") -> str:
    return ", ".join(_fmt_value(v) for v in vals) if vals else none


def settings_table(runs: list[Run], rows: list[Row]) -> str:
    fed = [r for r in runs if r.mode == "federated"]
    cen = [r for r in runs if r.mode == "centralized"]
    env = [r.env for r in runs if r.env]
    hardware = sorted({", ".join(x for x in (e.get("gpu") or e.get("device", "?"),
                                             f"{e['cpu_threads']} CPU threads" if e.get("cpu_threads") else "",
                                             f"torch {e.get('torch', '?')}", f"flwr {e.get('flwr', '?')}",
                                             e.get("platform", "")) if x) for e in env}) or ["unknown (no env.json)"]
    models = _values(runs, "model.name")
    dirichlet = [r for r in fed if flatten(r.config).get("partition.method") == "dirichlet"]
    seconds = sum(float(r.summary.get("wall_clock_seconds") or 0) for r in runs)
    items = [
        ("Runs", f"{len(runs)} ({len(fed)} federated, {len(cen)} centralized) in {len(rows)} table rows"),
        ("Data", _join(_values(runs, "data.name")) + f" (long-tail profile: {_join(_values(runs, 'data.profile'))}; "
                                                     f"test set balanced)"),
        ("Imbalance factor β = N_max/N_min", _join(_values(runs, "data.imbalance_factor"))),
        ("Model", _join(models, "data set default")),
        ("Partition", f"{_join(_values(fed, 'partition.method'))}; Dirichlet α: "
                      f"{_join(_values(dirichlet, 'partition.alpha'))}"),
        ("Clients K", _join(_values(fed, "partition.num_clients"))
         + f" (fraction per round: {_join(_values(fed, 'federation.fraction'))})"),
        ("Rounds", _join(_values(fed, "federation.rounds"))
         + f" (local epochs: {_join(_values(fed, 'train.local_epochs'))})"),
        ("Centralized epochs", _join(_values(cen, "centralized.epochs"))),
        ("Seeds", _join(sorted({r.seed for r in runs}, key=str))),
        ("Group rule", _join(sorted({str(r.summary.get("group_rule", "?")) for r in runs}))),
        ("Hardware", "; ".join(hardware)),
        ("Wall clock", f"{seconds / 60:.1f} min of training and evaluation over all runs"),
    ]
    return "| Setting | Value |\n|---|---|\n" + "\n".join(f"| {k} | {v} |" for k, v in items)


def _slug(text: str) -> str:
    import re

    return re.sub(r"[^A-Za-z0-9._]+", "-", text).strip("-")


def _data_title(row: Row) -> str:
    beta = row.column("beta")
    return f"{row.column('data')}" + ("" if beta == "–" else f", β={beta}")


def write_report(runs: list[Run], out: str | Path, errors: list[str] | None = None,
                 command: str | None = None) -> Path:
    """Write summary.csv, table.md, the figures (PNG + PDF) and report.md into ``out``; return report.md."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for stem in FIGURES:  # figures of an earlier report in the same folder
        for old in [*out.glob(f"{stem}.*"), *out.glob(f"{stem}-*.*")]:
            if old.suffix in (".png", ".pdf"):
                old.unlink()
    rows = build_rows(runs)
    write_csv(rows, out / "summary.csv")
    table = markdown_table(rows)
    (out / "table.md").write_text(table + "\n")

    by_data: dict[str, list[Row]] = {}
    for r in rows:
        by_data.setdefault(r.data_key, []).append(r)
    multi = len(by_data) > 1
    sections: list[str] = []
    for rs in by_data.values():
        labels = row_labels(rs)
        name = _data_title(rs[0])
        beta = rs[0].column("beta")
        sfx = (f"-{_slug(rs[0].column('data'))}" + ("" if beta == "–" else f"-beta{beta}")) if multi else ""
        head = f"### {name}\n\n" if multi else ""
        part = [head]
        files = fig_accuracy_rounds(rs, labels, out, f"accuracy_rounds{sfx}", f"Test accuracy per round ({name})")
        part.append(_figure(files, "Accuracy per round",
                            "Test accuracy of the global model after each round (mean over seeds; band: min–max "
                            "over seeds). Horizontal lines: final accuracy of the centralized baselines "
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
            p, k = r.column("alpha"), r.column("clients")
            desc = (f"Dirichlet α={p}" if p[0].isdigit() else p) + f", K={k}"
            if desc in seen_parts:
                continue
            seen_parts.append(desc)
            pfiles.append(f"partition{sfx}-{_slug(('alpha' if p[0].isdigit() else '') + p)}-K{k}")
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
                            "strategy estimated (mean over seeds), with its L1 distance to the truth."
                            if files else "None of these runs estimates a global class prior (no "
                                          "`estimated_prior` in summary.json); figure skipped."))
        files = fig_reliability(rs, labels, out, f"reliability{sfx}")
        part.append(_figure(files, "Reliability diagrams",
                            "Accuracy of the test predictions in each of 15 confidence bins (pooled over seeds); "
                            "dashed: perfect calibration; hatched: gap."
                            if files else "No reliability bins in these runs' summary.json."))
        sections.append("\n".join(part))

    lines = ["# fedlt comparison report", ""]
    if command:
        lines += [f"Generated by `{command}`.", ""]
    lines += ["## Settings", "", settings_table(runs, rows), "",
              "## Results", "",
              "Test metrics of the final model on the balanced test set, in %: mean ± sample standard "
              "deviation (n − 1) over seeds (no ± for a single seed). *Seeds*: number of seeds in the row. "
              "*Δ best central*: accuracy minus the best centralized accuracy of the same data setting, in "
              "percentage points. Lower ECE is better. The same numbers as fractions: "
              "[summary.csv](summary.csv).", "", table, ""]
    lines += ["## Figures", "", "Each figure is also saved as PDF (same name).", ""] + sections
    if errors:
        lines += ["## Runs that could not be read", ""] + [f"- {e}" for e in errors] + [""]
    lines += ["## Run directories", ""]
    for r, lab in zip(rows, row_labels(rows)):
        lines.append(f"- {lab}: " + ", ".join(f"`{x.path}`" for x in r.runs)
                     + "".join(f" (left out `{x.path}`: same config and seed as a run above)" for x in r.repeated))
    report = out / "report.md"
    report.write_text("\n".join(lines) + "\n")
    return report


def _figure(files: list[str], heading: str, caption: str) -> str:
    pngs = [f for f in files if f.endswith(".png")]
    body = "".join(f"![{heading}]({f})\n" for f in pngs)
    pdfs = ", ".join(f"[{f}]({f})" for f in files if f.endswith(".pdf"))
    return f"#### {heading}\n\n{body}\n{caption}" + (f" PDF: {pdfs}." if pdfs else "") + "\n"
