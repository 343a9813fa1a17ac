"""What a run says: its plan first, elapsed time and time left on every progress line, the sweep's time left,
no warnings or colour codes unless --verbose, and --dry-run's config, partition and estimate without a run."""

from __future__ import annotations

import io
import json
import logging
import re
import warnings
from types import SimpleNamespace

import pytest

from conftest import ROOT, needs_fashion
from fedlt.config import load_config
from fedlt.evaluation import duration, progress_line
from fedlt.federation.runner import quiet_output
from fedlt.simulate import format_table, main, sweep_eta
from fedlt.sweep import expand, plan

TINY = ["data.name=fashion_mnist", "data.imbalance_factor=100", "partition.num_clients=2", "partition.min_size=2",
        "federation.rounds=2", "federation.fraction=1", "train.local_steps=1", "train.batch_size=16",
        "model.name=small_cnn", "eval.every=2"]
ANSI = re.compile(r"\x1b\[")


@pytest.mark.parametrize("seconds, text", [(0.4, "0s"), (42, "42s"), (185, "3m05s"), (7620, "2h07m")])
def test_durations_read_as_a_person_reads_them(seconds, text):
    assert duration(seconds) == text


def test_a_progress_line_shows_elapsed_time_and_time_left():
    m = {"loss": 1.0, "accuracy": 0.5, "balanced_accuracy": 0.4, "many": 0.9, "medium": None, "few": 0.1}
    line = progress_line("[federated fedavg] round 3/10", m, 2.0, elapsed=62.0, remaining=7 * 62.0 / 3)
    assert line.endswith("(2.0s; elapsed 1m02s, eta 2m25s)")
    assert progress_line("[x] round 1/2", None, 1.0, 0.5, 1.0, 1.0).endswith("(1.0s; elapsed 1s, eta 1s)")


def test_the_final_table_names_each_runs_group_rule():
    thirds, count = "class-index thirds (count rule leaves a group empty)", "count (many >100, medium 20-100, few <20)"
    m = {"mode": "federated", "method": "fedavg", "accuracy": 0.5, "balanced_accuracy": 0.4, "many": 0.9,
         "medium": None, "few": 0.1, "ece": 0.05}
    one = format_table([{**m, "group_rule": count, "run": "a"}, {**m, "group_rule": count, "run": "b"}])
    assert one.splitlines()[-1] == f"groups: {count}" and "  n/a" in one.splitlines()[1]
    both = format_table([{**m, "group_rule": thirds, "run": "c10"}, {**m, "group_rule": count, "run": "c100"},
                         {**m, "group_rule": thirds, "run": "c10b"}])
    assert both.splitlines()[-2:] == [f"groups of c10, c10b: {thirds}", f"groups of c100: {count}"]


def test_the_sweep_eta_is_the_mean_time_of_its_mode_times_the_runs_left(tmp_path):
    done = tmp_path / "done-run"
    done.mkdir()
    (done / "done").write_text("")
    left = [SimpleNamespace(mode="federated", path=tmp_path / "a"), SimpleNamespace(mode="centralized", path=done),
            SimpleNamespace(mode="centralized", path=tmp_path / "b"), SimpleNamespace(mode="federated", path=tmp_path)]
    assert sweep_eta(left, {"federated": [10.0, 30.0], "centralized": [4.0]}) == 20 + 4 + 20
    # no centralized run yet: the mean of the runs so far
    assert sweep_eta(left[2:3], {"federated": [10.0, 30.0], "centralized": []}) == 20


def test_quiet_output_drops_flowers_deprecations_and_colours_and_pythons_warnings(capfd, monkeypatch):
    from flwr.common.logger import console_handler, log, warn_deprecated_feature

    stream = io.StringIO()  # not a terminal
    monkeypatch.setattr(console_handler, "stream", stream)
    with quiet_output(verbose=False):
        warn_deprecated_feature("run_simulation")
        warnings.warn("old api", DeprecationWarning)
        log(logging.WARNING, "a warning that matters")
    out = capfd.readouterr()
    text = out.out + out.err + stream.getvalue()
    assert "DEPRECATED" not in text and "old api" not in text and not ANSI.search(text)
    assert "a warning that matters" in stream.getvalue()  # Flower's own warnings stay
    assert console_handler.colored  # restored afterwards
    with quiet_output(verbose=True):
        warn_deprecated_feature("run_simulation")
    assert "DEPRECATED FEATURE" in stream.getvalue()  # --verbose shows them


@needs_fashion
def test_a_tiny_run_prints_its_plan_progress_with_eta_and_no_warnings(capfd, tmp_path):
    from fedlt.federation.inprocess import run_inprocess

    cfg = load_config(None, TINY + ["strategy.name=fedavg", "client.name=fedprox", "mode=federated"])
    capfd.readouterr()
    summary = run_inprocess(cfg, str(tmp_path / "run"))
    out = capfd.readouterr()
    text = out.out + out.err
    assert "warning" not in text.lower() and not ANSI.search(text), text
    lines = out.out.splitlines()
    assert lines[0].startswith("[federated fedavg+fedprox] 2 rounds, 2 of 2 clients per round, 1 local steps each")
    progress = [x for x in lines if " round " in x and "/2 " in x and "initial model" not in x]
    assert len(progress) == 2 and all(re.search(r"elapsed \d+[ms].*, eta \d+", x) for x in progress)
    assert progress[-1].endswith("eta 0s)")
    assert summary["method"] == "fedavg+fedprox"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["method"] == "fedavg+fedprox"


def test_run_directories_name_the_client_method_where_it_is_not_the_strategys_own(tmp_path):
    combos = expand(None, ["mode=federated", "client.name=local_loss", "client.loss=la", "sweep.seed=[0,1]"])
    assert [r.path.name for r in plan(combos, tmp_path)] == ["run-seed0-fed-fedavg+la", "run-seed1-fed-fedavg+la"]
    own = expand(None, ["mode=federated", "strategy.name=fedprox"])
    assert plan(own, tmp_path)[0].path.name == "run-seed0-fed-fedprox"


@needs_fashion
def test_dry_run_prints_config_sources_partition_and_estimate_and_runs_nothing(capsys, tmp_path):
    out = tmp_path / "runs"
    code = main(["--dry-run", "--config", str(ROOT / "configs/default.yaml"), "--out", str(out), *TINY,
                 "mode=federated", "strategy.name=fedavg", "client.name=local_loss", "client.loss=la"])
    text = capsys.readouterr().out  # (strategy.name fixed: the file's fedlc is its own client, refused with la)
    assert code == 0
    assert not out.exists()
    assert re.search(r"partition\.num_clients = 2 +\(override\)", text)
    assert re.search(r"partition\.alpha = 0\.5 +\(file default\.yaml\)", text)
    assert re.search(r"client\.loss_options\.tau = 1\.0 +\(default of client method local_loss\)", text)
    assert re.search(r"eval\.batch_size = 1024 +\(default\)", text)
    assert "partition: 2 clients (dirichlet)" in text and "client 1: " in text
    assert re.search(r"default-seed0-fed-fedavg\+la: federated fedavg\+la: 2 rounds × 2 of 2 clients × 1 local steps .*"
                     r"estimate \d+", text)
    assert "estimated wall time" in text and "an estimate" in text


@needs_fashion
@pytest.mark.slow
@pytest.mark.heavy
def test_a_real_command_line_run_on_ray_prints_no_warnings_colours_or_actor_chatter(tmp_path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "fedlt.simulate", "--config", str(ROOT / "configs/default.yaml"),
                           "--out", str(tmp_path), "mode=federated", *(a for a in TINY if a != "federation.rounds=2"),
                           "federation.rounds=1"],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path, check=False)
    text = proc.stdout + proc.stderr
    assert proc.returncode == 0, text
    assert "warning" not in text.lower() and not ANSI.search(text) and "ClientAppActor" not in text, text
    assert "[federated fedavg] 1 round, 2 of 2 clients per round" in proc.stdout
