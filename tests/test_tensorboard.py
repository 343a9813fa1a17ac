"""TensorBoard event files beside metrics.jsonl (fedlt.rundir.RunDir), and nothing when tensorboard is missing."""

from __future__ import annotations

import json
import sys
import time

import numpy as np
import pytest

from fedlt.rundir import RunDir

ROWS = [{"round": 1, "accuracy": 0.25, "balanced_accuracy": 0.2, "many": 0.5, "medium": 0.125, "few": 0.0,
         "ece": 0.3, "loss": 2.5, "train_loss": 2.75, "clients": [0, 3], "seconds": 1.5},
        {"round": 2, "accuracy": 0.375, "balanced_accuracy": np.float32(0.25), "many": 0.75, "medium": 0.25,
         "few": None, "ece": 0.125, "loss": 2.0, "train_loss": 2.25, "clients": [1, 2], "seconds": 1.25}]
SCALARS = ("accuracy", "balanced_accuracy", "many", "medium", "few", "ece", "loss", "train_loss", "seconds")


def read_scalars(path) -> dict[str, dict[int, float]]:
    """tag -> {step: value} of every event file in ``path``, as TensorBoard reads the folder."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(path))
    acc.Reload()
    out: dict[str, dict[int, float]] = {}
    for tag in acc.Tags()["scalars"]:
        events = acc.Scalars(tag)
        assert len({e.step for e in events}) == len(events), f"{tag}: a step shown twice"
        out[tag] = {e.step: e.value for e in events}
    return out


def test_rows_written_as_scalars(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path)
    for row in ROWS:
        run.append_metrics(row)
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 1
    scalars = read_scalars(tmp_path)
    assert set(scalars) == set(SCALARS)  # no step key, no list (clients)
    for tag in SCALARS:
        expected = {row["round"]: float(row[tag]) for row in ROWS if row[tag] is not None}
        assert scalars[tag] == pytest.approx(expected, abs=1e-7), tag
    assert scalars["few"] == {1: 0.0}  # the None of round 2 left out
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2]


def test_centralized_epochs_are_the_step(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path)
    run.append_metrics({"epoch": 3, "stage": 2, "train_loss": 0.5, "seconds": 4.0})
    run.write_summary({"accuracy": 0.5})  # closes the writer
    assert read_scalars(tmp_path) == {"stage": {3: 2.0}, "train_loss": {3: 0.5}, "seconds": {3: 4.0}}


def test_resumed_run_shows_each_step_once(tmp_path):
    """An interrupted run logged rounds 1-3 but checkpointed after round 1: the resumed run's rounds 2-3
    replace the old ones in TensorBoard (purge_step), as in metrics.jsonl."""
    pytest.importorskip("tensorboard")
    first = RunDir(tmp_path)
    for t in (0, 1, 2, 3):  # round 0: the initial model
        first.append_metrics({"round": t, "accuracy": 0.1 * t})
    # TensorBoard reads event files in name order, events.out.tfevents.<whole seconds>.<host>.<pid>.<uid>: a resume
    # within the same second of the same process could sort before the first (uid 10 < uid 9 as text, under
    # pytest-xdist where one process opens many writers), which a resumed run in a new process never does
    time.sleep(1.01 - time.time() % 1)
    resumed = RunDir(tmp_path)
    resumed.truncate_metrics("round", 1)
    for t in (2, 3):
        resumed.append_metrics({"round": t, "accuracy": 0.5 + 0.1 * t})
    assert len(list(tmp_path.glob("events.out.tfevents.*"))) == 2
    assert read_scalars(tmp_path)["accuracy"] == pytest.approx({0: 0.0, 1: 0.1, 2: 0.7, 3: 0.8})
    assert [json.loads(x)["accuracy"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == \
        pytest.approx([0.0, 0.1, 0.7, 0.8])


def test_reset_removes_event_files(tmp_path):
    pytest.importorskip("tensorboard")
    run = RunDir(tmp_path)
    run.append_metrics(ROWS[0])
    run.reset()
    assert not list(tmp_path.glob("events.out.tfevents.*"))
    run.append_metrics({"round": 1, "accuracy": 0.9})
    assert read_scalars(tmp_path) == {"accuracy": {1: pytest.approx(0.9)}}


def test_without_tensorboard_nothing_written(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # `import` now raises ImportError
    with pytest.raises(ImportError):
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    run = RunDir(tmp_path)
    for row in [{"round": 0, "accuracy": 0.1}, *ROWS]:
        run.append_metrics(row)
    run.truncate_metrics("round", 1)
    run.append_metrics(ROWS[1])
    run.write_summary({"accuracy": 0.375})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["done", "metrics.jsonl", "summary.json"]
    assert [json.loads(x)["round"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [0, 1, 2]
