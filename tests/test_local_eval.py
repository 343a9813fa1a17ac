"""Personalised (local) evaluation (fedlt/federation/local_eval.py): the local test sets, the summary's means,
and the same local accuracy from every engine and after a resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_bad_input import resumed_equals_uninterrupted

from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.federation.local_eval import draw_local_tests, local_metrics, local_test_counts

LOCAL = ["mode=federated", "partition.num_clients=4", "federation.rounds=2", "federation.fraction=0.5",
         "train.local_steps=3", "train.batch_size=32", "model.name=small_cnn", "data.imbalance_factor=100",
         "eval.local=final", "eval.finetune_epochs=0.05", "eval.every=2"]


def test_local_test_counts_are_proportional_to_the_clients_training_counts():
    # N = 100 training samples, M = 60 test samples (20 a class): t = floor(n · 60 / 100), capped at 20
    n = np.array([[30, 10, 0], [10, 40, 10]])
    t = local_test_counts(n, np.array([20, 20, 20]))
    assert t.tolist() == [[18, 6, 0], [6, 20, 6]]  # 40·0.6 = 24 > the 20 test images of class 1
    labels = np.repeat(np.arange(3), 20)
    sets = draw_local_tests(labels, t, seed=3)
    for k in range(2):
        assert len(set(sets[k].tolist())) == len(sets[k])  # drawn without replacement
        assert np.bincount(labels[sets[k]], minlength=3).tolist() == t[k].tolist()
    again = draw_local_tests(labels, t, seed=3)
    assert all((a == b).all() for a, b in zip(sets, again))
    assert not (draw_local_tests(labels, t, seed=4)[0] == sets[0]).all()


def test_local_metrics_are_the_hand_computed_means():
    # 3 classes: class 0 many-shot (200), 1 medium (50), 2 few (5) by the count rule
    train_counts = np.array([200, 50, 5])
    total = np.array([[8, 2, 0], [2, 2, 4], [0, 0, 0]])  # client 2 has no local test sample: left out
    correct = np.array([[6, 1, 0], [2, 0, 1], [0, 0, 0]])
    m = local_metrics(correct, total, train_counts)
    assert m["local_accuracy"] == pytest.approx((7 / 10 + 3 / 8) / 2)
    assert m["local_accuracy_weighted"] == pytest.approx(10 / 18)
    assert m["local_many"] == pytest.approx((6 / 8 + 2 / 2) / 2)
    assert m["local_medium"] == pytest.approx((1 / 2 + 0 / 2) / 2)
    assert m["local_few"] == pytest.approx(1 / 4)  # only client 1 holds a few-shot test sample
    assert m["local_clients"] == 2 and m["local_per_client"][2] is None


@pytest.fixture(scope="module")
def inprocess_local(tmp_path_factory):
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    path = tmp_path_factory.mktemp("local") / "run"
    return path, run_inprocess(load_config(None, LOCAL), str(path))


@needs_fashion
def test_local_accuracy_is_in_the_summary_and_the_local_test_sets_in_partition_json(inprocess_local):
    path, summary = inprocess_local
    part = json.loads((path / "partition.json").read_text())
    counts = np.array(part["local_test_class_counts"])
    assert counts.tolist() == local_test_counts(np.array(part["client_class_counts"]),
                                                np.array(part["test_class_counts"])).tolist()
    assert [len(i) for i in part["local_test_indices"]] == counts.sum(1).tolist()
    per_client = summary["local_per_client"]
    assert summary["local_clients"] == 4 and summary["local_accuracy"] == pytest.approx(np.mean(per_client))
    assert len(set(per_client)) > 1  # the clients' own test sets tell their models apart
    last = json.loads((path / "metrics.jsonl").read_text().splitlines()[-1])
    assert last["local_accuracy"] == summary["local_accuracy"]


@pytest.mark.slow
@pytest.mark.heavy
@needs_fashion
def test_fused_engine_gives_the_in_process_local_accuracy(inprocess_local, tmp_path):
    from fedlt.federation.fused import run_fused

    torch.set_num_threads(1)
    fused = run_fused(load_config(None, LOCAL + ["federation.engine=fused"]), str(tmp_path / "fused"))
    assert fused["local_accuracy"] == pytest.approx(inprocess_local[1]["local_accuracy"], abs=0.01)


@needs_fashion
def test_resumed_run_gives_the_same_local_accuracy(tmp_path, monkeypatch):
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    first, again = resumed_equals_uninterrupted(tmp_path, monkeypatch, lambda c, p: run_inprocess(c, str(p)),
                                                load_config(None, LOCAL))
    assert again["local_per_client"] == first["local_per_client"]
    assert again["local_accuracy"] == first["local_accuracy"] and again["local_few"] == first["local_few"]


@pytest.mark.slow
@pytest.mark.heavy
@needs_fashion
def test_flower_engine_gives_the_in_process_local_accuracy(inprocess_local, tmp_path):
    from fedlt.federation.runner import run_federated

    flower = run_federated(load_config(None, LOCAL), str(tmp_path / "flower"))
    assert flower["local_per_client"] == pytest.approx(inprocess_local[1]["local_per_client"], abs=1e-6)
