"""FedProx client (Li et al., MLSys 2020): F_k(w) + (μ/2)·‖w − w_t‖², the squared norm of the whole
difference to the round's global weights w_t (not Flower's docstring sum of unsquared layer norms)."""

from __future__ import annotations

import torch
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData, cross_entropy_objective


def proximal_term(model: nn.Module, global_params: list[torch.Tensor]) -> torch.Tensor:
    """Σ_layers ‖w − w_t‖² over the trainable parameters."""
    return sum(((p - g) ** 2).sum() for p, g in zip((p for p in model.parameters() if p.requires_grad),
                                                     global_params))


@CLIENTS.register("fedprox")
class FedProxClient(ClientMethod):
    options = {"mu": 0.01}

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        mu = float(config.get("proximal-mu", self.opts["mu"]))
        global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cross_entropy_objective(m, x, y) + 0.5 * mu * proximal_term(m, global_params)

        return loss
