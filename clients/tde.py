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
(a multi-expert model is refused when the config is read). Under ``federation.engine=fused`` its clients train
stacked like FedAvg's: ē is a buffer of each client's slice, updated in place inside the vmapped forward pass as
BatchNorm's running statistics are.
"""

from __future__ import annotations

from torch import nn

from fedlt.centralized.tde import CausalNormOptions, causal_norm_head
from fedlt.client_method import ClientMethod
from fedlt.config import Config
from fedlt.models.experts import require_single_network, require_unset_head
from fedlt.registry import CLIENTS


@CLIENTS.register("tde")
class TDEClient(ClientMethod):
    replaced_head = "the causal-norm classifier"

    class Options(ClientMethod.Options, CausalNormOptions):
        pass

    @classmethod
    def adapt_model(cls, model: nn.Module, cfg: Config, num_classes: int) -> nn.Module:
        return causal_norm_head(model, num_classes, cfg.client, cfg.seed)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        require_single_network(cfg, "client method tde replaces one classifier by the causal-norm head")
        require_unset_head(cfg, "client method tde replaces the head by the causal-norm classifier")
