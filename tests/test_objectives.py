"""Objectives with a visible structure (fedlt/objectives.py): each equals the plain objective it replaces, by
hand, and splits into the parts the fused engine groups clients by."""

from __future__ import annotations

from functools import partial

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from clients.fedlc import fedlc_loss
from fedlt.losses import cross_entropy_loss, loss_objective
from fedlt.objectives import LossObjective, ProximalObjective, loss_parts
from fedlt.registry import LOSSES
from fedlt.train import cross_entropy_objective


def test_proximal_objective_by_hand():
    """FedProx: CE(Wx + b, y) + ½μ(‖W − W⁰‖² + ‖b − b⁰‖²) over the trainable parameters only."""
    model = nn.Linear(2, 3)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        model.bias.zero_()
    objective = ProximalObjective.around(model, cross_entropy_objective, mu=0.5)
    x, y = torch.tensor([[1.0, 2.0]]), torch.tensor([2])
    assert objective(model, x, y).item() == pytest.approx(F.cross_entropy(model(x), y).item())  # at w⁰: CE
    with torch.no_grad():
        model.weight[0, 0] += 1.0  # ‖ΔW‖² = 1
        model.bias += 2.0  # ‖Δb‖² = 3·4 = 12
    # x = (1, 2): logits (2+2, 2+2, 3+2) = (4, 4, 5), CE of class 2 = log(e^4 + e^4 + e^5) − 5
    ce = torch.log(torch.tensor(2 * torch.e ** 4 + torch.e ** 5)).item() - 5
    assert objective(model, x, y).item() == pytest.approx(ce + 0.25 * 13, rel=1e-6)
    model.bias.requires_grad_(False)  # a frozen parameter is not in the term
    frozen = ProximalObjective(cross_entropy_objective, 0.5, objective.anchor[:1])
    assert frozen(model, x, y).item() == pytest.approx(ce + 0.25 * 1, rel=1e-6)


def test_loss_objective_takes_the_named_output():
    class TwoOutputs(nn.Module):
        def forward(self, x):
            return x

        def expert_forward(self, x, m):
            return x * (m + 1)

    x, y = torch.tensor([[0.0, 1.0]]), torch.tensor([1])
    assert LossObjective(cross_entropy_loss)(TwoOutputs(), x, y) == F.cross_entropy(x, y)
    assert LossObjective(cross_entropy_loss, "expert_forward", (2,))(TwoOutputs(), x, y) == F.cross_entropy(3 * x, y)
    with pytest.raises(ValueError, match="must be one of"):
        LossObjective(cross_entropy_loss, "classifier")


def test_loss_objective_passes_the_named_parameters():
    """A loss of the features and of heads of its own: L = CE(W h + b, y) with W, b the model's parameters."""
    model = nn.Sequential()
    model.features = nn.Identity()
    model.head = nn.Linear(2, 3)
    x, y = torch.tensor([[1.0, -1.0]]), torch.tensor([1])
    objective = LossObjective(lambda h, t, w, b: F.cross_entropy(F.linear(h, w, b), t), "features",
                              params=("head.weight", "head.bias"))
    loss = objective(model, x, y)
    assert loss == F.cross_entropy(model.head(x), y)
    loss.backward()
    assert model.head.weight.grad is not None and model.head.bias.grad is not None


def test_loss_parts_group_by_function_and_static_arguments():
    a = loss_parts(partial(fedlc_loss, counts=torch.tensor([5.0, 1.0]), tau=1.0))
    b = loss_parts(partial(fedlc_loss, counts=torch.tensor([2.0, 7.0]), tau=1.0))
    assert a.function is fedlc_loss and a.static == (("tau", 1.0),) and a.names == ("counts",)
    assert a.key == b.key  # other counts: one vmapped call
    assert loss_parts(partial(fedlc_loss, counts=torch.tensor([5.0, 1.0]), tau=0.5)).key != a.key
    assert loss_parts(partial(fedlc_loss, counts=torch.tensor([5.0, 1.0, 1.0]), tau=1.0)).key != a.key
    z, y = torch.randn(4, 2), torch.tensor([0, 1, 1, 0])
    assert torch.equal(a.per_sample_call()(z, y, torch.tensor([2.0, 7.0])),
                       fedlc_loss(z, y, torch.tensor([2.0, 7.0]), 1.0))
    assert loss_parts(cross_entropy_loss).key == (cross_entropy_loss, (), (), ())
    counts = torch.tensor([1.0, 2.0])
    assert loss_parts(lambda z, y: fedlc_loss(z, y, counts, 1.0)) is None  # a closure: its tensors are hidden
    assert loss_parts(partial(fedlc_loss, counts=counts, tau=[1.0])) is None  # a list: not compared
    assert loss_parts(partial(F.cross_entropy, weight=counts)).function is F.cross_entropy


@pytest.mark.parametrize("name", ["la", "balanced_softmax", "reweight", "cb", "ldam", "focal", "ce", "bal_bce"])
def test_zoo_losses_split(name):
    """Zoo factories return partials of module functions: a local_loss client of each fuses as one call."""
    counts = torch.tensor([50, 10, 1])
    parts = loss_parts(loss_objective(LOSSES.get(name)(counts)).loss)
    assert parts is not None and parts.key == loss_parts(LOSSES.get(name)(torch.tensor([3, 9, 27]))).key
