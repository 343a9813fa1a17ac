"""NCL client: NCL's nested individual learning + nested balanced online distillation (Li et al., CVPR 2022;
Bazinga699/NCL ``lib/loss/loss.py`` ``NIL_NBOD``, see :mod:`fedlt.losses.ncl`) as the local objective of
every expert of a multi-expert model (``model.name=*_experts``), with the balanced-softmax shift log n_c of
the client's own class counts (a class absent from the client counts as 1, shift 0), under any strategy.

Only the loss terms are federated: NCL's MoCo feature enhancement needs a momentum key encoder and a queue of
keys kept across steps, which a stateless client of one round does not hold (the centralized method
``centralized.method=ncl`` has it). ``client.hard_categories`` (None: 30 % of the classes), λ and λ_h as there.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.losses.ncl import log_counts, nil_nbod_loss
from fedlt.models.experts import require_experts
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData


@CLIENTS.register("ncl")
class NCLClient(ClientMethod):
    class Options(ClientMethod.Options):
        hard_categories: int | None = Field(None, gt=0, description="k hard categories per sample "
                                            "(None: round(0.3·C), the official 30 of CIFAR-100)")
        distill_weight: float = Field(0.6, ge=0, description="λ of NBOD on all categories")
        distill_weight_hard: float = Field(0.6, ge=0, description="λ_h of NBOD on the hard categories")
        ce_ratio: float = Field(1.0, ge=0, description="weight of NIL's balanced CE on all categories")
        hard_ratio: float = Field(1.0, ge=0, description="weight of NIL's balanced CE on the hard categories")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_experts(cfg, "client method ncl")

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        o = self.opts
        log_n = log_counts(torch.as_tensor(data.class_counts)).to(data.images.device)
        k = o.hard_categories or max(1, round(0.3 * data.num_classes))
        return lambda m, x, y: nil_nbod_loss(m.expert_logits(x), y, log_n, k, o.distill_weight,
                                             o.distill_weight_hard, o.ce_ratio, o.hard_ratio)
