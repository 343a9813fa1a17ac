"""A strategy plug-in in one file: clients re-balance with the server's *estimated global* prior.

Every client trains with Balanced Softmax on π̂, L = CE(z + τ·log π̂, y), where π̂ is estimated on the
server before round 1 from the clients' classifier updates (GBME's estimator, Zeng et al., ICCV 2023:
strategies/gbme/prior.py); the server aggregates by FedAvg. Register it for a run with an entry point in your package::

    [project.entry-points."fedlt.plugins"]
    global_prior_bs = "global_prior_bs"

then ``python -m fedlt.simulate strategy.name=global_prior_bs strategy.tau=1``; without installing it, name it in
``plugins=[global_prior_bs]`` with ``PYTHONPATH=$PWD/docs/examples`` (docs/plugins.md, "Run it").
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.experiment import experiment_for
from fedlt.federation.strategy import FedLTStrategy
from fedlt.registry import CLIENTS, STRATEGIES
from strategies.gbme.prior import PriorEstimate, prior_report, run_prior_estimation


@CLIENTS.register("global_prior_bs")
class GlobalPriorBSClient(ClientMethod):
    """The local objective: CE(z + τ·log π̂, y), with log π̂ and τ sent by the server each round."""

    def objective(self, model, data, config):
        log_pi = torch.as_tensor(list(config["log-prior"]), device=data.images.device)
        tau = float(config["tau"])
        return lambda m, x, y: F.cross_entropy(m(x).float() + tau * log_pi, y)


@STRATEGIES.register("global_prior_bs")
class GlobalPriorBS(FedLTStrategy):
    client = "global_prior_bs"  # `strategy.name=global_prior_bs` brings this client

    class Options(FedLTStrategy.Options):  # its keys: strategy.tau (and strategy.name)
        tau: float = Field(1.0, ge=0, description="strength τ of the global-prior adjustment")

    def __init__(self, cfg: Config, num_classes: int) -> None:
        super().__init__(cfg, num_classes)
        self.prior: PriorEstimate | None = None

    def setup(self, grid, arrays):
        """Before round 1: one CE epoch on every client from θ0, π̂ from the classifier updates."""
        self.prior, _ = run_prior_estimation(self, grid, arrays)
        return arrays

    def train_config(self, server_round: int, partition_id: int) -> dict:
        if self.prior is None:  # the estimation query itself
            return {}
        return {"log-prior": np.log(self.prior.pi_hat).tolist(), "tau": self.opts.tau}

    def summary_extras(self) -> dict:
        return prior_report(self.prior, experiment_for(self.cfg).train_counts)

    def state_dict(self) -> dict:  # saved with every checkpoint, so a resumed run keeps π̂
        return {**super().state_dict(), "prior": self.prior.state_dict()}  # tensors

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.prior = PriorEstimate.from_state(state["prior"])
