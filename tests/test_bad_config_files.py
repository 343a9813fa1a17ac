"""Damaged config files and run folders, and commands that do nothing: a one-line error and exit status 2, naming
the file and the key, never a traceback or a silently dropped value."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_bad_input import refused
from test_sweep import fake_runners

from conftest import ROOT
from fedlt import simulate
from fedlt.errors import FedLTError
from fedlt.sweep import expand


def config_file(tmp_path: Path, text: str | bytes, name: str = "bad.yaml") -> str:
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return str(path)


def refused_file(path: str) -> str:
    """The one-line error of reading the config file ``path`` (and its sweep), as the command line would print
    it. Not through the command line: without the check, the file would start a training run."""
    with pytest.raises(FedLTError) as exc:
        expand(path)
    assert "\n" not in str(exc.value)
    return f"error: {exc.value}"


def test_a_config_file_that_is_not_utf8_is_refused(capsys, tmp_path):
    path = config_file(tmp_path, b"\xff\xfe\x00name: x\n")
    assert refused(capsys, tmp_path, config=path) == (f"error: config file {path} is not UTF-8 text (invalid start "
                                                      f"byte at byte 0); save it as UTF-8")


@pytest.mark.parametrize("text", ["", "\n\n", "# lr: 0.1\n# seed: 3\n"])
def test_an_empty_config_file_is_refused(capsys, tmp_path, text):
    """It ran every default as if the file had asked for them (a truncated or unsaved file)."""
    path = config_file(tmp_path, text)
    assert refused(capsys, tmp_path, config=path) == (f"error: config file {path} is empty (no key, or only "
                                                      f"comments): give its keys, or leave out --config to run the "
                                                      f"defaults")
    assert refused_file(config_file(tmp_path, "base: bad.yaml\nseed: 1\n", "child.yaml")).startswith(
        f"error: config file {path} is empty")


@pytest.mark.parametrize("text,line,key", [("1: 2\n", 1, "1"), ("train:\n  lr: 0.1\n  null: 3\n", 3, "null"),
                                           ("sweep:\n  yes: [1]\n", 2, "yes")])
def test_a_key_that_is_not_a_name_is_refused(capsys, tmp_path, text, line, key):
    path = config_file(tmp_path, text)
    err = refused(capsys, tmp_path, config=path)
    assert err.startswith(f"error: config file {path} line {line}: key {key} is not a name (YAML reads it as ")
    assert f"quote it if you meant one ('{key}': ...)" in err


@pytest.mark.parametrize("text,line,key", [
    ("train:\n  lr: 0.1\ntrain:\n  batch_size: 8\n", 3, "train"),
    ("train:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n", 4, "lr"),
    ("sweep:\n  seed: [0, 1]\n  seed: [2]\n", 3, "seed"),
])
def test_a_key_given_twice_in_one_mapping_is_refused(tmp_path, text, line, key):
    path = config_file(tmp_path, text)
    assert refused_file(path) == f"error: config file {path} line {line}: key {key!r} given twice: give it once"


def test_a_key_given_twice_in_a_base_file_names_that_file(tmp_path):
    base = config_file(tmp_path, "seed: 1\nseed: 2\n", "base.yaml")
    path = config_file(tmp_path, "base: base.yaml\nname: child\n")
    assert refused_file(path) == f"error: config file {base} line 2: key 'seed' given twice: give it once"


@pytest.mark.parametrize("text,key", [
    ("sweep:\n  train: {lr: [0.1, 0.2]}\n  train.lr: [0.3]\n", "sweep.train.lr"),
    ("sweep:\n  partition.alpha: [0.1]\n  partition:\n    alpha: [1.0]\n", "sweep.partition.alpha"),
    ("train: {lr: 0.1}\ntrain.lr: 0.2\n", "train.lr"),
])
def test_a_key_given_nested_and_dotted_is_refused(tmp_path, text, key):
    path = config_file(tmp_path, text)
    assert refused_file(path) == f"error: config file {path}: key {key!r} given twice (nested and dotted): give it once"


def test_a_mapping_that_holds_itself_is_refused(capsys, tmp_path):
    path = config_file(tmp_path, "sweep: &x {seed: *x}\n")  # flattening the sweep recursed without end
    assert refused(capsys, tmp_path, config=path) == (
        f"error: config file {path}: a mapping holds itself (an alias *x inside its own anchor &x) or is nested "
        f"too deep")


@pytest.mark.parametrize("text,problem", [
    ('{"mode": "centralized", "accuracy": ', "Expecting value: line 1 column 37 (char 36)"),
    ("[]", "a JSON list, not an object"),
    ('{"mode": "centralized"}', "lacks method, group_rule, accuracy, balanced_accuracy, many, medium, few, ece"),
    (b"\xff\xfe", "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"),
    ('{"mode": "centralized", "method": "ce", "group_rule": "count", "accuracy": NaN, "balanced_accuracy": 0.5, '
     '"many": 0.5, "medium": 0.5, "few": 0.5, "ece": 0.1}', "accuracy is not a finite number: nan"),
])
def test_a_finished_run_with_an_unreadable_summary_is_refused(capsys, tmp_path, monkeypatch, text, problem):
    calls: list[str] = []
    fake_runners(monkeypatch, calls)
    monkeypatch.chdir(tmp_path)
    args = ["--out", "runs", "name=s", "mode=centralized"]
    assert simulate.main(args) == 0
    summary = tmp_path / "runs" / "s-seed0-cen-ce" / "summary.json"
    if isinstance(text, bytes):
        summary.write_bytes(text)
    else:
        summary.write_text(text)
    capsys.readouterr()
    assert simulate.main(args) == 2
    out, err = capsys.readouterr()
    assert err == (f"error: run runs/s-seed0-cen-ce: summary.json is not readable ({problem}); delete it to finish "
                   f"the run again from its checkpoint, or delete the run folder to run it over\n")
    assert "already finished" not in out and calls == ["s-seed0-cen-ce"]
    summary.unlink()  # as the message says: the run is finished again
    assert simulate.main(args) == 0 and calls == ["s-seed0-cen-ce"] * 2
    assert json.loads(summary.read_text())["mode"] == "centralized"


def test_python_m_fedlt_sweep_points_to_the_simulator():
    proc = subprocess.run([sys.executable, "-m", "fedlt.sweep", "sweep.seed=[0,1]"], cwd=ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == "", proc.stderr
    assert proc.stderr.startswith("error: fedlt.sweep has no command line; run a sweep with python -m fedlt.simulate")
    assert proc.stderr.count("\n") == 1 and "sweep.KEY=[a,b]" in proc.stderr
