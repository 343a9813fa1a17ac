"""Federated LFME (strategies/lfme.py, clients/lfme.py): the part-wise average and group accuracies by hand, the
client's student loss on a hand-made case, and one in-process run whose phases switch at strategy.expert_rounds."""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_federated_methods import simulate, tiny_config, tiny_lists  # noqa: F401  (tiny_lists: a fixture)
from torch import nn

import clients.lfme as client_module
from clients.lfme import LFMEClient
from fedlt.centralized.lfme import LFMEModel
from fedlt.config import load_config
from fedlt.data.augment import normalize
from fedlt.errors import FedLTError
from fedlt.train import TensorData
from strategies.lfme import group_accuracy, weighted_average


def test_weighted_average_by_part():
    glob = {"student.w": torch.tensor([0.0]), "experts.0.w": torch.tensor([0.0]), "experts.1.w": torch.tensor([5.0]),
            "experts.0.bn.num_batches_tracked": torch.tensor(0)}
    a = {"student.w": torch.tensor([2.0]), "experts.0.w": torch.tensor([1.0]), "experts.1.w": torch.tensor([9.0]),
         "experts.0.bn.num_batches_tracked": torch.tensor(3)}
    b = {"student.w": torch.tensor([4.0]), "experts.0.w": torch.tensor([4.0]), "experts.1.w": torch.tensor([7.0]),
         "experts.0.bn.num_batches_tracked": torch.tensor(6)}
    weights = [{"n-student": 1, "n-expert0": 2, "n-expert1": 0}, {"n-student": 3, "n-expert0": 1, "n-expert1": 0}]
    out = weighted_average(glob, [a, b], weights)
    assert out["student.w"].item() == pytest.approx((2 + 3 * 4) / 4)
    assert out["experts.0.w"].item() == pytest.approx((2 * 1 + 4) / 3)
    assert out["experts.1.w"].item() == 5.0  # no client trained expert 1: the global value
    assert out["experts.0.bn.num_batches_tracked"].item() == 4 and not out[
        "experts.0.bn.num_batches_tracked"].is_floating_point()  # (2·3 + 6)/3


def test_group_accuracy_is_class_mean_over_present_classes():
    correct, count = np.array([8, 1, 0, 3]), np.array([10, 2, 0, 4])
    assert group_accuracy(correct, count, [[0, 1], [2], [3]]) == pytest.approx([(0.8 + 0.5) / 2, 0.0, 0.75])


def tiny_lfme_model() -> LFMEModel:
    torch.manual_seed(0)
    student = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
    experts = [nn.Sequential(nn.Flatten(), nn.Linear(4, 2)), nn.Sequential(nn.Flatten(), nn.Linear(4, 1))]
    return LFMEModel(student, experts, [[0, 1], [2]])


def test_client_student_loss_equals_its_formula(monkeypatch):
    cfg = load_config(None, ["mode=federated", "strategy.name=lfme", "federation.rounds=4",
                             "strategy.expert_rounds=2", "train.local_steps=1", "train.batch_size=8", "device=cpu"])
    model = tiny_lfme_model()
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (5, 1, 2, 2), generator=g, dtype=torch.uint8)
    y = torch.tensor([0, 2, 1, 0, 2])
    data = TensorData(images, y, torch.tensor([0.5]), torch.tensor([0.25]), 3)
    x = normalize(images, data.mean, data.std)
    with torch.no_grad():
        z, e0, e1 = model.student(x), model.experts[0](x), model.experts[1](x)
    lambdas = [1.0, 0.5]

    def formula(v: torch.Tensor) -> float:
        zz = z * v[:, None]
        ce = -F.log_softmax(zz, 1)[torch.arange(5), y].mean()
        kd = 0.0
        for lam, cls, t in zip(lambdas, ([0, 1], [2]), (e0, e1)):
            p, log_q = F.softmax(t / 2, 1), F.log_softmax(zz[:, cls] / 2, 1)
            kd += lam * (p * (p.log() - log_q)).sum() / 5
        return float(ce + kd)

    config = {"lr": 0.0, "lfme-phase": 2, "lfme-lambdas": lambdas, "lfme-temperature": 2.0, "lfme-curriculum": False,
              "lfme-round": 1, "lfme-rounds": 2}
    client = LFMEClient(cfg)
    counts, metrics = client.train_student(model, data, config, torch.Generator().manual_seed(0), None)
    assert metrics["train_loss"] == pytest.approx(formula(torch.ones(5)), rel=1e-5)
    assert counts == {"n-student": 5, "n-expert0": 0, "n-expert1": 0}

    # with the curriculum: class 0's two samples (0, 3) get their expert's confidence min–max scaled to [θ, 1],
    # θ = 10/100 from the global counts 100, 100 | 10 (group means 100 and 10); class 1 has one sample and class
    # 2's expert one output (p = 1 twice): w = 1. In round 0 the schedule gives v = w
    monkeypatch.setattr(client_module, "experiment_for",
                        lambda cfg: type("E", (), {"train_counts": np.array([100, 100, 10])})())
    p = F.softmax(e0, 1)[[0, 3], 0].numpy()
    w = np.ones(5)
    w[[0, 3]] = (p - p.min()) / (p.max() - p.min()) * (1 - 0.1) + 0.1
    config.update({"lfme-curriculum": True, "lfme-round": 0})
    _, metrics = client.train_student(model, data, config, torch.Generator().manual_seed(0), None)
    assert metrics["train_loss"] == pytest.approx(formula(torch.as_tensor(w, dtype=torch.float32)), rel=1e-5)


def test_expert_rounds_must_leave_student_rounds():
    with pytest.raises(FedLTError, match="strategy.expert_rounds"):
        load_config(None, ["mode=federated", "strategy.name=lfme", "federation.rounds=2", "strategy.expert_rounds=2"])


def test_federated_run_switches_phase(tiny_lists, tmp_path):  # noqa: F811
    cfg = tiny_config(tiny_lists, "strategy.name=lfme", "federation.rounds=3", "strategy.expert_rounds=1")
    summary, rows = simulate(cfg, tmp_path)
    initial = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert [r["round"] for r in rows] == [1, 2, 3]
    # round 1 trains only the experts: the student (the evaluated model) is the initial one, bit for bit
    assert rows[0]["loss"] == initial["loss"] and rows[0]["accuracy"] == initial["accuracy"]
    assert rows[1]["loss"] != initial["loss"]  # round 2: the student learns
    assert summary["lfme_groups"] == [[0, 1, 2, 3], [4, 5, 6], [7, 8, 9]]  # 10 classes: thirds ⌊3c/10⌋
    # round 3's weights come from the cohort's accuracies (queried before it); each λ in [0, 1]
    acc = summary["lfme_accuracy"]
    assert len(acc["student"]) == len(acc["expert"]) == 3
    assert all(0.0 <= lam <= 1.0 for lam in summary["lfme_lambdas"])
    assert all(math.isfinite(r["train_loss"]) for r in rows)
