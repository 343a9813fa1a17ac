"""FedROD and FedBABU (clients/fedrod.py, clients/fedbabu.py, strategies/fedrod.py, strategies/fedbabu.py):
each formula on hand-made inputs, and short in-process runs with the local evaluation."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flwr.app import Message, MetricRecord, RecordDict
from torch import nn

from clients.fedbabu import FedBABUClient
from clients.fedrod import (
    PERSONAL,
    FedRODClient,
    PersonalisedModel,
    fedrod_loss,
    fedrod_objective,
)
from conftest import needs_fashion
from fedlt.config import load_config
from fedlt.federation.records import to_arrays, to_state
from fedlt.losses import balanced_softmax_loss
from fedlt.models.base import NormedLinear, SplitModel
from fedlt.objectives import LossObjective
from fedlt.train import TensorData
from strategies.fedbabu import FedBABU
from strategies.fedrod import FedROD


def tiny_model(seed: int = 0) -> SplitModel:
    torch.manual_seed(seed)
    return SplitModel(nn.Sequential(nn.Flatten(), nn.Linear(4, 3), nn.ReLU()), nn.Linear(3, 3), 3)


def tiny_data(n: int = 12) -> TensorData:
    g = torch.Generator().manual_seed(1)
    images = torch.randint(0, 255, (n, 1, 2, 2), generator=g, dtype=torch.uint8)
    labels = torch.tensor([0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 0, 1][:n])  # class 2 absent
    return TensorData(images, labels, torch.tensor([0.5]), torch.tensor([0.25]), 3)


def test_balanced_softmax_loss_by_hand():
    # z + log n = [1 + ln 3, 2 + ln 1, −∞]: L = −log(3e / (3e + e²)) = log(1 + e/3)
    loss = balanced_softmax_loss(torch.tensor([[1.0, 2.0, 0.0]]), torch.tensor([0]),
                                 torch.log(torch.tensor([3.0, 1.0, 0.0])))  # FedROD's: log n of its counts
    assert loss.item() == pytest.approx(math.log(1 + math.e / 3), rel=1e-6)


@pytest.mark.parametrize("form", ["module", "linear-heads"])
def test_fedrod_loss_sends_bsm_to_body_and_generic_head_and_ce_of_the_sum_to_the_personal_head(form):
    """PFLlib's clientrod.py by hand: BSM on body + g, then CE of g.detach() + p(z.detach()) on p — in both forms
    the client trains on (fedrod_loss of the modules; the fused engine's loss of the linear heads' weights)."""
    model, counts = tiny_model(), torch.tensor([6, 4, 0])
    model.personal = nn.Linear(3, 3)
    x, y = torch.randn(5, 1, 2, 2), torch.tensor([0, 1, 0, 1, 1])
    ref = copy.deepcopy(model)
    objective = fedrod_objective(model, counts)
    assert isinstance(objective, LossObjective) and objective.output == "features"  # linear heads: weights
    log_n = torch.log(counts.float())
    loss = objective(model, x, y) if form == "linear-heads" else fedrod_loss(model, x, y, log_n=log_n)
    loss.backward()
    # by hand: the body and g see only L_BSM; p only CE(g.detach() + p(z.detach()))
    z = ref.features(x)
    g = ref.classifier(z)
    bsm = F.cross_entropy(g + torch.log(counts.float()), y)
    bsm.backward(retain_graph=True)
    personal = F.cross_entropy(g.detach() + ref.personal(z.detach()), y)
    personal.backward()
    assert loss.item() == pytest.approx((bsm + personal).item(), rel=1e-6)
    for (n, p), q in zip(model.named_parameters(), ref.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-6), n
    assert ref.personal.weight.grad.abs().sum() > 0 and ref.features[1].weight.grad.abs().sum() > 0
    x1 = torch.randn(2, 1, 2, 2)
    assert torch.allclose(PersonalisedModel(model, model.personal)(x1),
                          model(x1) + model.personal(model.features(x1)))


def test_fedrod_objective_of_a_cosine_classifier_is_the_module_form():
    model = SplitModel(nn.Flatten(), NormedLinear(4, 3), 4)
    model.personal = copy.deepcopy(model.classifier)
    objective = fedrod_objective(model, torch.tensor([2, 1, 1]))
    assert not isinstance(objective, LossObjective)
    x, y = torch.randn(3, 1, 2, 2), torch.tensor([0, 1, 2])
    assert objective(model, x, y).item() == pytest.approx(
        fedrod_loss(model, x, y, log_n=torch.log(torch.tensor([2.0, 1.0, 1.0]))).item())


def test_fedrod_client_trains_its_personal_head_from_the_record_and_returns_it():
    cfg = load_config(None, ["mode=federated", "strategy.name=fedrod", "train.local_steps=2", "train.batch_size=4"])
    client, model, data = FedRODClient(cfg), tiny_model(), tiny_data()
    head = {"weight": torch.full((3, 3), 0.5), "bias": torch.zeros(3)}
    out = client.fit(model, data, {"lr": 0.1, "records": {PERSONAL: head}}, torch.Generator().manual_seed(0),
                     augment=None)
    assert set(out.state) == set(tiny_model().state_dict())  # the global part only
    sent = out.extra_arrays[PERSONAL]
    assert not torch.equal(sent["weight"], head["weight"])  # trained from the received head ...
    assert (sent["weight"] - head["weight"]).abs().max() < 1.0  # ... not from a fresh one
    personal = client.personalise(model, data, {"records": {PERSONAL: sent}})
    assert torch.equal(personal.personal.weight, sent["weight"])


def reply(pid: int, state: dict, head: dict | None, n: int = 10) -> Message:
    content = RecordDict({"arrays": to_arrays(state), "metrics": MetricRecord({"partition-id": pid,
                                                                               "num-examples": n})})
    if head is not None:
        content[PERSONAL] = to_arrays(head)
    msg = Message(content=content, dst_node_id=1, message_type="train")
    return Message(content=content, reply_to=msg)


def test_fedrod_server_keeps_each_clients_head_out_of_the_average(message_identity):
    cfg = load_config(None, ["mode=federated", "strategy.name=fedrod", "partition.num_clients=2"])
    s = FedROD(cfg, 3)
    s.bind({0: 10, 1: 11})
    init = tiny_model().state_dict()
    s.setup(None, to_arrays(init))
    assert torch.equal(s.personal[1]["weight"], init["classifier.weight"])
    assert set(s.client_records(1, 1)[PERSONAL].keys()) == {"weight", "bias"}
    a, b = tiny_model(1).state_dict(), tiny_model(2).state_dict()
    head0 = {"weight": torch.ones(3, 3), "bias": torch.zeros(3)}
    arrays, _ = s.aggregate_checked(1, [reply(0, a, head0), reply(1, b, None, n=30)])
    avg = to_state(arrays)
    assert set(avg) == set(init) and torch.allclose(avg["classifier.weight"],
                                                    0.25 * a["classifier.weight"] + 0.75 * b["classifier.weight"])
    assert torch.equal(s.personal[0]["weight"], head0["weight"])
    assert torch.equal(s.personal[1]["weight"], init["classifier.weight"])  # client 1 sent none: unchanged
    again = FedROD(cfg, 3)
    again.load_state_dict(s.state_dict())
    assert torch.equal(again.personal[0]["weight"], head0["weight"])


def test_fedbabu_trains_the_body_under_the_initial_head_and_the_server_keeps_it(message_identity):
    cfg = load_config(None, ["mode=federated", "strategy.name=fedbabu", "train.local_steps=3",
                             "train.batch_size=4", "train.weight_decay=0.01", "train.momentum=0.9"])
    model, data = tiny_model(), tiny_data()
    before = copy.deepcopy(model.state_dict())
    out = FedBABUClient(cfg).fit(model, data, {"lr": 0.1}, torch.Generator().manual_seed(0), augment=None)
    assert torch.equal(out.state["classifier.weight"], before["classifier.weight"])
    assert torch.equal(out.state["classifier.bias"], before["classifier.bias"])
    assert not torch.equal(out.state["features.1.weight"], before["features.1.weight"])
    s = FedBABU(cfg, 3)
    s.global_arrays = to_arrays(before)
    other = {**tiny_model(3).state_dict()}  # a reply whose head differs: the server keeps the global head
    arrays, _ = s.aggregate_checked(1, [reply(0, out.state, None), reply(1, other, None)])
    avg = to_state(arrays)
    assert torch.equal(avg["classifier.weight"], before["classifier.weight"])
    assert torch.allclose(avg["features.1.weight"], (out.state["features.1.weight"] + other["features.1.weight"]) / 2)


@pytest.mark.parametrize("weighting", ["uniform", "examples"])
def test_fedbabu_server_mean_is_the_official_plain_mean_or_weighted_by_examples(weighting, message_identity):
    """jhoon-oh/FedBABU ``main_fed.py``: ``w_glob[k] += w_local[k]`` over the m clients, then ``/ m``, whatever
    their sizes; ``strategy.weighting=examples`` weights by ``num-examples`` (10 and 30 here)."""
    cfg = load_config(None, ["mode=federated", "strategy.name=fedbabu", f"strategy.weighting={weighting}"])
    s = FedBABU(cfg, 3)
    s.global_arrays = to_arrays(tiny_model().state_dict())
    a, b = tiny_model(1).state_dict(), tiny_model(2).state_dict()
    avg = to_state(s.aggregate_checked(1, [reply(0, a, None, n=10), reply(1, b, None, n=30)])[0])
    share = 0.5 if weighting == "uniform" else 0.25
    expected = share * a["features.1.weight"] + (1 - share) * b["features.1.weight"]
    assert torch.allclose(avg["features.1.weight"], expected)


@pytest.mark.parametrize("part", ["head", "full"])
def test_fedbabu_personalisation_fine_tunes_the_head_or_the_whole_model(part):
    cfg = load_config(None, ["mode=federated", "strategy.name=fedbabu", f"client.finetune={part}",
                             "eval.finetune_epochs=2", "train.batch_size=4"])
    model = tiny_model()
    before = copy.deepcopy(model.state_dict())
    personal = FedBABUClient(cfg).personalise(model, tiny_data(), {"lr": 0.1, "partition-id": 0})
    after = personal.state_dict()
    assert not torch.equal(after["classifier.weight"], before["classifier.weight"])
    assert torch.equal(after["features.1.weight"], before["features.1.weight"]) == (part == "head")


def official_fedbabu_personalisation(net: nn.Module, images: torch.Tensor, labels: torch.Tensor, lr: float,
                                     momentum: float, epochs: int) -> nn.Module:
    """jhoon-oh/FedBABU ``analysis.ipynb``: ``SGD([{'params': body_params, 'lr': args.lr}, {'params': head_params,
    'lr': args.lr}], momentum=args.momentum)`` (no weight decay; body = names without 'linear'), then
    ``personalization_epoch`` epochs of ``zero_grad``, cross-entropy, ``backward``, ``step`` in train mode. One
    batch an epoch here (the whole local set), so the batch order cannot differ."""
    body = [p for name, p in net.named_parameters() if not name.startswith("classifier")]
    head = [p for name, p in net.named_parameters() if name.startswith("classifier")]
    optimizer = torch.optim.SGD([{"params": body, "lr": lr}, {"params": head, "lr": lr}], momentum=momentum)
    net.train()
    for _ in range(epochs):
        net.zero_grad()
        F.cross_entropy(net(images), labels).backward()
        optimizer.step()
    return net


def test_fedbabu_personalisation_is_the_official_fine_tuning():
    """The default: the whole model at lr 1e-3 (not the round's lr), the training momentum, no weight decay
    (train.weight_decay is set and must not act), 5 epochs."""
    cfg = load_config(None, ["mode=federated", "strategy.name=fedbabu", "eval.finetune_epochs=5",
                             "train.batch_size=12", "train.momentum=0.9", "train.weight_decay=0.1",
                             "data.crop_padding=0", "data.flip=false"])
    assert (cfg.client.finetune, cfg.client.finetune_lr) == ("full", 1e-3)
    data = tiny_data()
    personal = FedBABUClient(cfg).personalise(tiny_model(), data, {"lr": 0.1, "partition-id": 0})
    x = (data.images.float() / 255 - data.mean.view(1, -1, 1, 1)) / data.std.view(1, -1, 1, 1)
    official = official_fedbabu_personalisation(tiny_model(), x, data.labels, 1e-3, 0.9, 5)
    for key, value in official.state_dict().items():
        assert torch.allclose(personal.state_dict()[key], value, atol=1e-6), key


@needs_fashion
@pytest.mark.parametrize("method", ["fedrod", "fedbabu"])
def test_short_run_reports_global_and_local_accuracy(method, tmp_path):
    from fedlt.federation.inprocess import run_inprocess

    torch.set_num_threads(1)
    cfg = load_config(None, ["mode=federated", "partition.num_clients=2", "federation.rounds=2",
                             "federation.fraction=1", "train.local_steps=2", "train.batch_size=32",
                             "model.name=small_cnn", f"strategy.name={method}", "eval.local=final",
                             "eval.finetune_epochs=0.02", "eval.every=2"])
    s = run_inprocess(cfg, str(tmp_path / "run"))
    assert s["method"] == method and 0 <= s["accuracy"] <= 1
    assert s["local_clients"] == 2 and s["local_accuracy"] == pytest.approx(np.mean(s["local_per_client"]))
