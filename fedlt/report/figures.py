"""The report's figures (matplotlib, PNG and PDF, one column of a two-column paper wide).

Each ``fig_*`` function draws the rows of one data setting into ``out/<stem>.png`` and ``.pdf`` and returns
the file names written (none where the rows have nothing to draw). Colours are the Okabe–Ito palette;
each row also differs in marker, line style or hatch, so the figures read in black and white.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path

import numpy as np

from fedlt.report.runs import Run
from fedlt.report.tables import Row, mean_std, pct

# the stems of the figures (a figure of several data settings or partitions adds a suffix: per_class-cifar10)
FIGURES = ("accuracy_rounds", "group_accuracy", "per_class", "partition", "prior", "reliability")
WIDTH = 3.5  # inches: one column of a two-column paper
COLORS = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")  # Okabe–Ito
MARKER_SHAPES = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", "-.", ":")
HATCHES = ("", "///", "\\\\\\", "xxx", "...", "ooo", "---", "+++")


def _style(i: int) -> dict:
    return {"color": COLORS[i % len(COLORS)], "marker": MARKER_SHAPES[i % len(MARKER_SHAPES)],
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
    """Test accuracy per round of each federated row (mean over seeds, band: min–max), from round 0 (the
    initial model) where the runs recorded it, with each centralized row's final accuracy as a horizontal
    line."""
    fed = [(r, lab) for r, lab in zip(rows, labels) if r.mode == "federated"]
    cen = [(r, lab) for r, lab in zip(rows, labels) if r.mode == "centralized"]
    if not fed:
        return []
    plt = _plt()
    legend = [lab for _, lab in fed] + [f"{lab} (final)" for _, lab in cen]
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.3, legend)))
    max_round, min_round = 1, 1
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
        max_round, min_round = max(max_round, rounds[-1]), min(min_round, rounds[0])
    for j, (r, lab) in enumerate(cen):
        mean = r.stats["accuracy"][0]
        if mean is not None:
            ax.axhline(100 * mean, color=("0.15", "0.45", "0.6")[j % 3], linewidth=1.1,
                       linestyle=(":", "--", "-.")[j % 3], label=f"{lab} (final)")
    ax.set_xlim(min_round - 0.5, max_round + 0.5)
    if max_round <= 12:
        ax.set_xticks(range(min_round, max_round + 1))
    ax.set_xlabel("Communication round (0: initial model)" if min_round == 0 else "Communication round")
    ax.set_ylabel("Test accuracy (%)")
    ax.set_title(title)
    ax.grid(True, alpha=0.3, linewidth=0.5)
    _legend_below(ax, legend)
    return _save(fig, out, stem)


def fig_group_accuracy(rows: list[Row], labels: list[str], out: Path, stem: str, title: str) -> list[str]:
    """Many / medium / few-shot accuracy per row as grouped bars (error bars: std over seeds). A bar of 0 %
    would be invisible: it is drawn as a thick line on the axis in the row's colour and labelled ``0``."""
    groups = ("many", "medium", "few")
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.2, labels)))
    n = len(rows)
    width = 0.8 / max(n, 1)
    x = np.arange(len(groups))
    for i, (r, lab) in enumerate(zip(rows, labels)):
        means = [np.nan if r.stats[g][0] is None else 100 * r.stats[g][0] for g in groups]
        errs = [0 if r.stats[g][1] is None else 100 * r.stats[g][1] for g in groups]
        centers = x - 0.4 + width * (i + 0.5)
        ax.bar(centers, means, width, yerr=errs if any(errs) else None, label=lab,
               color=COLORS[i % len(COLORS)], hatch=HATCHES[i % len(HATCHES)], edgecolor="black", linewidth=0.5,
               error_kw={"elinewidth": 0.7, "capsize": 1.5})
        for c, m in zip(centers, means):
            if m == 0:  # (a missing group is NaN: no bar, no label)
                ax.plot([c - width / 2, c + width / 2], [0, 0], color=COLORS[i % len(COLORS)], linewidth=3,
                        solid_capstyle="butt", clip_on=False, zorder=3)
                ax.annotate("0", (c, 0), xytext=(0, 2.5), textcoords="offset points", ha="center", va="bottom",
                            fontsize=6)
    ax.set_xticks(x, ["Many-shot", "Medium-shot", "Few-shot"])
    ax.set_ylabel("Test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(title)
    ax.grid(True, axis="y", alpha=0.3, linewidth=0.5)
    _legend_below(ax, labels)
    return _save(fig, out, stem)


def fig_per_class(rows: list[Row], labels: list[str], out: Path, stem: str, title: str) -> list[str]:
    """Per-class test accuracy against the class's training-set size (log axis), one point per class: a
    scatter, since classes are not a sequence (two classes of one size are two points, not a segment)."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(WIDTH, _height(2.3, labels)))
    for i, (r, lab) in enumerate(zip(rows, labels)):
        counts = np.asarray(r.runs[0].summary["train_class_counts"], float)
        acc = 100 * r.per_class()
        order = np.argsort(counts)
        ok = order[(counts[order] > 0) & ~np.isnan(acc[order])]
        st = _style(i)
        ax.scatter(counts[ok], acc[ok], label=lab, s=11, marker=st["marker"], color=st["color"], alpha=0.85,
                   linewidths=0)
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
            if all(run.summary.get("pi_hat") is not None for run in r.runs)]
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
        est = np.mean([np.asarray(run.summary["pi_hat"], float) for run in r.runs], axis=0)
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
        ax.set_title(textwrap.fill(lab, 26 if ncol == 2 else 40) + f"\nECE {pct(ece)}%", fontsize=8)
        if i % ncol == 0:
            ax.set_ylabel("Accuracy")
        if i // ncol == nrow - 1 or i + ncol >= len(have):
            ax.set_xlabel("Confidence")
            ax.tick_params(labelbottom=True)
    return _save(fig, out, stem)
