"""NCL client: NCL's nested individual learning + nested balanced online distillation (Li et al., CVPR 2022;
Bazinga699/NCL ``lib/loss/loss.py`` ``NIL_NBOD``, see :mod:`fedlt.losses.ncl`) as the local objective of
every expert of a multi-expert model (``model.name=*_experts``), with the balanced-softmax shift log n_c of
the client's own class counts (a class absent from the client counts as 1, shift 0), under any strategy.

Only the loss terms are federated: NCL's MoCo feature enhancement needs a momentum key encoder and a queue of
keys kept across steps, which a stateless client of one round does not hold (the centralized method
``centralized.method=ncl`` has it). ``client.hard_categories`` (None: 30 % of the classes), λ and λ_h as there.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.losses.ncl import NILNBODOptions, log_counts, nil_nbod_loss
from fedlt.models.experts import require_experts
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData


@CLIENTS.register("ncl")
class NCLClient(ClientMethod):
    class Options(ClientMethod.Options, NILNBODOptions):
        pass

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_experts(cfg, "client method ncl")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        """The model unchanged; where the number of classes is first known (server and clients alike), before
        any training: ``client.hard_categories`` at most C."""
        cfg.client.check_hard_categories(num_classes, "client")
        return model

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        """:func:`~fedlt.losses.ncl.nil_nbod_loss` of the experts' logits with the client's log n_c (a
        :class:`~fedlt.objectives.LossObjective`: the fused engine computes a round's in one call)."""
        o = self.opts
        log_n = log_counts(torch.as_tensor(data.class_counts)).to(data.images.device)
        return LossObjective(partial(nil_nbod_loss, log_n=log_n, k=o.hard_k(data.num_classes),
                                     factor=o.distill_weight, factor_hard=o.distill_weight_hard,
                                     ce_ratio=o.ce_ratio, hard_ratio=o.hard_ratio), output="expert_logits")
