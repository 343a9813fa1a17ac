"""The one signature of a zoo loss: ``LOSSES.get(name)(class_counts, **options)`` builds ``loss(logits, targets)``."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from fedlt.objectives import LossObjective
from fedlt.train import Objective


class Loss(Protocol):
    """The loss of one batch from the model's output: ``loss(logits, targets) -> scalar`` (batch mean)."""

    def __call__(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor: ...


class LossFactory(Protocol):
    """What ``LOSSES`` holds: ``factory(class_counts, **options) -> Loss``. ``class_counts`` (C,) are the
    training counts the loss is built for (the pooled set centrally, the client's own on a client); the
    options are the keyword arguments the entry's ``Options`` model (``LOSSES.options(name)``) declares."""

    def __call__(self, class_counts: torch.Tensor, **options: Any) -> Loss: ...


def kl_div_sum(log_q: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """Σ p·(log p − log q), 0·log 0 = 0: ``F.kl_div(log_q, p, reduction="sum")`` in the same ops as its kernel
    (xlogy(p, p) − p·log q), written out because ``torch.func.vmap`` has no batching rule for ``aten::kl_div``
    and would loop over the clients of a fused step."""
    return (torch.xlogy(p, p) - p * log_q).sum()


def loss_objective(loss: Loss) -> Objective:
    """The training objective ``loss(model(x), y)`` of a loss (a :class:`fedlt.objectives.LossObjective`: the
    fused engine computes a group's in one call where the loss is a zoo factory's ``functools.partial``)."""
    return LossObjective(loss)
