"""TDE: causal-norm classifier trained with plain CE, and counterfactual (de-confounded) inference at test
(Tang et al., "Long-Tailed Classification by Keeping the Good and Removing the Bad Momentum Causal Effect",
NeurIPS 2020; follows KaihuaTang/Long-Tailed-Recognition.pytorch ``classification/models/CausalNormClassifier.py``
and the moving average of ``classification/run_networks.py``, constants of
``classification/config/CIFAR10_LT/causal_norm_32.yaml``).

The feature x (d numbers) and every class weight w_c are cut into K heads of d/K numbers. Per head k:

    x̂_k = x_k/‖x_k‖,   ŵ_{c,k} = w_{c,k}/(‖w_{c,k}‖ + γ),   z_c = Σ_k (τ/K)·⟨x̂_k, ŵ_{c,k}⟩          (training)

and, in training, the moving average of the batch-mean feature ē ← μ·ē + mean_i x_i (no (1 − μ) factor, as in
the official code; only its direction is used; μ = 0.9 on CIFAR, where the official code does not rescale μ by
the lr). At test (TDE), with ĉ_k = ē_k/‖ē_k‖ and cos_k = ⟨x̂_k, ĉ_k⟩ (x̂_k and ĉ_k are unit vectors):

    z_c = Σ_k (τ/K)·⟨x̂_k − α·cos_k·ĉ_k, ŵ_{c,k}⟩                                                 (inference)

K = 2, τ = 16, γ = 1/32, α = 1 (CIFAR; 3 elsewhere). Not copied: the official ē starts at 0 and the official code
never evaluates before training (ĉ = 0/0); here a zero ē (no training batch yet) skips the removal. Nor the
official model selection: ``run_networks.py`` tests the weights of the epoch with the best accuracy on its
validation split, which on CIFAR is the test set; fedlt reports the last epoch (choosing on the test set
inflates the number).
"""

from __future__ import annotations

import math

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment, model_for
from fedlt.models.experts import require_single_network, require_unset_head
from fedlt.options import CentralizedOptions, Options
from fedlt.registry import CENTRALIZED
from fedlt.streams import Stream, torch_generator


def _per_head(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(N, d) -> (N, K, d/K)."""
    return x.reshape(x.shape[0], heads, x.shape[1] // heads)


class CausalNormClassifier(nn.Module):
    """The causal-norm head with the moving-average feature ``embed`` (a buffer) and TDE inference in eval mode."""

    def __init__(self, feature_dim: int, num_classes: int, num_head: int = 2, tau: float = 16.0,
                 alpha: float = 1.0, gamma: float = 1 / 32, mu: float = 0.9, use_effect: bool = True,
                 generator: torch.Generator | None = None) -> None:
        super().__init__()
        if feature_dim % num_head:
            raise FedLTError(f"the causal-norm head needs a feature width divisible by num_head={num_head} "
                             f"(got {feature_dim})")
        self.num_head, self.scale, self.gamma, self.alpha, self.mu = num_head, tau / num_head, gamma, alpha, mu
        self.use_effect = use_effect
        stdv = 1.0 / math.sqrt(feature_dim)
        self.weight = nn.Parameter(torch.empty(num_classes, feature_dim).uniform_(-stdv, stdv, generator=generator))
        self.register_buffer("embed", torch.zeros(feature_dim))

    def normed_weight(self) -> torch.Tensor:
        w = _per_head(self.weight, self.num_head)
        return w / (w.norm(dim=2, keepdim=True) + self.gamma)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            with torch.no_grad():
                self.embed.mul_(self.mu).add_(h.detach().to(self.embed.dtype).mean(0))
        x = _per_head(h.to(self.weight.dtype), self.num_head)  # bf16 features under autocast: the head's dtype
        x = x / x.norm(dim=2, keepdim=True)
        w = self.normed_weight()
        if not self.training and self.use_effect and bool(self.embed.any()):
            c = _per_head(self.embed[None, :], self.num_head)
            c = c / c.norm(dim=2, keepdim=True)
            cos = (x * c).sum(dim=2, keepdim=True)
            x = x - cos * self.alpha * c
        return self.scale * torch.einsum("nkd,ckd->nc", x, w)


class CausalNormOptions(Options):
    """The keys of the causal-norm head and TDE inference (``centralized.*`` of tde, ``client.*`` of its client)."""

    num_head: int = Field(2, ge=1, description="heads K of the causal-norm classifier")
    tau: float = Field(16.0, gt=0, description="logit scale τ (τ/K per head)")
    alpha: float = Field(1.0, ge=0, description="strength α of the removed effect at test (official: CIFAR-10 "
                                                 "1, CIFAR-100 1.5, else 3)")
    norm_gamma: float = Field(1 / 32, ge=0, description="γ of the weight norm w/(‖w‖ + γ)")
    mu: float = Field(0.9, ge=0, lt=1, description="momentum μ of the moving-average feature, in [0, 1)")
    use_effect: bool = Field(True, description="counterfactual (TDE) inference at test; false: plain logits")


def causal_norm_head(model: nn.Module, num_classes: int, o: CausalNormOptions, seed: int) -> nn.Module:
    """``model`` with its classifier replaced by a :class:`CausalNormClassifier` of options ``o``, weights from
    the seeded initialisation stream (the same head centrally and on every client)."""
    model.classifier = CausalNormClassifier(model.feature_dim, num_classes, o.num_head, o.tau, o.alpha,
                                            o.norm_gamma, o.mu, o.use_effect, torch_generator(seed, Stream.INIT, 2))
    return model


@CENTRALIZED.register("tde")
class TDE(CentralizedMethod):
    """TDE (Tang et al., NeurIPS 2020; KaihuaTang/Long-Tailed-Recognition.pytorch): the model's head replaced by
    the causal-norm classifier (:class:`CausalNormClassifier`), trained with CE; test logits de-confounded by
    removing the projection on the moving-average feature direction."""

    class Options(CentralizedOptions, CausalNormOptions):
        pass

    @classmethod
    def check_config(cls, cfg) -> None:
        super().check_config(cfg)
        require_single_network(cfg, "centralized.method=tde replaces one classifier by the causal-norm head")
        require_unset_head(cfg, "centralized.method=tde replaces the head by the causal-norm classifier")
        if cfg.centralized.sam != "none":
            raise FedLTError("centralized.method=tde cannot run with centralized.sam=cc_sam: CC-SAM calls the head "
                             "once per class of a batch, and every training call of the causal-norm head moves its "
                             "moving-average feature")

    def build_model(self, exp: Experiment) -> nn.Module:
        return causal_norm_head(model_for(self.cfg, exp), self.num_classes, self.opts, self.cfg.seed)
