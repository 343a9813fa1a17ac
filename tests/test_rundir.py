"""Run directories never overwrite or mix each other: the lock, names with the seed, --overwrite for another
config, atomic writes, strict JSON (no training: the runners are replaced by ones that write a finished run)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from test_sweep import fake_runners

from fedlt import simulate
from fedlt.config import load_config
from fedlt.errors import FedLTError
from fedlt.rundir import RunDir, first_difference
from fedlt.sweep import expand, plan

ROOT = Path(__file__).resolve().parents[1]
HOLDER = """
import sys
from fedlt.rundir import RunDir
with RunDir(sys.argv[1]).lock():
    print("locked", flush=True)
    sys.stdin.read()  # hold the lock until the test closes our stdin
"""


def strict_json(text: str):
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def held(tmp_path):
    """Another process holding the lock of ``tmp_path/run``; yields (path, process)."""
    path = tmp_path / "run"
    path.mkdir()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True, env=env)
    assert proc.stdout.readline().strip() == "locked"
    yield path, proc
    if proc.poll() is None:
        proc.stdin.close()
        proc.wait(timeout=30)


def test_a_locked_run_directory_is_refused_at_once(held):
    path, proc = held
    t0 = time.time()
    with pytest.raises(FedLTError, match=f"^run directory {path} is in use by another run \\(process {proc.pid}\\)"), \
            RunDir(path).lock():
        pytest.fail("took a lock another process holds")
    assert time.time() - t0 < 5
    proc.stdin.close()  # the other run ends: the directory is free
    proc.wait(timeout=30)
    with RunDir(path).lock(), RunDir(path).lock():  # re-entrant within a process
        pass


def test_a_second_run_fails_with_one_line_or_waits(held, monkeypatch, capsys):
    path, proc = held
    calls: list[str] = []
    fake_runners(monkeypatch, calls)
    monkeypatch.setattr("fedlt.sweep.run_name", lambda *a: "run")  # both runs into the held directory
    args = ["--out", str(path.parent), "mode=centralized", "name=x"]
    assert simulate.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: run directory {path} is in use by another run")
    assert calls == [] and not (path / "summary.json").exists()

    import threading
    threading.Timer(1.0, proc.stdin.close).start()  # the other run ends after a second
    t0 = time.time()
    assert simulate.main(args + ["--wait"]) == 0
    assert time.time() - t0 >= 0.9 and calls == ["run"]


def test_the_run_skeleton_holds_the_lock(held):
    from fedlt.federation.inprocess import run_inprocess

    path, _ = held
    cfg = load_config(None, ["mode=federated", "partition.num_clients=2", "federation.rounds=1"])
    with pytest.raises(FedLTError, match=f"run directory {path} is in use"):
        run_inprocess(cfg, str(path))
    assert sorted(p.name for p in path.iterdir()) == [".lock"]


def test_run_directory_names_carry_the_seed(tmp_path, monkeypatch):
    assert [r.path.name for r in plan(expand(None, ["name=d", "seed=1"]), tmp_path)] == ["d-seed1-fed-fedavg",
                                                                                        "d-seed1-cen-ce"]
    calls: list[str] = []
    fake_runners(monkeypatch, calls)
    monkeypatch.chdir(tmp_path)
    assert simulate.main(["--out", "runs", "name=s", "seed=0"]) == 0
    before = {p: p.read_text() for p in (tmp_path / "runs").rglob("*") if p.is_file()}
    assert simulate.main(["--out", "runs", "name=s", "seed=1"]) == 0  # seed 1 after seed 0: new directories
    assert calls == ["s-seed0-fed-fedavg", "s-seed0-cen-ce", "s-seed1-fed-fedavg", "s-seed1-cen-ce"]
    assert all(p.read_text() == text for p, text in before.items())


def finished_centralized_run(tmp_path, monkeypatch) -> tuple[list[str], Path, list[str]]:
    """``simulate.main`` (runners faked) of a centralized run into runs/c-seed0-cen-ce under ``tmp_path``: the
    command's arguments, the run directory, and the list of the runs the fake runners were called for."""
    calls: list[str] = []
    fake_runners(monkeypatch, calls)
    monkeypatch.chdir(tmp_path)
    args = ["--out", "runs", "name=c", "mode=centralized"]
    assert simulate.main(args) == 0
    return args, tmp_path / "runs" / "c-seed0-cen-ce", calls


def test_a_finished_run_whose_config_yaml_lost_a_key_is_not_taken_for_the_default(tmp_path, monkeypatch, capsys):
    """config.yaml cut after the run finished, where the rest still validates (the lost key's default fills in):
    a run of the default config skipped it as already finished and returned the other config's results."""
    calls: list[str] = []
    fake_runners(monkeypatch, calls)
    monkeypatch.chdir(tmp_path)
    args = ["--out", "runs", "name=c", "mode=centralized"]
    assert simulate.main(args + ["centralized.epochs=3"]) == 0
    config = tmp_path / "runs" / "c-seed0-cen-ce" / "config.yaml"
    lines = config.read_text().splitlines(keepends=True)
    config.write_text("".join(line for line in lines if line.strip() != "epochs: 3.0"))
    assert len(config.read_text().splitlines()) == len(lines) - 1
    capsys.readouterr()
    assert simulate.main(args) == 2
    assert capsys.readouterr().err.splitlines() == [
        "error: run directory runs/c-seed0-cen-ce holds a finished run whose config.yaml was changed or damaged after "
        "it finished (its digest is not the one in summary.json); restore it, or pass --overwrite to replace the "
        "run, or choose another --out or name="]
    assert calls == ["c-seed0-cen-ce"]
    assert simulate.main(args + ["--overwrite"]) == 0 and calls == ["c-seed0-cen-ce"] * 2


@pytest.mark.parametrize("finished", [True, False])
def test_a_run_of_another_config_is_kept_unless_overwrite(finished, tmp_path, monkeypatch, capsys):
    args, path, calls = finished_centralized_run(tmp_path, monkeypatch)
    if not finished:
        (path / "done").unlink()
    before = {p.name: p.read_text() for p in path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert simulate.main(args + ["centralized.epochs=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    state = "a finished" if finished else "an unfinished"
    assert err == [(f"error: run directory runs/c-seed0-cen-ce holds {state} run of another config "
                    f"(centralized.epochs: 10.0 there, 3.0 now); pass --overwrite to replace it, or choose another "
                    f"--out or name=")]
    assert calls == ["c-seed0-cen-ce"] and {p.name: p.read_text() for p in path.iterdir() if p.is_file()} == before
    assert simulate.main(args + ["centralized.epochs=3", "--overwrite"]) == 0
    assert calls == ["c-seed0-cen-ce"] * 2 and "epochs: 3.0" in (path / "config.yaml").read_text()
    assert simulate.main(args + ["centralized.epochs=3"]) == 0 and len(calls) == 2  # same config: skipped


@pytest.mark.parametrize("damage", ["deleted", "emptied", "not YAML", "a list"])
def test_a_run_whose_config_yaml_is_lost_is_kept_unless_overwrite(damage, tmp_path, monkeypatch, capsys):
    """A finished run without its config.yaml (and its checkpoint, deleted to save space) was taken for an empty
    directory and overwritten by a run of any config; with config.yaml damaged the error named a key '<unset>'."""
    args, path, calls = finished_centralized_run(tmp_path, monkeypatch)
    (path / "checkpoint.pt").unlink(missing_ok=True)
    config = path / "config.yaml"
    if damage == "deleted":
        config.unlink()
    else:
        config.write_text({"emptied": "", "not YAML": "train: [\n", "a list": "- 1\n"}[damage])
    before = {p.name: p.read_text() for p in path.iterdir() if p.is_file()}
    capsys.readouterr()
    assert simulate.main(args + ["centralized.epochs=3"]) == 2
    why = ("(summary.json, done) but no config.yaml that says which config it ran" if damage == "deleted"
           else "whose config.yaml is not a readable config mapping")
    assert capsys.readouterr().err.strip().splitlines() == [
        f"error: run directory runs/c-seed0-cen-ce holds a finished run {why}; pass --overwrite to replace it, or "
        f"choose another --out or name="]
    assert calls == ["c-seed0-cen-ce"] and {p.name: p.read_text() for p in path.iterdir() if p.is_file()} == before
    assert simulate.main(args + ["centralized.epochs=3", "--overwrite"]) == 0
    assert calls == ["c-seed0-cen-ce"] * 2 and "epochs: 3.0" in config.read_text()


def test_a_finished_run_of_an_earlier_fedlt_is_the_same_config(tmp_path, monkeypatch, capsys):
    """config.yaml written before a key was added to fedlt (``centralized.warmup_factor``, at its default): the
    finished run is skipped, not refused as "another config ('<unset>' there, 0.0 now)"; a key no longer in
    fedlt, or a value it now refuses, still makes another config."""
    args, path, calls = finished_centralized_run(tmp_path, monkeypatch)
    config = path / "config.yaml"
    older = yaml.safe_load(config.read_text())
    del older["centralized"]["warmup_factor"]
    config.write_text(yaml.safe_dump(older, sort_keys=False))
    summary = json.loads((path / "summary.json").read_text())
    del summary["config_digest"]  # (an earlier fedlt recorded no digest of config.yaml in summary.json)
    (path / "summary.json").write_text(json.dumps(summary))
    assert simulate.main(args) == 0 and calls == ["c-seed0-cen-ce"]  # skipped: finished, same config
    for changed in ({**older, "centralized": {**older["centralized"], "retired_key": 1}},
                    {**older, "centralized": {**older["centralized"], "epochs": -1}}):
        config.write_text(yaml.safe_dump(changed, sort_keys=False))
        capsys.readouterr()
        assert simulate.main(args) == 2 and calls == ["c-seed0-cen-ce"]
        assert "holds a finished run of another config (centralized." in capsys.readouterr().err


def test_the_run_skeleton_refuses_another_config(tmp_path):
    from fedlt.run_loop import run_steps

    run = RunDir(tmp_path / "run")
    run.write_config(load_config(None, ["mode=centralized"]))
    run.write_summary({"accuracy": 0.5})
    with pytest.raises(FedLTError, match="holds a finished run of another config \\(seed: 0 there, 3 now\\)"):
        run_steps(load_config(None, ["mode=centralized", "seed=3"]), run, None, None, None)
    assert strict_json((tmp_path / "run" / "summary.json").read_text()) == {"accuracy": 0.5}


def test_first_difference_names_a_nested_key_in_the_new_order():
    assert first_difference({"a": 1, "b": {"c": 2, "d": 3}}, {"a": 1, "b": {"c": 2, "d": 4}}) == "b.d: 3 there, 4 now"
    assert first_difference({"a": 1}, {"a": 1, "z": [1]}) == "z: '<unset>' there, [1] now"
    assert first_difference({"a": 1, "y": 2}, {"a": 1}) == "y: 2 there, '<unset>' now"


def test_summary_and_metrics_are_strict_json_non_finite_as_null(tmp_path, capsys):
    import numpy as np

    run = RunDir(tmp_path)
    run.append_metrics({"round": 1, "accuracy": 0.5, "train_loss": float("nan")})
    run.write_summary({"accuracy": float("inf"), "per_class": np.array([0.5, np.nan]), "few": 0.25})
    summary = strict_json((tmp_path / "summary.json").read_text())
    assert summary == {"accuracy": None, "per_class": [0.5, None], "few": 0.25, "non_finite": ["accuracy", "per_class.1"]}
    row = strict_json((tmp_path / "metrics.jsonl").read_text())
    assert row == {"round": 1, "accuracy": 0.5, "train_loss": None, "non_finite": ["train_loss"]}
    out = capsys.readouterr().out
    assert "non-finite values written as null at accuracy, per_class.1" in out and "train_loss" in out


def test_writes_are_whole_or_not_at_all(tmp_path, monkeypatch):
    run = RunDir(tmp_path)
    run.append_metrics({"round": 1, "accuracy": 0.5})
    run.write_summary({"accuracy": 0.5})

    def crash(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        run.append_metrics({"round": 2, "accuracy": 0.75})
    with pytest.raises(OSError):
        run.write_summary({"accuracy": 0.75})
    with pytest.raises(OSError):
        run.write_config(load_config(None, []))
    monkeypatch.undo()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 1, "accuracy": 0.5}\n'
    assert strict_json((tmp_path / "summary.json").read_text()) == {"accuracy": 0.5}
    assert not (tmp_path / "config.yaml").exists()
    run.append_metrics({"round": 2, "accuracy": 0.75})
    assert [strict_json(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_a_client_failure_ends_the_command_with_its_message_and_status_1(tmp_path, monkeypatch, capsys):
    import fedlt.federation.runner
    from fedlt.errors import ClientFailure

    def fail(cfg, path, verbose=False):
        raise ClientFailure("client of partition 3 failed in round 2: ValueError: x (failure 1, "
                            "federation.max_failures=0)\nclient traceback:\nTraceback (most recent call last):\n"
                            "ValueError: x")

    monkeypatch.setattr(fedlt.federation.runner, "run_federated", fail)
    monkeypatch.setattr(simulate, "check_data", lambda cfgs: None)
    assert simulate.main(["--out", str(tmp_path), "mode=federated"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: client of partition 3 failed in round 2: ValueError: x")
    assert err.count("Traceback") == 1 and "simulate.py" not in err  # the client's traceback only


def test_flowers_per_client_error_logs_are_left_out_unless_verbose():
    import logging

    from fedlt.federation.runner import _ClientErrorLogs

    def record(level, msg):
        return logging.LogRecord("flwr", level, "vce_api.py", 1, msg, None, None)

    keep = _ClientErrorLogs().filter
    assert not keep(record(logging.ERROR, RuntimeError("<<fedlt-client-error 1\nValueError: x")))
    assert not keep(record(logging.ERROR, "Traceback ...\nray.exceptions.RayTaskError(ClientAppException): ..."))
    assert not keep(record(logging.ERROR, "An exception was raised when processing a message by RayBackend"))
    assert keep(record(logging.ERROR, "Simulation Runtime crashed."))  # the engine's own failures stay
    assert keep(record(logging.WARNING, RuntimeError("x")))


def test_a_run_depends_on_its_modes_keys_and_a_resolved_config_loads_again(tmp_path):
    """config.yaml of a run with train.local_steps loads again as a --config (a --jobs child reads it so); a
    centralized run is the same run whatever the federated sections say (a sweep over strategies reuses it),
    not when a key it reads changes; config.yaml of earlier versions (local_epochs 1.0 beside local_steps) too."""
    import yaml

    from fedlt.config import dump_config

    cfg = load_config(None, ["mode=centralized", "train.local_steps=3", "centralized.epochs=2"])
    (tmp_path / "c.yaml").write_text(dump_config(cfg))
    assert load_config(tmp_path / "c.yaml") == cfg
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    (run.path / "config.yaml").write_text(dump_config(cfg))
    other = load_config(None, ["mode=centralized", "train.local_steps=3", "centralized.epochs=2",
                               "strategy.name=fedprox", "federation.rounds=7"])
    assert run.same_config(other) and run.config_conflict(other) is None
    changed = load_config(None, ["mode=centralized", "train.local_steps=3", "centralized.epochs=5"])
    assert not run.same_config(changed) and "centralized.epochs: 2.0 there, 5.0 now" in run.config_conflict(changed)
    old = yaml.safe_load(dump_config(cfg))
    old["train"]["local_epochs"] = 1.0
    (run.path / "config.yaml").write_text(yaml.safe_dump(old, sort_keys=False))
    assert run.same_config(cfg)
    fed = load_config(None, ["mode=federated", "federation.rounds=2"])
    (run.path / "config.yaml").write_text(dump_config(fed))
    assert run.same_config(load_config(None, ["mode=federated", "federation.rounds=2", "centralized.epochs=9"]))
    assert not run.same_config(load_config(None, ["mode=federated", "federation.rounds=3"]))


@pytest.mark.parametrize("damage", ["deleted", "emptied", "first rows lost", "a line cut"])
def test_resuming_with_damaged_metrics_is_one_line_not_a_curve_with_holes(tmp_path, damage):
    run = RunDir(tmp_path)
    for t in range(4):
        run.append_metrics({"round": t, "accuracy": 0.1 * t})
    f = tmp_path / "metrics.jsonl"
    lines = f.read_text().splitlines(keepends=True)
    if damage == "deleted":
        f.unlink()
    elif damage == "emptied":
        f.write_text("")
    elif damage == "first rows lost":
        f.write_text("".join(lines[2:]))
    else:
        f.write_text("".join(lines[:2]) + lines[2][:9] + "\n" + lines[3])
    with pytest.raises(FedLTError, match=r"^run .*: metrics.jsonl .*: delete the run folder to run it over$"):
        run.truncate_metrics("round", 2)


def test_resuming_keeps_the_rows_up_to_the_checkpoint(tmp_path):
    run = RunDir(tmp_path)
    for t in range(5):
        run.append_metrics({"round": t, "accuracy": 0.1 * t})
    run.truncate_metrics("round", 2)
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]


def test_a_full_disk_is_one_line_and_leaves_no_half_written_file(tmp_path, monkeypatch):
    import errno

    import torch

    run = RunDir(tmp_path)
    run.append_metrics({"round": 0, "accuracy": 0.5})

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(FedLTError, match=r"^cannot write .*metrics.jsonl \(No space left on device\); the run's "
                                         r"files written before are whole"):
        run.append_metrics({"round": 1, "accuracy": 0.75})
    monkeypatch.undo()

    def cut(obj, f):  # what torch.save raises when the disk fills mid-file
        open(f, "wb").write(b"PK\x03")
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 128 vs 64")

    monkeypatch.setattr(torch, "save", cut)
    with pytest.raises(FedLTError, match=r"^cannot write .*checkpoint.pt \(\[enforce fail"):
        run.save_checkpoint({"step": 1, "elapsed": 1.0, "state": {}})
    assert not list(tmp_path.glob("*.tmp")) and not (tmp_path / "checkpoint.pt").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == '{"round": 0, "accuracy": 0.5}\n'
