"""Federated long-tail methods: client objectives on hand-written numbers and one Flower simulation per
strategy on tiny data (CIFAR-10 JPEG subset, 4 clients, 2 rounds, 2 local steps)."""

from __future__ import annotations

import collections
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fedlt.config import load_config

CIFAR_JPEG = Path(__file__).resolve().parents[1] / "../shared/data/cifar10-jpeg"
if not CIFAR_JPEG.is_dir():
    CIFAR_JPEG = Path("/work/shared/data/cifar10-jpeg")


# --------------------------------------------------------------------------- tiny federated runs
@pytest.fixture(scope="module")
def tiny_lists(tmp_path_factory):
    if not (CIFAR_JPEG / "train.txt").is_file():
        pytest.skip("no CIFAR-10 JPEG copy")
    root = tmp_path_factory.mktemp("tiny")
    for split, per_class in (("train", lambda c: int(40 * 0.1 ** (c / 9))), ("test", lambda c: 10)):
        by = collections.defaultdict(list)
        for line in (CIFAR_JPEG / f"{split}.txt").read_text().splitlines():
            if line.strip():
                by[int(line.split()[-1])].append(line)
        lines = [l for c in range(10) for l in by[c][:per_class(c)]]
        (root / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return root


def tiny_config(lists: Path, *overrides: str) -> dict:
    base = [f"data.name=cifar10_files", f"data.root={CIFAR_JPEG}", f"data.train_list={lists / 'train.txt'}",
            f"data.test_list={lists / 'test.txt'}", "data.profile=none", "partition.num_clients=4",
            "partition.min_size=2", "federation.rounds=2", "federation.fraction=0.5", "train.local_steps=2",
            "model.name=small_cnn", "mode=federated", "eval.batch_size=256"]
    return load_config(None, base + list(overrides))


def simulate(cfg: dict, path: Path) -> tuple[dict, list[dict]]:
    torch.set_num_threads(1)
    from fedlt.federation.runner import run_federated

    summary = run_federated(cfg, str(path))
    rows = [json.loads(l) for l in (path / "metrics.jsonl").read_text().splitlines() if l.strip()]
    return summary, rows


# --------------------------------------------------------------------------- GBME
def test_gbme_joint_loss_by_hand():
    from clients.gbme import gbme_loss

    z = torch.tensor([[[1.0, 0.0]], [[0.0, 2.0]]])  # M=2, N=1, C=2
    log_pi = torch.log(torch.tensor([0.8, 0.2]))
    y = torch.tensor([0])
    expected = sum(-math.log(math.exp(a + math.log(0.8)) / (math.exp(a + math.log(0.8)) + math.exp(b + math.log(0.2))))
                   for a, b in ((1.0, 0.0), (0.0, 2.0)))
    assert gbme_loss(z, y, log_pi).item() == pytest.approx(expected, rel=1e-5)


def test_gbme_expert_phase_freezes_other_branches():
    from clients.gbme import GBMEClient
    from fedlt.models.experts import small_cnn_experts
    from fedlt.train import TensorData

    cfg = load_config(None, ["strategy.name=gbme", "model.name=small_cnn_experts"])
    model = small_cnn_experts(3, 1, num_experts=3)
    data = TensorData(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.tensor([0, 1, 2, 0]), torch.zeros(1),
                      torch.ones(1), 3)
    obj = GBMEClient(cfg).objective(model, data, {"log-prior": [-1.0, -1.0, -1.0], "expert": 1})
    assert [any(p.requires_grad for p in e.parameters()) for e in model.experts] == [False, True, False]
    assert all(p.requires_grad for p in model.stem.parameters())
    x = torch.randn(4, 1, 28, 28)
    loss = obj(model, x, data.labels)
    z1 = model.experts[1](model.stem(x))
    assert loss.item() == pytest.approx(F.cross_entropy(z1 - 1.0, data.labels).item(), rel=1e-5)  # no ×5 (D4)


@pytest.fixture(scope="module")
def gbme_run(tiny_lists, tmp_path_factory):
    cfg = tiny_config(tiny_lists, "strategy.name=gbme", "model.name=small_cnn_experts", "strategy.joint_fraction=0.5")
    return simulate(cfg, tmp_path_factory.mktemp("gbme") / "run")


def test_gbme_simulation(gbme_run):
    summary, rows = gbme_run
    assert summary["client"] == "gbme"
    pi_hat = np.asarray(summary["pi_hat"])
    assert pi_hat.shape == (10,) and pi_hat.sum() == pytest.approx(1) and (pi_hat > 0).all()
    assert summary["prior_l1"] >= 0 and summary["prior_kl"] >= 0
    assert min(summary["estimated_counts"]) >= 5
    groups = summary["expert_groups"]
    assert len(groups) == 3 and sorted(k for g in groups for k in g) == [0, 1, 2, 3]
    scores = summary["client_scores"]
    order = [k for g in groups for k in g]
    assert all(scores[a] >= scores[b] for a, b in zip(order, order[1:]))
    assert len(summary["expert_accuracy"]) == 3 and all(0 <= a <= 1 for a in summary["expert_accuracy"])
    assert isinstance(rows[0]["clients"][0], int)  # round 1: joint phase, one cohort
    assert len(rows[1]["clients"]) == 3 and all(len(c) == len(set(c)) == 2 for c in rows[1]["clients"])  # expert phase
