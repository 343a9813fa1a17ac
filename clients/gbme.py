"""GBME client (Zeng et al., "Global Balanced Experts for Federated Long-Tailed Learning", ICCV 2023; official
code Spinozaaa/Federated-Long-tailed-Learning): Balanced Softmax with the server's estimated global prior π̂
on every expert of a multi-expert model (:class:`~fedlt.models.experts.MultiExpertModel`).

- joint phase (config ``expert`` = -1): L = Σ_m CE(z_m + log π̂, y), all experts and the stem train;
- expert phase (``expert`` = m): L = CE(z_m + log π̂, y); the other experts' branches are frozen (no
  gradient, no weight decay) but run without gradient, so that their BatchNorm statistics follow the batch as
  in the release (``trainer.py`` ``_train_epoch``: ``model.train()`` and the whole model's forward, every
  expert of ``use_experts``); the shared stem trains.
The loss has no extra multiplier (the official release multiplies the expert-phase loss by 5, which the
paper does not state). The server sends ``log-prior`` (C floats) and ``expert``.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.losses import balanced_softmax_loss
from fedlt.models.experts import require_experts
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData


def gbme_loss(expert_logits: torch.Tensor, y: torch.Tensor, log_pi: torch.Tensor) -> torch.Tensor:
    """Σ_m CE(z_m + log π̂, y) over an (M, N, C) stack of expert logits (batch mean per expert)."""
    return sum(balanced_softmax_loss(z, y, log_pi) for z in expert_logits)


@CLIENTS.register("gbme")
class GBMEClient(ClientMethod):
    strategy = "gbme"

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_experts(cfg, "client method gbme")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        if not hasattr(model, "expert_forward"):
            raise TypeError("the gbme client needs a multi-expert model (e.g. model.name=resnet32_experts)")
        log_pi = torch.as_tensor(list(config["log-prior"]), dtype=torch.float32, device=data.images.device)
        expert = int(config.get("expert", -1))
        if expert < 0:
            model.train_only_expert(None)
            return LossObjective(partial(gbme_loss, log_pi=log_pi), output="expert_logits")
        model.train_only_expert(expert)
        return LossObjective(partial(balanced_softmax_loss, log_pi=log_pi), output="expert_forward",
                             args=(expert, True))
