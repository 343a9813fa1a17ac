"""Multi-expert centralized methods on :class:`~fedlt.models.experts.MultiExpertModel`: BalPoE
(Sanchez Aimar et al., "Balanced Product of Calibrated Experts for Long-Tailed Recognition", CVPR 2023;
emasa/BalPoE-CalibratedLT) and MDCS (Zhao et al., "MDCS: More Diverse Experts with Consistency
Self-distillation for Long-tailed Recognition", ICCV 2023; fistyee/MDCS).

Their losses (:mod:`fedlt.losses.experts`) read every expert's logits (``model.expert_logits``), so they are
objectives of these methods, not registered ``loss(logits, targets)`` losses.
"""

from __future__ import annotations

import torch
from pydantic import Field, field_validator
from torch import nn

from fedlt.centralized.base import CentralizedMethod, StrongView
from fedlt.centralized.methods import mixup_objective
from fedlt.config import Config
from fedlt.data.augment import random_rotation
from fedlt.errors import FedLTError
from fedlt.experiment import Experiment, augment_for, model_for
from fedlt.losses import balpoe_loss, mdcs_loss
from fedlt.models.experts import CIFAR_RESNET_EXPERTS
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED, MODELS
from fedlt.train import Augment, Objective, TensorData


def model_variant(cfg: Config, suffix: str) -> str:
    """``model.name`` with ``suffix`` appended, unless it ends so (``small_cnn`` -> ``small_cnn_experts``)."""
    name = cfg.model.name
    return name if name.endswith(suffix) else name + suffix


def check_model_variant(cfg: Config, suffix: str, what: str) -> None:
    """Refuse, in one line, a ``model.name`` without a registered ``suffix`` variant (``what`` names the kind)."""
    name = model_variant(cfg, suffix)
    if name not in MODELS:
        have = ", ".join(sorted(n for n in MODELS if n.endswith(suffix)))
        raise FedLTError(f"centralized.method={cfg.centralized.method} needs {what}, and {name!r} is not registered: "
                         f"set model.name to one of {have}")


class ExpertMethod(CentralizedMethod):
    """A method on :class:`~fedlt.models.experts.MultiExpertModel`: ``model.name`` (or the data set's default)
    with ``_experts`` appended, cosine classifiers with scale ``expert_scale``; test = mean of raw logits.

    On ``resnet32_experts`` the experts' layer2/layer3 are 24/48 channels with ``reduce_dimension`` and
    32/64 without (the two widths of ``ResNet_s`` in the official ``expert_resnet_cifar.py`` of both
    repositories); the default is each method's official CIFAR setting.
    """

    class Options(CentralizedOptions):
        expert_scale: float = Field(30.0, gt=0, description="scale s of the experts' cosine heads")
        reduce_dimension: bool = Field(True, description="resnet32_experts: experts of 24/48 channels (else 32/64)")

    def num_experts(self) -> int:
        raise NotImplementedError

    @staticmethod
    def expert_model(cfg: Config) -> str:
        """The multi-expert model of ``cfg``: ``model.name`` with ``_experts`` appended (unless it ends so)."""
        return model_variant(cfg, "_experts")

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        check_model_variant(cfg, "_experts", "a multi-expert model")

    def build_model(self, exp: Experiment) -> nn.Module:
        return model_for(self.cfg, exp, self.expert_model(self.cfg), **self.model_options())

    def model_options(self) -> dict:
        extra = {}
        if self.expert_model(self.cfg) in CIFAR_RESNET_EXPERTS:
            extra["widths"] = (16, 24, 48) if self.opts.reduce_dimension else (16, 32, 64)
        return dict(classifier="cosine", scale=self.opts.expert_scale, num_experts=self.num_experts(), **extra)


@CENTRALIZED.register("balpoe")
class BalPoE(ExpertMethod):
    """Balanced product of experts (BalPoE, emasa/BalPoE-CalibratedLT ``model/loss.py`` ``BSExpertLoss``):
    (1/M)·Σ_k CE(z_k + τ_k·log π, y), τ = (0, 1, 2); optional mixup (the official CIFAR configs use α = 0.8 on
    CIFAR-10, 0.4 on CIFAR-100; 0 here by default). Experts are full width (32/64 channels): every official
    CIFAR config sets ``reduce_dimension: false``. The release's CIFAR-10 loader applies no AutoAugment although
    its json asks for it (a boolean where ``cifar_aug_plus`` tests for 'auto'); its CIFAR-100 loader does:
    configs/centralized/cifar10_lt_balpoe.yaml and cifar100_lt_balpoe.yaml follow each."""

    class Options(ExpertMethod.Options):
        reduce_dimension: bool = Field(False, description="resnet32_experts: experts of 24/48 channels (else 32/64)")
        taus: list[float] = Field([0.0, 1.0, 2.0], min_length=1, description="each expert's τ_k")
        mixup_alpha: float = Field(0.0, ge=0, description="mixup α (0: no mixup)")

    def num_experts(self) -> int:
        return len(self.opts.taus)

    def objective(self, epoch: int) -> Objective:
        taus = self.opts.taus
        return mixup_objective(self, self.opts.mixup_alpha, lambda z, y: balpoe_loss(z, y, self.log_pi, taus), True)


class TwoViews(StrongView):
    """Stack [weak; strong] views of a batch (2B rows), each from its own crop/flip draw: weak = crop/flip +
    RandomRotation(``rotation``) (black fill, as on the official PIL images), strong = crop/flip + AutoAugment
    + Cutout."""

    def __init__(self, weak, mean: torch.Tensor, std: torch.Tensor, cutout: int, chunk: int,
                 rotation: float = 15.0) -> None:
        super().__init__(weak, mean, std, cutout, chunk)
        self.rotation = rotation
        self.black = -mean / std  # pixel value 0 after normalisation

    def __call__(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        weak = random_rotation(self.weak(x, generator), self.rotation, generator, self.black)
        return torch.cat([weak, super().__call__(x, generator)])


@CENTRALIZED.register("mdcs")
class MDCS(ExpertMethod):
    """MDCS (fistyee/MDCS ``model/loss.py`` ``MDCSLoss``, ``trainer/trainer.py``): diversity loss with
    λ = (−0.5, 1, 2.5) plus consistency self-distillation (weak teacher → strong student, confident
    instances), weight 0.6·min(e/(ramp_fraction·epochs), 1) with e = 1, 2, … the epoch counted from 1 as in
    the official trainer (20 of 400 epochs → 0.05). Weak view: crop/flip + RandomRotation(15); experts of
    24/48 channels (``reduce_dimension: true`` in the official CIFAR configs)."""

    class Options(ExpertMethod.Options):
        lambdas: list[float] = Field([-0.5, 1.0, 2.5], min_length=1, description="each expert's λ_k")
        kl_weight: float = Field(0.6, ge=0, description="weight of the consistency KL term")
        ramp_fraction: float = Field(0.1, ge=0, le=1, description="fraction of the epochs over which the KL ramps up")
        weak_rotation: float = Field(15.0, ge=0, le=180, description="RandomRotation degrees of the weak view")

        @field_validator("autoaugment")
        @classmethod
        def _views_fixed(cls, value: bool) -> bool:
            if value:
                raise ValueError("mdcs always trains on a weak and a strong view; autoaugment is not an option here")
            return value

    def num_experts(self) -> int:
        return len(self.opts.lambdas)

    def augment(self, data: TensorData) -> Augment:
        return TwoViews(augment_for(self.cfg, data), data.mean, data.std, self.opts.cutout, self.opts.augment_chunk,
                        self.opts.weak_rotation)

    def kl_weight(self, epoch: int) -> float:
        """0.6·min((epoch + 1)/ramp, 1) for the 0-based ``epoch`` of the run loop (the official count from 1)."""
        ramp = self.opts.ramp_fraction * self.epochs
        return self.opts.kl_weight * (min((epoch + 1) / ramp, 1.0) if ramp > 0 else 1.0)

    def objective(self, epoch: int) -> Objective:
        w, lambdas = self.kl_weight(epoch), self.opts.lambdas

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            z = model.expert_logits(x)
            return mdcs_loss(z[:, :len(y)], z[:, len(y):], y, self.log_pi, lambdas, w)
        return objective
