"""TDE client: the causal-norm classifier trained with plain CE on every client, de-confounded (TDE) inference in
the server's evaluation (Tang et al., NeurIPS 2020; KaihuaTang/Long-Tailed-Recognition.pytorch, see
:mod:`fedlt.centralized.tde` for the formulas and the official files).

:meth:`TDEClient.adapt_model` replaces the model's head with :class:`~fedlt.centralized.tde.CausalNormClassifier`
on the server and on every client alike (the same seeded weights as ``centralized.method=tde``). Its
moving-average feature ē is a buffer of the model, so each client carries it on in training (ē ← μ·ē + mean_i x_i
per batch, starting from the global model's) and the strategy averages it with the weights, weighted by the
clients' sample counts like every other entry of the state; only its direction is used at test. The server
evaluates in eval mode, which applies the counterfactual removal x̂_k − α·cos_k·ĉ_k with the averaged ē.
Works under any weight-averaging strategy (``strategy.name=fedavg|fedprox|…``) and on single-network models
(a multi-expert model is refused when the config is read). Under ``federation.engine=fused`` its clients train one
after another (:meth:`TDEClient.fit` is its own): the in-place update of ē does not go through the stacked,
vmapped call of the fused trainer.
"""

from __future__ import annotations

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.tde import CausalNormClassifier
from fedlt.client_method import ClientMethod, FitResult
from fedlt.config import Config
from fedlt.models.experts import require_single_network
from fedlt.registry import CLIENTS
from fedlt.streams import Stream, torch_generator
from fedlt.train import Augment, TensorData


@CLIENTS.register("tde")
class TDEClient(ClientMethod):
    class Options(ClientMethod.Options):
        num_head: int = Field(2, ge=1, description="heads K of the causal-norm classifier")
        tau: float = Field(16.0, gt=0, description="logit scale τ (τ/K per head)")
        alpha: float = Field(1.0, ge=0, description="strength α of the removed effect at test (CIFAR 1, else 3)")
        norm_gamma: float = Field(1 / 32, ge=0, description="γ of the weight norm w/(‖w‖ + γ)")
        mu: float = Field(0.9, ge=0, le=1, description="momentum μ of the moving-average feature")
        use_effect: bool = Field(True, description="counterfactual (TDE) inference at test; false: plain logits")

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        o = cfg.client
        model.classifier = CausalNormClassifier(model.feature_dim, num_classes, o.num_head, o.tau, o.alpha,
                                                o.norm_gamma, o.mu, o.use_effect,
                                                torch_generator(cfg.seed, Stream.INIT, 2))
        return model

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method tde replaces one classifier by the causal-norm head")

    def fit(self, model: nn.Module, data: TensorData, config: dict, generator: torch.Generator,
            augment: Augment) -> FitResult:
        return super().fit(model, data, config, generator, augment)  # own method: per-client under engine=fused
