"""FedProx client (Li et al., MLSys 2020): F_k(w) + (μ/2)·‖w − w_t‖², the squared norm of the whole
difference to the round's global weights w_t (not Flower's docstring sum of unsquared layer norms), as
:class:`fedlt.objectives.ProximalObjective`."""

from __future__ import annotations

from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.objectives import ProximalObjective
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData, cross_entropy_objective


@CLIENTS.register("fedprox")
class FedProxClient(ClientMethod):
    class Options(ClientMethod.Options):
        mu: float = Field(0.01, ge=0, description="proximal weight μ (a FedProx strategy sends its own)")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        mu = float(config.get("proximal-mu", self.opts.mu))
        return ProximalObjective.around(model, cross_entropy_objective, mu)  # anchored at the global weights
