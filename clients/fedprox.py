"""FedProx client (Li et al., MLSys 2020): F_k(w) + (μ/2)·‖w − w_t‖², the squared norm of the whole
difference to the round's global weights w_t (not Flower's docstring sum of unsquared layer norms)."""

from __future__ import annotations

import torch
from pydantic import Field
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
    class Options(ClientMethod.Options):
        mu: float = Field(0.01, ge=0, description="proximal weight μ (a FedProx strategy sends its own)")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        mu = float(config.get("proximal-mu", self.opts.mu))
        global_params = [p.detach().clone() for p in model.parameters() if p.requires_grad]

        def loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cross_entropy_objective(m, x, y) + 0.5 * mu * proximal_term(m, global_params)

        return loss
