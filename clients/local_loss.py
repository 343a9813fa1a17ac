"""Any classification loss of the zoo (``fedlt.registry.LOSSES``) as the local objective, under any strategy,
with the client's own label prior: e.g. ``client.name=local_loss client.loss=balanced_softmax`` is FedAvg
with Balanced Softmax on each client's local prior (or any other strategy with ``strategy.name=…``).

A loss is called as ``loss(logits, targets, **kw)`` with those of its parameters it declares among
``log_pi`` (log of the local prior, 1e-12 inside the log), ``counts`` / ``class_counts`` (local counts)
and ``tau`` (``client.tau``). ``client.loss=ce`` is plain cross-entropy.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.losses.logit_adjusted import log_prior
from fedlt.registry import CLIENTS, LOSSES
from fedlt.train import Objective, TensorData


def loss_kwargs(fn, counts: torch.Tensor, tau: float) -> dict:
    """The keyword arguments ``fn`` accepts among log_pi, counts, class_counts and tau."""
    available = {"log_pi": log_prior(counts), "counts": counts, "class_counts": counts, "tau": tau}
    params = inspect.signature(fn).parameters
    return {k: v for k, v in available.items() if k in params}


@CLIENTS.register("local_loss")
class LocalLossClient(ClientMethod):
    class Options(ClientMethod.Options):
        loss: str = Field("balanced_softmax", description="a loss of the zoo (ce or any registered loss)")
        tau: float = Field(1.0, ge=0, description="τ of losses that take one (logit adjustment)")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        name = self.opts.loss
        if name == "ce":
            return lambda m, x, y: F.cross_entropy(m(x).float(), y)
        fn = LOSSES.get(name)
        counts = data.class_counts.float()
        kw = {k: v.to(data.images.device) if torch.is_tensor(v) else v
              for k, v in loss_kwargs(fn, counts, self.opts.tau).items()}
        return lambda m, x, y: fn(m(x), y, **kw)
