"""FedLC client (Zhang et al., "Federated Learning with Label Distribution Skew via Logits Calibration",
ICML 2022): CE over the calibrated logits
z_c − τ·n_{k,c}^{−1/4}, with n_{k,c} the client's own count of class c floored at 1e-8 (a class the client
lacks is pushed down by 100·τ and drops out of the softmax). Not Balanced Softmax: the offset is n^{−1/4}.
As FL-bench's ``logit_calibrated_loss`` (KarhouTam/FL-bench src/client/fedlc.py: counts floored at 1e-8, the
true class kept in the denominator); τ = 1.0 by default, FL-bench's value (see strategies/fedlc.py)."""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData


def fedlc_offsets(counts: torch.Tensor, tau: float) -> torch.Tensor:
    """τ·max(n_c, 1e-8)^{−1/4}."""
    return tau * torch.clamp(torch.as_tensor(counts, dtype=torch.float32), min=1e-8) ** -0.25


def fedlc_loss(logits: torch.Tensor, y: torch.Tensor, counts: torch.Tensor, tau: float) -> torch.Tensor:
    return F.cross_entropy(logits.float() - fedlc_offsets(counts, tau).to(logits.device), y)


@CLIENTS.register("fedlc")
class FedLCClient(ClientMethod):
    class Options(ClientMethod.Options):
        tau: float = Field(1.0, ge=0, description="calibration strength τ (a FedLC strategy sends its own)")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        tau = float(config.get("fedlc-tau", self.opts.tau))
        counts = data.class_counts.to(data.images.device)
        return LossObjective(partial(fedlc_loss, counts=counts, tau=tau))
