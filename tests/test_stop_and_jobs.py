"""Whole command lines in subprocesses: Ctrl-C stops a run cleanly and its printed command resumes it;
``--jobs 2`` runs a sweep's runs at once with the results of ``--jobs 1``. Data: the tiny synthetic set of
tests/plugins_for_tests (a few hundred 16×16 images)."""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from fedlt import simulate

ROOT = Path(__file__).resolve().parents[1]
TINY = ["plugins=[plugins_for_tests]", "data.name=tiny_synthetic", "data.imbalance_factor=10", "data.crop_padding=0",
        "data.flip=false", "model.name=small_cnn"]
# what differs between two runs of one config: the clock and the memory
MEASURED = {"wall_clock_seconds", "seconds_per_round", "seconds_per_epoch", "train_seconds", "images_per_second",
            "peak_memory_mib", "run"}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "fedlt.simulate", *args]


def env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                         os.environ.get("PYTHONPATH", "")])}


def start(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(args, cwd=ROOT, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **kw)


def wait_for(proc: subprocess.Popen, text: str) -> list[str]:
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no line with {text!r}:\n{''.join(lines)}\n{proc.stderr.read()}")


def rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]


def test_ctrl_c_checkpoints_prints_the_resume_command_and_exits_130(tmp_path):
    args = ["--out", str(tmp_path), "mode=centralized", "centralized.epochs=20", *TINY]
    proc = start(cli(*args))
    wait_for(proc, "epoch 0/20")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    ckpt = torch.load(run / "checkpoint.pt", weights_only=False)
    done = [r["epoch"] for r in rows(run)]
    assert 1 <= ckpt["step"] < 20 and done == list(range(ckpt["step"] + 1))  # stopped after a whole epoch
    assert not (run / "summary.json").exists()
    resume = err.split("resume with:\n", 1)[1].strip().splitlines()[0]
    assert shlex.split(resume) == ["python", "-m", "fedlt.simulate", *args]
    again = subprocess.run(cli(*shlex.split(resume)[3:]), cwd=ROOT, env=env(), capture_output=True, text=True,
                           timeout=900)
    assert again.returncode == 0, again.stderr
    assert f"resuming after epoch {ckpt['step']}" in again.stdout
    assert [r["epoch"] for r in rows(run)] == list(range(21)) and (run / "done").is_file()
    whole = json.loads((run / "summary.json").read_text())["wall_clock_seconds"]  # both processes' epochs
    assert f"(resumed; {whole:.1f}s of epochs and evaluations in all) -> {run}" in again.stdout  # not only this one's


STARTING = """
import os, runpy, signal, sys

class CtrlCOnImport:  # Ctrl-C arrives while fedlt.simulate imports numpy (a --jobs child stopped as it starts)
    def find_spec(self, name, path=None, target=None):
        if name == "numpy":
            os.kill(os.getpid(), signal.SIGINT)

sys.meta_path.insert(0, CtrlCOnImport())
sys.argv = ["fedlt.simulate", "--list"]
runpy.run_module("fedlt.simulate", run_name="__main__", alter_sys=True)
"""


def test_ctrl_c_while_the_command_starts_exits_130_without_traceback():
    """It used to end in a KeyboardInterrupt traceback from the module being imported."""
    p = subprocess.run([sys.executable, "-c", STARTING], cwd=ROOT, env=env(), capture_output=True, text=True,
                       timeout=120)
    assert (p.returncode, p.stderr, p.stdout) == (130, "interrupted before the run started\n", "")


def test_second_ctrl_c_aborts_without_traceback(tmp_path):
    proc = start(cli("--out", str(tmp_path), "mode=centralized", "centralized.epochs=20", *TINY))
    wait_for(proc, "epoch 0/20")
    proc.send_signal(signal.SIGINT)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "Traceback" not in out
    assert "aborted" in err or "resume with" in err  # (the first stop may have come before the second Ctrl-C)


def session_processes(sid: int) -> list[str]:
    ps = subprocess.run(["ps", "-e", "-o", "sid=,pid=,args="], capture_output=True, text=True).stdout
    return [line for line in ps.splitlines() if line.split(None, 1)[0] == str(sid)]


def assert_session_ends(sid: int) -> None:
    """Nothing is left of session ``sid`` (Ray's processes take a moment to go)."""
    for _ in range(100):
        left = session_processes(sid)
        if not left:
            return
        time.sleep(0.2)
    assert not left, left


@pytest.mark.slow
@pytest.mark.heavy
def test_ctrl_c_leaves_no_ray_process(tmp_path):
    """Under Flower's simulation engine: exit 130, no traceback, nothing of Ray left in the run's session."""
    proc = start(cli("--out", str(tmp_path), "mode=federated", "strategy.name=fedavg", "federation.rounds=20",
                     "partition.num_clients=2", "federation.fraction=1", *TINY), start_new_session=True)
    wait_for(proc, "round 1/20")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "ActorUnavailableError" not in err
    assert_session_ends(proc.pid)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == rows(run)[-1]["round"]


@pytest.mark.slow
@pytest.mark.heavy
def test_ctrl_c_in_a_terminal_finishes_the_round_under_ray(tmp_path):
    """A terminal sends SIGINT to its whole foreground process group, Ray's processes included: the round in
    flight still finishes (no client fails), the checkpoint is written, exit 130, nothing of Ray left."""
    proc = start(cli("--out", str(tmp_path), "mode=federated", "strategy.name=fedavg", "federation.rounds=20",
                     "partition.num_clients=2", "federation.fraction=1", "train.local_steps=300", *TINY),
                 start_new_session=True)
    wait_for(proc, "round 1/20")
    time.sleep(1.0)  # into round 2, while the clients train
    os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C typed in the terminal does
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 130, err
    assert "resume with" in err and "Traceback" not in err and "failed" not in out + err, err
    assert_session_ends(proc.pid)
    (run,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    last = rows(run)[-1]
    assert last["round"] >= 2 and last["failed"] == [], last
    assert torch.load(run / "checkpoint.pt", weights_only=False)["step"] == last["round"]


def test_jobs_2_runs_a_sweep_at_once_with_the_results_of_jobs_1(tmp_path, capfd, monkeypatch):
    args = ["mode=centralized", "centralized.epochs=1", "sweep.seed=[0,1]", *TINY]
    # one thread here and in the children (other tests leave this process at one thread): the same arithmetic
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    assert simulate.main(["--out", str(tmp_path / "serial"), *args]) == 0
    capfd.readouterr()
    assert simulate.main(["--out", str(tmp_path / "parallel"), "--jobs", "2", *args]) == 0
    out = capfd.readouterr().out
    names = sorted(p.name for p in (tmp_path / "serial").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "parallel").iterdir()) and len(names) == 2
    for name in names:
        assert f"[{name}] [centralized ce] epoch 1/1" in out  # each child's lines, prefixed by its run
        a, b = (json.loads((tmp_path / d / name / "summary.json").read_text()) for d in ("serial", "parallel"))
        assert {k: v for k, v in a.items() if k not in MEASURED} == {k: v for k, v in b.items() if k not in MEASURED}
        seed = yaml.safe_load((tmp_path / "parallel" / name / "config.yaml").read_text())["seed"]
        assert f"seed{seed}-" in name and a["seed"] == seed  # each run in its own directory
    # the same command again: both finished, skipped without starting a process
    assert simulate.main(["--out", str(tmp_path / "parallel"), "--jobs", "2", *args]) == 0
    assert capfd.readouterr().out.count("already finished; skipped") == 2


def test_ctrl_c_on_a_sweep_with_runs_not_started_exits_130(tmp_path):
    """3 runs, 2 at a time: Ctrl-C stops the 2 running ones after their step; the third is never started and the
    sweep ends (it waited for a pending run forever before) with the resume command."""
    args = ["--out", str(tmp_path), "--jobs", "2", "mode=centralized", "centralized.epochs=20", "sweep.seed=[0,1,2]",
            "train.local_steps=1", *TINY]  # local_steps: the children's config files must load again
    proc = start(cli(*args))
    wait_for(proc, "epoch 0/20")
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    assert "Traceback" not in err and "resume with" in err
    assert sum(p.is_dir() for p in tmp_path.iterdir()) == 2  # the third run never started
