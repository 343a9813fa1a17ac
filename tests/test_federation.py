"""Federated runs on a small Fashion-MNIST-LT through Flower's simulation engine (Ray: a basic run, a resumed
run, a failing client) and through the in-process engine (bit-identical to Ray, tested; everything else), and
the strategy's aggregation on hand-made replies."""

import json

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, Message, Metadata, MetricRecord, RecordDict

from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.federation.inprocess import run_inprocess
from fedlt.federation.runner import run_federated
from fedlt.federation.strategy import ClientFailure, FedLTStrategy, sample_cohort

SMALL = ["mode=federated", "partition.num_clients=4", "federation.rounds=3", "federation.fraction=0.75",
         "train.local_steps=25", "train.batch_size=32", "model.name=small_cnn", "data.imbalance_factor=100"]
RUN_FILES = ("config.yaml", "env.json", "partition.json", "metrics.jsonl", "summary.json", "checkpoint.pt")


def small_cfg(*extra):
    return load_config(None, SMALL + list(extra))


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    path = tmp_path_factory.mktemp("fed") / "run"
    return path, run_federated(small_cfg(), str(path))


@pytest.fixture(scope="module")
def inprocess_run(tmp_path_factory):
    """The first run's config, evaluated every 2nd round, through the in-process engine."""
    path = tmp_path_factory.mktemp("fed") / "again"
    return path, run_inprocess(small_cfg("eval.every=2"), str(path))


@needs_fashion
@pytest.mark.slow
def test_fedavg_run_beats_chance_and_writes_every_file(first_run):
    path, summary = first_run
    for name in RUN_FILES:
        assert (path / name).is_file(), name
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in rows] == [0, 1, 2, 3]  # round 0: the initial model
    for key in ("loss", "accuracy", "balanced_accuracy", "many", "medium", "few"):
        assert key in rows[0]
    assert summary["accuracy"] > 0.2  # chance is 0.1 on the balanced test set
    for key in ("accuracy", "balanced_accuracy", "many", "medium", "few", "per_class", "ece", "group_rule",
                "wall_clock_seconds"):
        assert key in json.loads((path / "summary.json").read_text())
    part = json.loads((path / "partition.json").read_text())
    assert np.sum(part["client_class_counts"]) == 14886 and len(part["client_class_counts"]) == 4
    assert [r["clients"] for r in rows[1:]] == [sample_cohort(0, t, 4, 0.75) for t in (1, 2, 3)]
    assert all(r["train_images"] > 0 for r in rows[1:]) and summary["train_images"] == sum(r["train_images"]
                                                                                          for r in rows)


@needs_fashion
@pytest.mark.slow
def test_same_seed_gives_identical_numbers_whatever_the_eval_schedule(first_run, inprocess_run):
    _, a = first_run
    path, b = inprocess_run
    for key in ("accuracy", "balanced_accuracy", "many", "medium", "few", "ece", "per_class"):
        assert a[key] == b[key], key
    rows = [json.loads(x) for x in (path / "metrics.jsonl").read_text().splitlines()]
    assert ["accuracy" in r for r in rows] == [True, False, True, True]  # round 0, every 2nd round and the last
    assert rows[-1]["accuracy"] == b["accuracy"] and all(r["train_loss"] > 0 for r in rows[1:])


@needs_fashion
@pytest.mark.slow
def test_inprocess_engine_is_bit_identical_to_flower_simulation(first_run, inprocess_run):
    (ray_path, ray), (path, inproc) = first_run, inprocess_run
    assert set(ray) == set(inproc)
    for key in set(ray) - {"wall_clock_seconds", "seconds_per_round", "train_seconds", "images_per_second",
                           "peak_memory_mib"}:
        assert ray[key] == inproc[key], key
    a, b = (torch.load(p / "checkpoint.pt", weights_only=True) for p in (ray_path, path))
    assert a["step"] == b["step"] == 3 and a["state"]["strategy"] == b["state"]["strategy"]
    wa, wb = a["state"]["model"], b["state"]["model"]
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    rows_a, rows_b = ([json.loads(x) for x in (p / "metrics.jsonl").read_text().splitlines()] for p in (ray_path, path))
    assert [(r.get("clients"), r.get("train_loss"), r.get("accuracy")) for r in rows_a] == \
        [(r.get("clients"), r.get("train_loss"), r.get("accuracy")) for r in rows_b]
    assert (ray_path / "partition.json").read_text() == (path / "partition.json").read_text()


@needs_fashion
@pytest.mark.slow
def test_interrupted_run_resumes_to_the_same_result(first_run, tmp_path):
    _, reference = first_run
    flag = tmp_path / "flag"
    flag.write_text("")
    cfg = small_cfg("plugins=[plugins_for_tests]", "strategy.name=interrupt_once", "strategy.stop_round=3",
                    f"strategy.flag={flag}", "client.name=fedavg", "eval.every=3")
    path = tmp_path / "run"
    with pytest.raises(RuntimeError, match="interrupted before round 3"):
        run_federated(cfg, str(path))
    assert not (path / "summary.json").exists()
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 3  # rounds 0, 1, 2
    resumed = run_federated(cfg, str(path))
    assert len((path / "metrics.jsonl").read_text().splitlines()) == 4
    for key in ("accuracy", "per_class", "ece"):
        assert resumed[key] == reference[key], key


@needs_fashion
@pytest.mark.parametrize("engine", [pytest.param(run_federated, marks=pytest.mark.slow), run_inprocess])
def test_a_failing_client_fails_the_run_with_its_traceback(tmp_path, engine):
    cfg = small_cfg("plugins=[plugins_for_tests]", "client.name=failing_client", "federation.fraction=1.0",
                    "federation.rounds=1")
    with pytest.raises(ClientFailure, match="deliberate failure on partition 1") as failure:
        engine(cfg, str(tmp_path / "run"))
    assert "ClientAppException" in str(failure.value) and "federation.max_failures=0" in str(failure.value)
    assert not (tmp_path / "run" / "summary.json").exists()


@needs_fashion
def test_a_failure_within_max_failures_is_tolerated_and_counted(tmp_path, capsys):
    cfg = small_cfg("plugins=[plugins_for_tests]", "client.name=failing_client", "federation.fraction=1.0",
                    "federation.rounds=1", "federation.max_failures=1")
    summary = run_inprocess(cfg, str(tmp_path / "run"))
    assert "warning: client failure 1/1 tolerated" in capsys.readouterr().out
    assert torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["state"]["strategy"]["failures"] == 1
    assert summary["rounds"] == 1 and 0 <= summary["accuracy"] <= 1


def reply(pid: int, n: int, value: float) -> Message:
    content = RecordDict({"arrays": ArrayRecord({"w": torch.full((2, 2), value)}),
                          "metrics": MetricRecord({"num-examples": n, "partition-id": pid, "train_loss": value})})
    msg = Message(content=content, dst_node_id=0, message_type="train")
    return msg


def test_fedavg_aggregate_is_the_weighted_mean(message_identity):
    cfg = small_cfg()
    strategy = FedLTStrategy(cfg, 10)
    replies = [reply(2, 30, 4.0), reply(0, 10, 1.0), reply(1, 60, -2.0)]
    arrays, metrics = strategy.aggregate_train(1, replies)
    expected = (10 * 1.0 + 60 * -2.0 + 30 * 4.0) / 100
    assert np.allclose(arrays["w"].numpy(), expected)
    assert metrics["train_loss"] == pytest.approx(expected)


def test_cohorts_are_seeded_distinct_and_sized():
    a = sample_cohort(0, 5, 100, 0.2)
    assert a == sample_cohort(0, 5, 100, 0.2) and len(a) == 20 and len(set(a)) == 20
    assert a != sample_cohort(0, 6, 100, 0.2) and a != sample_cohort(1, 5, 100, 0.2)
    assert sample_cohort(0, 1, 3, 0.01) and len(sample_cohort(0, 1, 3, 1.0)) == 3


@needs_fashion
def test_a_run_stopped_after_its_last_checkpoint_finishes_from_it(inprocess_run, tmp_path):
    import shutil

    path, reference = inprocess_run
    copy = tmp_path / "run"
    shutil.copytree(path, copy)
    for name in ("summary.json", "done"):  # as if stopped between the last checkpoint and the summary
        (copy / name).unlink(missing_ok=True)
    again = run_inprocess(small_cfg("eval.every=2"), str(copy))
    assert len((copy / "metrics.jsonl").read_text().splitlines()) == 4  # rounds 0-3: no round ran again
    for key in ("accuracy", "per_class", "ece", "reliability"):
        assert again[key] == reference[key], key
