"""The comparison report, built from small synthetic run directories (no training)."""

from __future__ import annotations

import csv
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import yaml

from fedlt import compare
from fedlt.config import Config
from fedlt.report import FIGURES, RunError, find_run_dirs, load_runs, read_run, write_report
from strategies.gbme.prior import prior_report

C, K = 10, 4
TRAIN = [int(500 * 0.6 ** c) + 5 for c in range(C)]


def make_run(root, name, mode, method, seed, acc, *, alpha=0.5, prior=False, rounds=3):
    """A finished run directory whose numbers derive from ``acc``."""
    d = root / name
    d.mkdir(parents=True)
    cfg = Config().model_dump(mode="json", exclude={"sweep"})  # the fixed sections' defaults
    cfg.update(name="t", seed=seed, mode=mode, model={"name": "small_cnn", "classifier": "linear", "scale": 1.0})
    cfg["partition"].update(alpha=alpha, num_clients=K)
    cfg["federation"]["rounds"] = rounds
    cfg["strategy"] = {"name": method if mode == "federated" else "fedavg"}
    cfg["client"] = {"name": "fedavg"}
    cfg["centralized"].update(method=method if mode == "centralized" else "ce", epochs=2.0)
    (d / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
    (d / "env.json").write_text(json.dumps({"device": "cpu", "cpu_threads": 2, "torch": "2.x", "flwr": "1.42.0",
                                            "peak_memory_mib": 500.0 + seed, "peak_memory_of": "process peak RSS"}))
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(1, [1 / K] * K, size=sum(TRAIN)).T @ np.repeat(np.eye(C), TRAIN, axis=0)
    (d / "partition.json").write_text(json.dumps({
        "method": "dirichlet" if mode == "federated" else "pooled", "num_clients": K,
        "train_class_counts": TRAIN, "test_class_counts": [100] * C, "client_sizes": counts.sum(1).tolist(),
        "client_class_counts": counts.astype(int).tolist()}))
    step = "round" if mode == "federated" else "epoch"
    with open(d / "metrics.jsonl", "w") as f:
        for t in range(0, rounds + 1):  # 0: the initial model
            f.write(json.dumps({step: t, "accuracy": acc * t / rounds, "balanced_accuracy": acc * t / rounds,
                                "loss": 1.0, "many": acc, "medium": acc, "few": acc, "ece": 0.1}) + "\n")
    per_class = list(np.clip(np.linspace(acc + 0.3, acc - 0.3, C), 0, 1))
    bins = {"count": [0] * 5 + [10] * 10, "accuracy": [0.0] * 5 + list(np.linspace(0.3, 0.9, 10)),
            "confidence": [0.0] * 5 + list(np.linspace(0.37, 0.97, 10))}
    summary = {"mode": mode, "method": method, "seed": seed, "accuracy": acc, "balanced_accuracy": acc - 0.01,
               "many": min(1.0, acc + 0.2), "medium": acc, "few": None if acc < 0.2 else acc - 0.2,
               "ece": 0.05 + acc / 10, "group_rule": "class-index thirds", "per_class": per_class,
               "reliability": bins, "train_class_counts": TRAIN, "wall_clock_seconds": 12.0, "loss": 1.0,
               f"seconds_per_{step}": 4.0 + seed, "images_per_second": 100.0 * (1 + seed)}
    if prior:
        true = (np.array(TRAIN) / sum(TRAIN)).tolist()
        # what the strategies that estimate a prior write (gbme, fedgrab, posthoc_calibration): prior_report's keys
        estimate = SimpleNamespace(pi_hat=np.array(true) * (1 + 0.1 * rng.standard_normal(C)),
                                   counts=np.array(TRAIN, float))
        summary.update(prior_report(estimate, np.array(TRAIN)))
    (d / "summary.json").write_text(json.dumps(summary))
    (d / "done").write_text("")
    return d


def make_runs(root):
    acc = {("fedavg", 0): 0.40, ("fedavg", 1): 0.46, ("ce", 0): 0.60, ("ce", 1): 0.64, ("fedprior", 0): 0.50}
    make_run(root, "fa0", "federated", "fedavg", 0, acc["fedavg", 0])
    make_run(root, "fa1", "federated", "fedavg", 1, acc["fedavg", 1])
    make_run(root, "ce0", "centralized", "ce", 0, acc["ce", 0])
    make_run(root, "ce1", "centralized", "ce", 1, acc["ce", 1])
    make_run(root, "nested/fp0", "federated", "fedprior", 0, acc["fedprior", 0], prior=True, alpha=0.1)
    return root, acc


@pytest.fixture
def runs(tmp_path):
    return make_runs(tmp_path / "runs")


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    """The report of five runs (two seeds of FedAvg and centralized CE, one seed of a prior-estimating
    strategy), written once by the command line."""
    tmp = tmp_path_factory.mktemp("report")
    root, acc = make_runs(tmp / "runs")
    assert compare.main([str(root), "--out", str(tmp / "rep")]) == 0
    return tmp / "rep", acc


def read_csv(path):
    with open(path) as f:
        return {(r["mode"], r["method"]): r for r in csv.DictReader(f)}


def test_table_matches_summaries(report):
    out, acc = report
    rows = read_csv(out / "summary.csv")
    assert set(rows) == {("federated", "fedavg"), ("centralized", "ce"), ("federated", "fedprior")}
    for method, mode in (("fedavg", "federated"), ("ce", "centralized")):
        a, b = acc[method, 0], acc[method, 1]
        mean, std = (a + b) / 2, math.sqrt(((a - (a + b) / 2) ** 2 + (b - (a + b) / 2) ** 2) / (2 - 1))
        r = rows[mode, method]
        assert float(r["accuracy_mean"]) == pytest.approx(mean)
        assert float(r["accuracy_std"]) == pytest.approx(std)
        assert float(r["balanced_accuracy_mean"]) == pytest.approx(mean - 0.01)
        assert float(r["many_mean"]) == pytest.approx((min(1, a + 0.2) + min(1, b + 0.2)) / 2)
        assert float(r["few_mean"]) == pytest.approx(mean - 0.2)
        assert float(r["ece_mean"]) == pytest.approx(0.05 + mean / 10)
        assert float(r["ece_std"]) == pytest.approx(std / 10)
        assert r["n_seeds"] == "2" and r["seeds"] == "0 1"
        md = (out / "table.md").read_text()
        assert f"{100 * mean:.1f} ± {100 * std:.1f}" in md
    best_cen = (acc["ce", 0] + acc["ce", 1]) / 2
    fedavg_mean = (acc["fedavg", 0] + acc["fedavg", 1]) / 2
    assert float(rows["federated", "fedavg"]["gap_to_best_centralized"]) == pytest.approx(fedavg_mean - best_cen)
    assert float(rows["centralized", "ce"]["gap_to_best_centralized"]) == pytest.approx(0.0)
    one = rows["federated", "fedprior"]  # one seed: no std, α shown
    assert one["accuracy_std"] == "" and one["alpha"] == "0.1" and one["clients"] == str(K)
    assert rows["centralized", "ce"]["alpha"] == ""
    text = (out / "report.md").read_text()
    assert "| Seeds | 0, 1 |" in text and "class-index thirds" in text and "cpu" in text
    assert "test set balanced)" in text and "on the balanced test set" in text
    assert md.strip() in text


def test_every_figure_written_and_embedded(report):
    out, _ = report
    text = (out / "report.md").read_text()
    for stem in FIGURES:
        if stem == "partition":  # one file per partition setting: α=0.5 and α=0.1
            stems = ["partition-alpha0.1-K4", "partition-alpha0.5-K4"]
        else:
            stems = [stem]
        for s in stems:
            for ext in ("png", "pdf"):
                f = out / f"{s}.{ext}"
                assert f.is_file() and f.stat().st_size > 1000, f
            assert f"]({s}.png)" in text


def test_prior_figure_skipped_with_note(tmp_path):
    root = tmp_path / "runs"
    make_run(root, "a", "federated", "fedavg", 0, 0.3)
    make_run(root, "b", "centralized", "ce", 0, 0.5)
    out = tmp_path / "rep"
    write_report(load_runs([root])[0], out)
    assert not (out / "prior.png").exists()
    assert "estimates a global class prior" in (out / "report.md").read_text()
    assert (out / "partition.png").is_file() and (out / "partition.pdf").is_file()


DAMAGE = {"corrupt": "summary.json is not valid JSON", "missing": "missing summary.json",
          "unfinished": "unfinished run", "bad-metrics": "metrics.jsonl line 2 is not valid JSON",
          "no-config": "missing config.yaml"}


def damaged_run(root, damage):
    bad = make_run(root, "bad", "federated", "fedavg", 2, 0.9)
    if damage == "corrupt":
        (bad / "summary.json").write_text('{"mode": "federated", "accuracy": ')
    elif damage == "missing":
        (bad / "summary.json").unlink()
    elif damage == "unfinished":
        (bad / "done").unlink()
    elif damage == "bad-metrics":
        lines = (bad / "metrics.jsonl").read_text().splitlines()
        (bad / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][:20] + "\n")
    else:
        (bad / "config.yaml").unlink()
    return bad


def test_bad_run_dir_named_and_others_reported(runs, tmp_path, capsys):
    root, _ = runs
    bad = damaged_run(root, "corrupt")
    out = tmp_path / "rep"
    assert compare.main([str(root), "--out", str(out)]) == 0
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {bad}: summary.json is not valid JSON (Expecting value at line 1)"]
    rows = read_csv(out / "summary.csv")
    assert rows["federated", "fedavg"]["n_seeds"] == "2"  # the bad seed-2 run is left out
    assert len(rows) == 3
    assert str(bad) in (out / "report.md").read_text()


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_each_damage_one_line_naming_the_run(runs, damage):
    root, _ = runs
    bad = damaged_run(root, damage)
    good, errors = load_runs([root])
    assert len(good) == 5 and len(errors) == 1
    assert errors[0].startswith(f"{bad}: ") and DAMAGE[damage] in errors[0] and "\n" not in errors[0]


def test_no_readable_run_exits_nonzero(tmp_path, capsys):
    bad = make_run(tmp_path, "only", "centralized", "ce", 0, 0.5)
    (bad / "config.yaml").write_text("a: [unclosed")
    assert compare.main([str(bad), str(tmp_path / "nowhere"), "--out", str(tmp_path / "rep")]) == 1
    err = capsys.readouterr().err
    assert "config.yaml is not valid YAML" in err and "nowhere" in err
    assert not (tmp_path / "rep" / "report.md").exists()


def test_a_run_of_an_earlier_fedlt_joins_its_row(tmp_path):
    """A run whose config.yaml predates a key (``centralized.warmup_factor``, at its default) is read through
    today's schema: it is a seed of the same row, not a row of its own told apart by that key."""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    for seed in (0, 1):
        make_run(root, f"ce{seed}", "centralized", "ce", seed, 0.6)
    written = yaml.safe_load((root / "ce1" / "config.yaml").read_text())
    del written["centralized"]["warmup_factor"]
    (root / "ce1" / "config.yaml").write_text(yaml.safe_dump(written, sort_keys=False))
    rows = build_rows(load_runs([root])[0])
    assert len(rows) == 1 and len(rows[0].runs) == 2 and not rows[0].other


def test_same_run_twice_counted_once(runs, tmp_path):
    root, acc = runs
    make_run(root, "zz/fa0", "federated", "fedavg", 0, 0.99)  # seed 0 again, later in path order
    out = tmp_path / "rep"
    write_report(load_runs([root])[0], out)
    row = read_csv(out / "summary.csv")["federated", "fedavg"]
    assert row["n_seeds"] == "2" and float(row["accuracy_mean"]) == pytest.approx((acc["fedavg", 0] + 0.46) / 2)
    report = (out / "report.md").read_text()
    assert "left out `" in report
    # the Settings table counts the runs of the table (it counted the repeat too, and summed its wall clock)
    assert "| Runs | 5 (3 federated, 2 centralized) in 3 table rows; 1 more left out (the same config and seed" in report
    assert "| Wall clock | 1.0 min of training" in report  # 5 runs × 12 s


def test_find_run_dirs(runs, tmp_path):
    root, _ = runs
    found = find_run_dirs(root)
    assert [p.name for p in found] == ["ce0", "ce1", "fa0", "fa1", "fp0"]
    assert find_run_dirs(root / "fa0") == [root / "fa0"]
    assert read_run(root / "fa0").seed == 0
    (tmp_path / "empty").mkdir()
    with pytest.raises(RunError, match="holds no run directories"):
        find_run_dirs(tmp_path / "empty")
    with pytest.raises(RunError, match="no such run directory or folder"):
        find_run_dirs(tmp_path / "missing")
    with pytest.raises(RunError, match="summary.json: a file; give the run directory that holds it"):
        find_run_dirs(root / "fa0" / "summary.json")
    # the config the runs ran, beside them (--config exp/config.yaml --out exp): a folder of runs, not a broken run
    (root / "config.yaml").write_text((root / "fa0" / "config.yaml").read_text())
    assert find_run_dirs(root) == found


def test_speed_columns_and_peak_memory(report):
    out, _ = report
    rows = read_csv(out / "summary.csv")
    fedavg, ce = rows["federated", "fedavg"], rows["centralized", "ce"]  # seeds 0 and 1
    assert float(fedavg["seconds_per_round_or_epoch_mean"]) == pytest.approx(4.5)  # seconds_per_round 4, 5
    assert float(ce["seconds_per_round_or_epoch_mean"]) == pytest.approx(4.5)  # seconds_per_epoch 4, 5
    assert float(fedavg["images_per_second_mean"]) == pytest.approx(150.0)
    md = (out / "table.md").read_text()
    assert md.splitlines()[0].rstrip(" |").endswith("s / round or epoch | img/s")
    assert all(line.rstrip(" |").endswith(("| 4.5 | 150", "| 4.0 | 100")) for line in md.splitlines()[2:])
    assert "| Peak memory | 501 MiB (process peak RSS" in (out / "report.md").read_text()


def drawn(monkeypatch, draw):
    """The matplotlib figure that ``draw()`` builds (instead of saving it)."""
    from fedlt.report import figures

    figs = []
    monkeypatch.setattr(figures, "_save", lambda fig, out, stem: figs.append(fig) or [stem])
    draw()
    return figs[0]


def test_per_class_figure_is_a_scatter(runs, tmp_path, monkeypatch):
    from fedlt.report import figures
    from fedlt.report.tables import build_rows, row_labels

    rows = build_rows(load_runs([runs[0]])[0])
    fig = drawn(monkeypatch, lambda: figures.fig_per_class(rows, row_labels(rows), tmp_path, "pc", "t"))
    ax = fig.axes[0]
    assert not [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 1]  # no line joins classes
    points = [c.get_offsets() for c in ax.collections]
    assert len(points) == len(rows) and all(len(p) == C for p in points)


def test_zero_bar_is_visible_and_labelled(runs, tmp_path, monkeypatch):
    from fedlt.report import figures
    from fedlt.report.tables import build_rows, row_labels

    rows = build_rows(load_runs([runs[0]])[0])
    rows[0].stats["few"] = (0.0, None)
    fig = drawn(monkeypatch, lambda: figures.fig_group_accuracy(rows, row_labels(rows), tmp_path, "g", "t"))
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["0"]
    stubs = [ln for ln in ax.get_lines() if list(ln.get_ydata()) == [0, 0]]
    assert len(stubs) == 1 and stubs[0].get_linewidth() >= 2 and stubs[0].get_color() == figures.COLORS[0]
    x = ax.texts[0].xy[0]
    assert stubs[0].get_xdata()[0] < x < stubs[0].get_xdata()[1] and 1.6 < x < 2.4  # the few-shot group


def test_accuracy_curve_starts_at_round_zero(runs, tmp_path, monkeypatch):
    from fedlt.report import figures
    from fedlt.report.tables import build_rows, row_labels

    rows = build_rows(load_runs([runs[0]])[0])
    fig = drawn(monkeypatch, lambda: figures.fig_accuracy_rounds(rows, row_labels(rows), tmp_path, "a", "t"))
    ax = fig.axes[0]
    curves = [ln for ln in ax.get_lines() if len(ln.get_xdata()) > 2]
    assert curves and all(list(ln.get_xdata()) == [0, 1, 2, 3] for ln in curves)
    assert ax.get_xlim()[0] < 0 and "initial model" in ax.get_xlabel()


def test_local_accuracy_column_beside_global_accuracy(tmp_path):
    from fedlt.report.runs import load_runs
    from fedlt.report.tables import build_rows, markdown_table

    root = tmp_path / "runs"
    for seed, local in ((0, 0.8), (1, 0.9)):
        d = make_run(root, f"fa{seed}", "federated", "fedavg", seed, 0.4)
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "local_accuracy": local}))
    make_run(root, "ce0", "centralized", "ce", 0, 0.6)
    runs, _ = load_runs([root])
    lines = markdown_table(build_rows(runs)).splitlines()
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    col = head.index("Local acc")
    cells = {line.split("|")[2].strip(): line.strip("|").split("|")[col].strip() for line in lines[2:]}
    assert cells["fedavg"] == "85.0 ± 7.1" and cells["ce"] == "n/a"
    without = markdown_table(build_rows(load_runs([root / "ce0"])[0]))
    assert "Local acc" not in without


def test_metric_missing_in_some_seeds_says_how_many(tmp_path):
    """A metric null in one seed's summary (not measured, or NaN written as null) is averaged over the other
    seeds, and the cell and summary.csv say over how many; the run with non-finite values is named."""
    from fedlt.report.tables import build_rows, markdown_table, write_csv

    root = tmp_path / "runs"
    for seed, acc in ((0, 0.15), (1, 0.45), (2, 0.47)):  # seed 0: acc < 0.2, so few is null
        make_run(root, f"fa{seed}", "federated", "fedavg", seed, acc)
    s = json.loads((root / "fa2" / "summary.json").read_text())
    (root / "fa2" / "summary.json").write_text(json.dumps({**s, "ece": None, "non_finite": ["ece"]}))
    rows = build_rows(load_runs([root])[0])
    few = [0.45 - 0.2, 0.47 - 0.2]
    mean, std = float(np.mean(few)), float(np.std(few, ddof=1))
    eces = [0.05 + 0.015, 0.05 + 0.045]
    lines = markdown_table(rows).splitlines()
    head = [h.strip() for h in lines[0].strip("|").split("|")]
    cells = [c.strip() for c in lines[2].strip("|").split("|")]
    assert cells[head.index("Seeds")] == "3"
    assert cells[head.index("Few")] == f"{100 * mean:.1f} ± {100 * std:.1f} (2/3)"
    assert cells[head.index("ECE")] == f"{100 * np.mean(eces):.1f} ± {100 * np.std(eces, ddof=1):.1f} (2/3)"
    assert cells[head.index("Acc")].endswith(f"{100 * np.std([0.15, 0.45, 0.47], ddof=1):.1f}")  # all three
    write_csv(rows, tmp_path / "s.csv")
    row = read_csv(tmp_path / "s.csv")["federated", "fedavg"]
    assert (row["few_n"], row["ece_n"], row["accuracy_n"], row["n_seeds"]) == ("2", "2", "3", "3")
    text = write_report(load_runs([root])[0], tmp_path / "rep").read_text()
    assert f"- `{root / 'fa2'}`: ece" in text.split("## Runs with non-finite values")[1]
    assert "*(k/n)* after a value: only k of the row's n seeds" in text
    (root / "fa0").rename(tmp_path / "fa0")  # seeds 1 and 2, each with every metric: the legend leaves (k/n) out
    (root / "fa2" / "summary.json").write_text(json.dumps(s))
    text = write_report(load_runs([root])[0], tmp_path / "rep2").read_text()
    assert "(k/n)" not in text and "(1/2)" not in text and "(2/2)" not in text


def test_local_evaluation_settings_are_not_merged(tmp_path):
    """eval.finetune_epochs changes the local accuracy (FedAvg+FT): two runs that differ in it are two rows,
    not one run and a left-out repeat; a centralized run ignores the local evaluation's keys."""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    for name, mode, seed, ft, local, acc in (("ft0", "federated", 0, 0.0, "final", 0.6),
                                             ("ft1", "federated", 0, 1.0, "final", 0.7),
                                             ("ce0", "centralized", 0, 0.0, "off", None),
                                             ("ce1", "centralized", 1, 1.0, "final", None)):
        d = make_run(root, name, mode, "fedavg" if mode == "federated" else "ce", seed, 0.5)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["eval"].update(finetune_epochs=ft, local=local)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        s = json.loads((d / "summary.json").read_text())
        (d / "summary.json").write_text(json.dumps({**s, "local_accuracy": acc}))
    rows = build_rows(load_runs([root])[0])
    fed = sorted((r for r in rows if r.mode == "federated"), key=lambda r: r.get("eval.finetune_epochs"))
    assert [r.stats["local_accuracy"][0] for r in fed] == [0.6, 0.7] and not any(r.repeated for r in fed)
    assert [r.other for r in fed] == ["eval.finetune_epochs=0", "eval.finetune_epochs=1"]
    (cen,) = [r for r in rows if r.mode == "centralized"]
    assert cen.seeds == [0, 1]


def test_partition_named_by_its_method(tmp_path):
    """The α column and the legend say which partition a row used: a CReFF partition is not "2 shards", and a
    shard partition has no α."""
    from fedlt.report.tables import build_rows, markdown_table, row_labels

    root = tmp_path / "runs"
    for method in ("dirichlet", "creff_dirichlet", "multinomial_dirichlet", "shards", "iid"):
        d = make_run(root, method, "federated", "fedavg", 0, 0.5)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["partition"].update(method=method, shards_per_client=3)
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    rows = build_rows(load_runs([root])[0])
    by = {r.get("partition.method"): (r.column("alpha"), label) for r, label in zip(rows, row_labels(rows))}
    assert by == {"dirichlet": ("0.5", "FL fedavg (α=0.5)"),
                  "creff_dirichlet": ("CReFF 0.5", "FL fedavg (CReFF α=0.5)"),
                  "multinomial_dirichlet": ("multinomial 0.5", "FL fedavg (multinomial α=0.5)"),
                  "shards": ("3 shards", "FL fedavg (3 shards)"), "iid": ("IID", "FL fedavg (IID)")}
    assert "| CReFF 0.5 |" in markdown_table(rows)


def test_runs_differing_only_in_keys_they_do_not_read_are_one_row(tmp_path):
    """Seeds of an IID partition at two α, of data.profile=none at two β, of a centralized run at two
    train.local_epochs are one row each (they were two rows of the same numbers, told apart by nothing shown, and
    the two β settings' figures overwrote each other); the seeds are listed in numeric order."""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    edits = {"iid": lambda c, i: c["partition"].update(method="iid", alpha=[0.1, 0.5][i]),
             "flat": lambda c, i: c["data"].update(profile="none", imbalance_factor=[10.0, 20.0][i]),
             "cen": lambda c, i: c["train"].update(local_epochs=[1.0, 2.0][i])}
    for name, edit in edits.items():
        for i, seed in enumerate((10, 2)):
            mode = "centralized" if name == "cen" else "federated"
            d = make_run(root, f"{name}{seed}", mode, f"m_{name}", seed, 0.5)
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            edit(cfg, i)
            (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs, errors = load_runs([root])
    assert errors == [] and len(runs) == 6
    rows = build_rows(runs)
    assert sorted((r.method, r.seeds, r.other) for r in rows) == [
        ("m_cen", [2, 10], ""), ("m_flat", [2, 10], ""), ("m_iid", [2, 10], "")]


def test_runs_with_client_failures_are_named(tmp_path):
    """A run whose rounds left out failed clients (within federation.max_failures) is averaged with its row's other
    seeds, and the report says so under the run's path: nothing said it before."""
    root = tmp_path / "runs"
    make_run(root, "ok", "federated", "fedavg", 0, 0.5)
    hurt = make_run(root, "hurt", "federated", "fedavg", 1, 0.4)
    summary = json.loads((hurt / "summary.json").read_text())
    summary["failures"] = {"total": 3, "per_round": [1, 0, 2], "setup": 0}
    (hurt / "summary.json").write_text(json.dumps(summary))
    runs, errors = load_runs([root])
    assert errors == [] and len(runs) == 2
    report = write_report(runs, tmp_path / "rep").read_text()
    assert "## Runs with client failures" in report
    assert f"- `{hurt}`: 3 failed client replies (round 1: 1, round 3: 2)" in report
    assert f"`{root / 'ok'}`:" not in report.split("## Runs with client failures")[1].split("##")[0]


def test_figure_suffixes_are_never_shared():
    from fedlt.report.document import _free_suffix

    used: set[str] = set()
    assert [_free_suffix(s, used) for s in ("-a", "-a", "", "-a", "")] == ["-a", "-a-2", "", "-a-3", "-2"]


def test_data_settings_of_one_data_set_told_apart(tmp_path):
    """Two data settings of the same data set and β (here: two models) get their own figures, headings and Data
    cells; before, the second setting's figures overwrote the first's under the same name."""
    root = tmp_path / "runs"
    for model in ("small_cnn", "resnet8"):
        for mode, method in (("federated", "fedavg"), ("centralized", "ce")):
            d = make_run(root, f"{model}-{method}", mode, method, 0, 0.5)
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            cfg["model"]["name"] = model
            (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    out = tmp_path / "rep"
    text = write_report(load_runs([root])[0], out).read_text()
    for model in ("small_cnn", "resnet8"):
        assert f"### fashion_mnist, β=100, model.name={model}\n" in text
        assert (out / f"accuracy_rounds-fashion_mnist-beta100-model.name-{model}.png").is_file()
        assert f"](accuracy_rounds-fashion_mnist-beta100-model.name-{model}.png)" in text
        assert text.count(f"| fashion_mnist (model.name={model}) |") == 2


def test_runs_of_one_config_on_other_data_are_not_one_row(tmp_path):
    """data.root is bookkeeping (the same data on another machine): runs of one config that trained on other
    class counts (another root, a list file edited between runs) are two rows, told apart in the Data cell, each
    compared with the centralized run of its own data. Before, they were two seeds of one row."""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    other = [c // 2 + 1 for c in TRAIN]
    for seed, counts, acc in ((0, TRAIN, 0.4), (1, other, 0.3)):
        for mode, method in (("federated", "fedavg"), ("centralized", "ce")):
            d = make_run(root, f"{method}{seed}", mode, method, seed, acc + (0.2 if mode == "centralized" else 0))
            summary = json.loads((d / "summary.json").read_text())
            (d / "summary.json").write_text(json.dumps({**summary, "train_class_counts": counts}))
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {**cfg["data"], "root": f"/data{seed}"}}))
    rows = build_rows(load_runs([root])[0])
    assert sorted((r.method, len(r.runs), r.gap) for r in rows) == \
        [("ce", 1, 0.0), ("ce", 1, 0.0), ("fedavg", 1, pytest.approx(-0.2)), ("fedavg", 1, pytest.approx(-0.2))]
    table = (write_report(load_runs([root])[0], tmp_path / "rep").parent / "table.md").read_text()
    for counts in (TRAIN, other):
        assert table.count(f"| fashion_mnist (train images={sum(counts)} ({counts[0]}→{counts[-1]})) |") == 2


def test_runs_of_one_config_on_other_test_sets_are_not_one_row(tmp_path):
    """data.test_list is bookkeeping (the same list on another machine): runs of one config tested on other test
    sets (here: one on 100 held-out images of each class, one on its own training images) are rows of their own,
    told apart in the Data cell, each compared with the centralized run of its own test set, and the report does
    not call their test set balanced. Before, the two centralized runs were one row of two seeds (and the two
    federated runs another), their accuracies averaged."""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    data = {"name": "file_list", "root": "/data", "train_list": "train.txt", "profile": "none"}
    for seed, test, tested_on, acc in ((0, [100] * C, "test.txt", 0.4), (1, TRAIN, "train_copy.txt", 0.8)):
        for mode, method in (("federated", "fedavg"), ("centralized", "ce")):
            d = make_run(root, f"{method}{seed}", mode, method, seed, acc + (0.1 if mode == "centralized" else 0))
            partition = json.loads((d / "partition.json").read_text())
            (d / "partition.json").write_text(json.dumps({**partition, "test_class_counts": test}))
            cfg = yaml.safe_load((d / "config.yaml").read_text())
            (d / "config.yaml").write_text(yaml.safe_dump({**cfg, "data": {**data, "test_list": tested_on}}))
    runs = load_runs([root])[0]
    rows = build_rows(runs)
    assert sorted((r.method, r.seeds, r.stats["accuracy"][0], r.gap) for r in rows) == [
        ("ce", [0], 0.5, 0.0), ("ce", [1], 0.9, 0.0),
        ("fedavg", [0], 0.4, pytest.approx(-0.1)), ("fedavg", [1], 0.8, pytest.approx(-0.1))]
    report = write_report(runs, tmp_path / "rep").read_text()
    table = (tmp_path / "rep" / "table.md").read_text()
    held_out, own = "1000 (100→100)", f"{sum(TRAIN)} ({TRAIN[0]}→{TRAIN[-1]})"
    for test in (held_out, own):
        assert table.count(f"| file_list (test images={test}) |") == 2
    with open(tmp_path / "rep" / "summary.csv") as f:  # the csv tells the rows apart as the table does
        assert sorted(r["data_setting"] for r in csv.DictReader(f)) == [f"test images={t}" for t in
                                                                        (held_out, held_out, own, own)]
    assert f"test set {held_out}, {own} images)" in report and "balanced test set" not in report


def test_runs_on_other_test_sets_of_the_same_class_counts_are_told_apart_by_the_test_digest(tmp_path):
    """Two test lists of the same class counts (another 100 images of each class): the class counts cannot tell
    them apart, the test set's digest in summary.json's data_fingerprint can. Seeds of one test set stay one row
    though their training digests differ (the long-tailed subset is drawn from the seed); a run of an earlier
    fedlt (no fingerprint) is a row of its own, not averaged with either."""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    for name, seed, test_digest, acc in (("a0", 0, "aaaa000011112222", 0.4), ("a1", 1, "aaaa000011112222", 0.5),
                                         ("b0", 0, "bbbb000011112222", 0.8), ("old", 2, None, 0.6)):
        d = make_run(root, name, "federated", "fedavg", seed, acc)
        if test_digest:
            summary = json.loads((d / "summary.json").read_text())
            summary["data_fingerprint"] = {"train": {"images": sum(TRAIN), "digest": f"{seed:016x}"},
                                           "test": {"images": 100 * C, "digest": test_digest}}
            (d / "summary.json").write_text(json.dumps(summary))
    runs, errors = load_runs([root])
    assert errors == []
    rows = build_rows(runs)
    assert sorted((r.seeds, round(r.stats["accuracy"][0], 6)) for r in rows) == [([0], 0.8), ([0, 1], 0.45), ([2], 0.6)]
    table = (write_report(runs, tmp_path / "rep").parent / "table.md").read_text()
    for digest in ("aaaa000011112222", "bbbb000011112222", "?"):
        assert table.count(f"test set digest={digest}") == 1


def test_long_tailed_lists_of_the_same_class_counts_are_told_apart_by_the_train_digest(tmp_path):
    """With data.profile=none the training list is used as it is, the same for every seed: two lists of the same
    class counts (an edited list) are two rows, told apart by the training set's digest; seeds of one list are
    one row. (With a long-tailed cut the digest differs by seed and is left out: the test above.)"""
    from fedlt.report.tables import build_rows

    root = tmp_path / "runs"
    for name, seed, train_digest in (("a0", 0, "aaaa"), ("a1", 1, "aaaa"), ("b0", 0, "bbbb")):
        d = make_run(root, name, "federated", "fedavg", seed, 0.5)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["data"]["profile"] = "none"
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
        summary = json.loads((d / "summary.json").read_text())
        summary["data_fingerprint"] = {"train": {"images": sum(TRAIN), "digest": train_digest * 4},
                                       "test": {"images": 100 * C, "digest": "c" * 16}}
        (d / "summary.json").write_text(json.dumps(summary))
    rows = build_rows(load_runs([root])[0])
    assert sorted(r.seeds for r in rows) == [[0], [0, 1]]
    assert {json.loads(r.data_key)["train set digest"] for r in rows} == {"a" * 16, "b" * 16}


def test_settings_table_gives_alpha_of_every_dirichlet_form_and_no_beta_for_profile_none(tmp_path):
    from fedlt.report.tables import build_rows, settings_table

    root = tmp_path / "runs"
    for name, method, alpha, profile in (("a", "creff_dirichlet", 0.3, "none"), ("b", "shards", 0.9, "none")):
        d = make_run(root, name, "federated", "fedavg", 0, 0.5, alpha=alpha)
        cfg = yaml.safe_load((d / "config.yaml").read_text())
        cfg["partition"]["method"], cfg["data"]["profile"] = method, profile
        (d / "config.yaml").write_text(yaml.safe_dump(cfg))
    runs = load_runs([root])[0]
    table = settings_table(runs, build_rows(runs))
    assert "| Partition | creff_dirichlet, shards; Dirichlet α: 0.3 |" in table  # the shard run's α is unused
    assert "| Imbalance factor β = N_max/N_min | – (data.profile none) |" in table
