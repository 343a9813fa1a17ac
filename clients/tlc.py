"""TLC client: TLC's evidential multi-expert loss (Li et al., "Trustworthy Long-Tailed Classification", CVPR 2022;
lblaoke/TLC ``model/loss.py`` ``TLCLoss``, the formulas in :mod:`fedlt.losses.tlc`) as the local objective of a
multi-expert model (``model.name=*_experts``, cosine heads), under any strategy.

The loss is :func:`fedlt.losses.tlc.tlc_loss` on the experts' logits and their Dempster-Shafer combination
:func:`~fedlt.losses.tlc.tlc_combine`, the arithmetic of ``centralized.method=tlc`` with:

- the client's own class counts n_k in place of the training set's: LDAM margins Δ ∝ n_{k,c}^{−1/4},
  class-balanced weights ω (β) and diversity temperatures t_c from π_{k,c} = n_{k,c}/Σ n_k; a class absent
  from the client counts as 1 (so its margin is the largest, Δ = ``max_margin``, and every term is finite);
- the federated round in place of the epoch: round r (``server-round`` of the train config, counted from 1)
  plays epoch r, so the KL annealing factor is r/T and re-weighting (ω, t) is on from round R + 1 with
  R = round(``drw_fraction`` · ``federation.rounds``) (the centralized method's R = round(drw_fraction ·
  epochs)), T = (R + ``annealing``)/``reweight_factor``; the margin scale s is ``model.scale``.

TLC's structure: on ``resnet32_experts``, :meth:`TLCClient.adapt_model` builds the official ``ResNet_s``
layout (only conv1/bn1 shared, layer1 per expert, experts of 32/64 channels, or 24/48 with
``client.reduce_dimension``), as the centralized method does. Not federated: the official RandomRotation(15)
of the training view (the clients use the config's crop/flip) and the test-time combination (the global model
is evaluated on the mean of the experts' logits, as every ``*_experts`` model).
"""

from __future__ import annotations

from functools import partial

from pydantic import Field
from torch import nn

from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.losses import class_weights, ldam_margins
from fedlt.losses.tlc import TLCLossOptions, tlc_expert_loss
from fedlt.models.experts import require_experts, resnet32_experts
from fedlt.objectives import LossObjective
from fedlt.registry import CLIENTS
from fedlt.train import Objective, TensorData


def reweight_round(drw_fraction: float, rounds: int) -> int:
    """R = round(drw_fraction · rounds): re-weighting from round R + 1 (the 0-based epoch R of the centralized run)."""
    return int(round(drw_fraction * rounds))


@CLIENTS.register("tlc")
class TLCClient(ClientMethod):
    class Options(ClientMethod.Options, TLCLossOptions):
        reduce_dimension: bool = Field(False, description="resnet32_experts: experts of 24/48 channels (else 32/64)")
        max_margin: float = Field(0.5, gt=0, description="largest LDAM margin Δ (rarest local class)")
        drw_fraction: float = Field(0.8, ge=0, le=1, description="fraction of the rounds before re-weighting")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_experts(cfg, "client method tlc")
        if cfg.model.classifier != "cosine":
            raise FedLTError("client method tlc trains cosine experts (margins in cosine units × model.scale): "
                             "set model.classifier=cosine")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        if cfg.model.name != "resnet32_experts":
            return model
        in_channels = next(m for m in model.modules() if isinstance(m, nn.Conv2d)).in_channels
        widths = (16, 24, 48) if cfg.client.reduce_dimension else (16, 32, 64)
        m = cfg.model
        return resnet32_experts(num_classes, in_channels, m.num_experts, widths, m.classifier, m.scale,
                                shared_layer1=False)

    def objective(self, model: nn.Module, data: TensorData, config: dict) -> Objective:
        o = self.opts
        counts = data.class_counts.clamp_min(1)
        r = reweight_round(o.drw_fraction, self.cfg.federation.rounds)
        server_round = int(config.get("server-round", 1))
        weight = temperature = None
        if server_round - 1 >= r:
            weight = class_weights(counts, o.beta)
            pi = counts.double() / counts.sum()
            t = data.num_classes * pi * o.reweight_factor + 1 - o.reweight_factor
            temperature = (t / t.max()).float()
        loss = partial(tlc_expert_loss, margins=ldam_margins(counts, o.max_margin), epoch=server_round,
                       kl_period=(r + o.annealing) / o.reweight_factor, class_weight=weight, temperature=temperature,
                       tau=o.tau, margin_scale=self.cfg.model.scale, diversity=o.diversity, eta=o.eta)
        return LossObjective(loss, output="expert_logits")  # the fused engine: a round's losses in one call
