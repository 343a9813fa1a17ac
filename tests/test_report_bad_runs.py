"""Run directories of valid JSON but wrong content, and report folders that cannot be written: one line naming
the run (or folder), the other runs still reported, no partial report."""

from __future__ import annotations

import json

import pytest
from test_report import make_run, read_csv

from fedlt import compare
from fedlt.errors import FedLTError
from fedlt.report import check_report_dir, load_runs
from fedlt.rundir import RunDir


def _edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _drop(path, key):
    path.write_text(json.dumps({k: v for k, v in json.loads(path.read_text()).items() if k != key}))


def _replace(path, old, new):
    text = path.read_text()
    assert old in text
    path.write_text(text.replace(old, new))


BINS = ("count", "accuracy", "confidence")
STRICT = ", which is not strict JSON (fedlt writes a non-finite number as null)"
# damage: (how to make it, what the one-line error says after "<run>: ")
DAMAGE = {
    "accuracy-string": (lambda d: _edit_json(d / "summary.json", accuracy="abc"),
                        'summary.json accuracy is not a number ("abc")'),
    "per-class-short": (lambda d: _edit_json(d / "summary.json", per_class=[0.1]),
                        "summary.json per_class has 1 values for 10 classes"),
    "per-class-null": (lambda d: _edit_json(d / "summary.json", per_class=None),
                       "summary.json per_class is not a list (null)"),
    "metrics-scalar": (lambda d: (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text() + "5\n"),
                       "metrics.jsonl line 5 is not a JSON object (5)"),
    "metrics-round": (lambda d: (d / "metrics.jsonl").write_text('{"round": "one", "accuracy": 0.1}\n'),
                      'metrics.jsonl line 1 round is not a number ("one")'),
    # NaN / Infinity (Python's json reads them): the table showed "nan ± nan", "+nan", "inf ± nan"
    "summary-nan": (lambda d: _replace(d / "summary.json", '"accuracy": 0.9', '"accuracy": NaN'),
                    "summary.json holds NaN" + STRICT),
    "summary-inf": (lambda d: _replace(d / "summary.json", '"ece": 0.', '"ece": -Infinity, "x": 0.'),
                    "summary.json holds -Infinity" + STRICT),
    "metrics-nan": (lambda d: _replace(d / "metrics.jsonl", '"ece": 0.1}', '"ece": Infinity}'),
                    "metrics.jsonl line 1 holds Infinity" + STRICT),
    "partition-nan": (lambda d: _replace(d / "partition.json", '"test_class_counts": [', '"test_class_counts": [NaN, '),
                      "partition.json holds NaN" + STRICT),
    "env-list": (lambda d: (d / "env.json").write_text("[1]"), "env.json does not hold a JSON object ([1])"),
    "env-gpu": (lambda d: _edit_json(d / "env.json", gpu=3), "env.json gpu is not a string (3)"),
    "partition-string": (lambda d: _edit_json(d / "partition.json", client_class_counts="x"),
                         'partition.json client_class_counts is not a list of clients ("x")'),
    "partition-row": (lambda d: _edit_json(d / "partition.json", client_class_counts=[[1, 2]]),
                      "partition.json client_class_counts[0] has 2 values for 10 classes"),
    "reliability": (lambda d: _edit_json(d / "summary.json", reliability={"count": [1] * 15, "accuracy": [0.5],
                                                                          "confidence": [0.5] * 15}),
                    "summary.json reliability.accuracy has 1 values for 15 bins"),
    "reliability-bins": (lambda d: _edit_json(d / "summary.json", reliability={k: [1] * 14 for k in BINS}),
                         "summary.json reliability.count has 14 values for 15 bins"),
    # config.yaml edited after the run (whose summary.json records its digest, as fedlt's runs do): the row's
    # keys (here α) were not those the results are of
    "config-changed": (lambda d: (_edit_json(d / "summary.json", config_digest=RunDir(d).config_digest()),
                                  _replace(d / "config.yaml", "alpha: 0.5", "alpha: 0.1")),
                       "config.yaml was changed or damaged after the run finished (its digest is not the one in "
                       "summary.json), so it no longer says which config the results are of; restore it"),
    # right type, wrong value: each crashed the report with a traceback (round, seed) or was reported as if measured
    "round-fraction": (lambda d: (d / "metrics.jsonl").write_text('{"round": 0.5, "accuracy": 0.1}\n'),
                       "metrics.jsonl line 1 round is not a whole number ≥ 0 (0.5)"),
    "round-negative": (lambda d: (d / "metrics.jsonl").write_text('{"round": -1, "accuracy": 0.1}\n'),
                       "metrics.jsonl line 1 round is not a whole number ≥ 0 (-1)"),
    "metrics-accuracy": (lambda d: (d / "metrics.jsonl").write_text('{"round": 1, "accuracy": 40}\n'),
                         "metrics.jsonl line 1 accuracy is not in [0, 1] (40)"),
    "seed-list": (lambda d: _edit_json(d / "summary.json", seed=[1]), "summary.json seed is not a number ([1])"),
    "seed-fraction": (lambda d: _edit_json(d / "summary.json", seed=1.5),
                      "summary.json seed is not a whole number ≥ 0 (1.5)"),
    # (a summary.json without a seed: the seed is config.yaml's, read as written where it is not a valid config)
    "config-seed-list": (lambda d: (_drop(d / "summary.json", "seed"),
                                    _replace(d / "config.yaml", "seed: 2", "seed: [1]")),
                         "config.yaml seed is not a number ([1])"),
    "method-list": (lambda d: _edit_json(d / "summary.json", method=["x"]),
                    'summary.json method is not a string (["x"])'),
    "method-number": (lambda d: _edit_json(d / "summary.json", method=5), "summary.json method is not a string (5)"),
    "group-rule-list": (lambda d: _edit_json(d / "summary.json", group_rule=["x"]),
                        'summary.json group_rule is not a string (["x"])'),
    "counts-negative": (lambda d: _edit_json(d / "summary.json", train_class_counts=[-50] * 10),
                        "summary.json train_class_counts[0] is not a whole number ≥ 0 (-50)"),
    "counts-fraction": (lambda d: _edit_json(d / "summary.json", train_class_counts=[2.5] * 10),
                        "summary.json train_class_counts[0] is not a whole number ≥ 0 (2.5)"),
    "counts-zero": (lambda d: _edit_json(d / "summary.json", train_class_counts=[0] * 10),
                    "summary.json train_class_counts holds no training image ([0, 0, 0, 0, 0, 0, 0, 0, 0, 0])"),
    "accuracy-above-one": (lambda d: _edit_json(d / "summary.json", accuracy=90.0),
                           "summary.json accuracy is not in [0, 1] (90.0)"),
    "few-negative": (lambda d: _edit_json(d / "summary.json", few=-0.1), "summary.json few is not in [0, 1] (-0.1)"),
    "per-class-above-one": (lambda d: _edit_json(d / "summary.json", per_class=[0.5] * 9 + [2]),
                            "summary.json per_class[9] is not in [0, 1] (2)"),
    "wall-clock-negative": (lambda d: _edit_json(d / "summary.json", wall_clock_seconds=-3),
                            "summary.json wall_clock_seconds is negative (-3)"),
    "client-counts-negative": (lambda d: _edit_json(d / "partition.json", client_class_counts=[[-1] * 10]),
                               "partition.json client_class_counts[0][0] is not a whole number ≥ 0 (-1)"),
    "test-counts-short": (lambda d: _edit_json(d / "partition.json", test_class_counts=[100] * 9),
                          "partition.json test_class_counts has 9 values for 10 classes"),
    "env-torch": (lambda d: _edit_json(d / "env.json", torch=[1]), "env.json torch is not a string ([1])"),
    # (these drew an empty accuracy curve, or one with a step twice, as if measured)
    "metrics-no-accuracy": (lambda d: (d / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "loss": 1}\n'),
                            "metrics.jsonl holds no accuracy (no evaluated step)"),
    "metrics-step-twice": (lambda d: (d / "metrics.jsonl").write_text((d / "metrics.jsonl").read_text() * 2),
                           "metrics.jsonl has round 0 twice (rows 1 and 5)"),
    "metrics-no-step": (lambda d: (d / "metrics.jsonl").write_text('{"accuracy": 0.5}\n'),
                        "metrics.jsonl row 1 has no round"),
    "metrics-cut-short": (lambda d: (_edit_json(d / "summary.json", rounds=3), (d / "metrics.jsonl").write_text(
                              "".join((d / "metrics.jsonl").read_text().splitlines(True)[:2]))),
                          "metrics.jsonl ends at round 1 of the run's 3 (cut short after the run): restore it"),
    "failures-negative": (lambda d: _edit_json(d / "summary.json", failures={"total": -1, "per_round": [0]}),
                          "summary.json failures.total is not a whole number ≥ 0 (-1)"),
    "failures-rounds": (lambda d: _edit_json(d / "summary.json", failures={"total": 1, "per_round": "1"}),
                        'summary.json failures.per_round is not a list ("1")'),
    "fingerprint-list": (lambda d: _edit_json(d / "summary.json", data_fingerprint=[1]),
                         "summary.json data_fingerprint is not a mapping ([1])"),
    "fingerprint-no-test": (lambda d: _edit_json(d / "summary.json", data_fingerprint={
                                "train": {"images": 3, "digest": "0" * 16}}),
                            "summary.json data_fingerprint.test is not a mapping (null)"),
    "fingerprint-digest": (lambda d: _edit_json(d / "summary.json", data_fingerprint={
                               "train": {"images": 3, "digest": "0" * 16}, "test": {"images": 3, "digest": 7}}),
                           "summary.json data_fingerprint.test.digest is not 16 hex digits (7)"),
}
# the cases of the audit (each crashed the report with a traceback and left a partial one)
AUDIT = ("accuracy-string", "per-class-short", "metrics-scalar", "env-list", "partition-string", "round-fraction",
         "seed-list")
# (these reported the run with a value no run can have: "train images=-500", a list as the method's name)
WRONG_VALUES = ("counts-negative", "method-list", "method-number", "accuracy-above-one")
NOT_STRICT = ("summary-nan", "summary-inf", "metrics-nan")  # (these reported the run with NaN in the table)


def bad_run(root, damage):
    d = make_run(root, "bad", "federated", "fedavg", 2, 0.9)
    DAMAGE[damage][0](d)
    return d


@pytest.mark.parametrize("damage", sorted(DAMAGE))
def test_wrong_content_is_one_line_naming_run_file_and_fault(tmp_path, damage):
    good = make_run(tmp_path, "good", "federated", "fedavg", 0, 0.4)
    bad = bad_run(tmp_path, damage)
    runs, errors = load_runs([tmp_path])
    assert [r.path for r in runs] == [good]
    assert errors == [f"{bad}: {DAMAGE[damage][1]}"]


@pytest.mark.parametrize("damage", AUDIT + NOT_STRICT + WRONG_VALUES)
def test_bad_run_left_out_and_others_reported(tmp_path, capsys, damage):
    good = make_run(tmp_path / "runs", "good", "centralized", "ce", 0, 0.6)
    bad = bad_run(tmp_path / "runs", damage)
    out = tmp_path / "rep"
    assert compare.main([str(tmp_path / "runs"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {bad}: {DAMAGE[damage][1]}"]
    assert "report of 1 runs" in captured.out
    report = (out / "report.md").read_text()
    assert f"`{good}`" in report and DAMAGE[damage][1] in report
    assert list(read_csv(out / "summary.csv")) == [("centralized", "ce")]


def test_every_run_bad_exits_nonzero_without_report(tmp_path, capsys):
    bad = bad_run(tmp_path / "runs", "accuracy-string")
    out = tmp_path / "rep"
    assert compare.main([str(bad), "--out", str(out)]) == 1
    assert capsys.readouterr().err.splitlines() == [f"error: {bad}: {DAMAGE['accuracy-string'][1]}",
                                                     "error: no run could be read; no report written"]
    assert not out.exists()


def test_out_naming_a_file_is_one_line(tmp_path, capsys):
    make_run(tmp_path / "runs", "good", "centralized", "ce", 0, 0.6)
    out = tmp_path / "afile"
    out.write_text("keep")
    assert compare.main([str(tmp_path / "runs"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.splitlines() == [f"error: report folder {out} is an existing file, not a folder"]
    assert out.read_text() == "keep"


def test_check_report_dir(tmp_path):
    (tmp_path / "afile").write_text("")
    with pytest.raises(FedLTError, match=r"report folder .*afile is an existing file, not a folder$"):
        check_report_dir(tmp_path / "afile")
    with pytest.raises(FedLTError, match=r"report folder .*afile/rep cannot be created: .*afile is not a folder$"):
        check_report_dir(tmp_path / "afile" / "rep")
    assert check_report_dir(tmp_path / "new" / "rep") == tmp_path / "new" / "rep"
    assert check_report_dir(str(tmp_path)) == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]  # creates nothing


def test_failure_while_writing_leaves_no_partial_report(tmp_path, monkeypatch):
    from fedlt.report import document

    make_run(tmp_path / "runs", "good", "federated", "fedavg", 0, 0.4)
    runs, _ = load_runs([tmp_path / "runs"])

    def broken(*args, **kwargs):
        raise RuntimeError("figure failed")

    monkeypatch.setattr(document, "fig_per_class", broken)
    with pytest.raises(RuntimeError, match="figure failed"):
        document.write_report(runs, tmp_path / "rep")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]  # no report folder, no staging folder


def test_a_report_folder_where_nothing_can_be_written_is_one_line(tmp_path, capsys):
    """/proc passes os.access for root: the report used to fail after the runs were read, with a traceback."""
    make_run(tmp_path / "runs", "good", "centralized", "ce", 0, 0.6)
    assert compare.main([str(tmp_path / "runs"), "--out", "/proc/fedlt-report"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith(
        "error: report folder /proc/fedlt-report cannot be written: /proc is not writable ("), err


def test_a_seed_with_other_reliability_bins_is_left_out(tmp_path, capsys):
    """Two seeds of one row, one with 14 bins (each file consistent in itself): pooling their bins crashed the
    report with a numpy traceback ("inhomogeneous shape") and no report."""
    make_run(tmp_path / "runs", "s0", "federated", "fedavg", 0, 0.4)
    bad = make_run(tmp_path / "runs", "s1", "federated", "fedavg", 1, 0.5)
    DAMAGE["reliability-bins"][0](bad)
    assert compare.main([str(tmp_path / "runs"), "--out", str(tmp_path / "rep")]) == 0
    assert capsys.readouterr().err.splitlines() == [f"error: {bad}: {DAMAGE['reliability-bins'][1]}"]
    assert (tmp_path / "rep" / "report.md").is_file()


def test_values_fedlt_writes_as_null_or_leaves_out_are_read(tmp_path):
    """The checks refuse what no fedlt run holds, not what one may: an env.json value not recorded (null), a metric
    not measured (null), no prior estimate, a metrics row without accuracy, a class without training images."""
    d = make_run(tmp_path, "run", "federated", "fedavg", 0, 0.5)
    _edit_json(d / "env.json", gpu=None, platform=None)
    _edit_json(d / "summary.json", few=None, pi_hat=None, local_accuracy=None,
               train_class_counts=[0] + json.loads((d / "summary.json").read_text())["train_class_counts"][1:])
    _drop(d / "summary.json", "group_rule")
    (d / "metrics.jsonl").write_text('{"round": 0}\n{"round": 1, "accuracy": 0.0}\n{"round": 2, "accuracy": 1}\n')
    runs, errors = load_runs([d])
    assert errors == [] and [r.path for r in runs] == [d]
