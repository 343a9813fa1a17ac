"""Single-stage centralized methods: one loss of :mod:`fedlt.losses` on the pooled set (plus, for some, a model
initialisation, a logit transform at test, or mixup of the inputs).

The "just a loss" methods name their registered loss (``loss``) and map their ``centralized.<key>`` options
to its factory's keywords (``loss_options``); :class:`~fedlt.centralized.base.CentralizedMethod` builds the
objective ``LOSSES.get(loss)(train_counts, **options)`` from them.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from pydantic import Field
from torch import nn

from fedlt.centralized.base import CentralizedMethod
from fedlt.experiment import Experiment, model_for
from fedlt.losses import (
    cross_entropy_loss,
    mixup_batch,
    mixup_cutmix_batch,
    posthoc_adjust,
)
from fedlt.losses.reweighting import ClassBalancedOptions
from fedlt.options import CentralizedOptions
from fedlt.registry import CENTRALIZED, LOSSES
from fedlt.train import Objective

CENTRALIZED.register("ce", CentralizedMethod)


@CENTRALIZED.register("focal")
class Focal(CentralizedMethod):
    """Focal loss (1 − p_y)^γ·CE (Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017), γ = 1
    as in kaidic/LDAM-DRW's ``FocalLoss``."""

    class Options(CentralizedOptions):
        focal_gamma: float = Field(1.0, ge=0, description="focusing parameter γ (``gamma`` is the lr decay)")

    loss = "focal"

    def loss_options(self, epoch: int) -> dict[str, Any]:
        return {"gamma": self.opts.focal_gamma}


@CENTRALIZED.register("reweight")
class Reweight(CentralizedMethod):
    """Inverse-frequency re-weighted CE (w_c ∝ 1/n_c, Σ w = C, PyTorch weighted mean): the textbook baseline,
    fedlt's own (no official code). LDAM-DRW's ``--train_rule Reweight`` is not this one: it is class-balanced
    (β = 0.9999) under the weighted mean, ``centralized.method=cb centralized.reduction=weighted_mean``."""

    loss = "reweight"


@CENTRALIZED.register("cb")
class ClassBalanced(CentralizedMethod):
    """Class-Balanced CE (Cui et al., "Class-Balanced Loss Based on Effective Number of Samples", CVPR 2019;
    richardaecn/class-balanced-loss ``src/cifar_main.py``, softmax loss): w_c ∝ (1 − β)/(1 − β^{n_c}),
    β = 0.9999, L = (1/B)·Σ_i w_{y_i}·CE_i as the official TF loss reduces it
    (``centralized.reduction=weighted_mean``: the PyTorch weighted mean of LDAM-DRW's CB re-weighting;
    :mod:`fedlt.losses.reweighting`)."""

    class Options(CentralizedOptions, ClassBalancedOptions):
        """``beta`` and ``reduction``, as the loss takes them."""

    loss = "cb"

    def loss_options(self, epoch: int) -> dict[str, Any]:
        return {"beta": self.opts.beta, "reduction": self.opts.reduction}


@CENTRALIZED.register("ldam_drw")
class LDAMDRW(CentralizedMethod):
    """LDAM + deferred re-weighting (Cao et al., "Learning Imbalanced Datasets with Label-Distribution-Aware
    Margin Loss", NeurIPS 2019; follows kaidic/LDAM-DRW ``cifar_train.py``) on a cosine classifier (scale 1,
    s in the loss).

    DRW: unweighted until epoch round(drw_fraction·epochs) (160 of 200 → 0.8), then class-balanced weights
    with β = 0.9999. Test logits are s·cos (argmax unchanged; loss and ECE on the trained scale; the official
    test loss is the LDAM criterion itself, margins and DRW weights included). Not copied: the official reports
    the best test accuracy over the epochs (``best_acc1``); fedlt reports the last epoch's.
    """

    class Options(CentralizedOptions):
        max_margin: float = Field(0.5, gt=0, description="largest margin Δ (the rarest class)")
        s: float = Field(30.0, gt=0, description="logit scale s")
        drw_fraction: float = Field(0.8, ge=0, le=1, description="fraction of the epochs before re-weighting")
        beta: float = Field(0.9999, ge=0, lt=1, description="β of the class-balanced DRW weights")

    loss = "ldam"

    def model_options(self) -> dict:
        return dict(classifier="cosine", scale=1.0)

    def drw_epoch(self) -> int:
        return int(round(self.opts.drw_fraction * self.epochs))

    def loss_options(self, epoch: int) -> dict[str, Any]:
        beta = self.opts.beta if epoch >= self.drw_epoch() else None
        return {"max_margin": self.opts.max_margin, "s": self.opts.s, "beta": beta}

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return self.opts.s * logits


@CENTRALIZED.register("la")
class LogitAdjusted(CentralizedMethod):
    """Logit-adjusted loss CE(z + τ·log π, y) (Menon et al., "Long-tail learning via logit adjustment",
    ICLR 2021; google-research/google-research ``logit_adjustment``), τ = 1; predict argmax z."""

    class Options(CentralizedOptions):
        tau: float = Field(1.0, ge=0, description="adjustment strength τ")

    loss = "la"

    def loss_options(self, epoch: int) -> dict[str, Any]:
        return {"tau": self.opts.tau}


@CENTRALIZED.register("balanced_softmax")
class BalancedSoftmax(CentralizedMethod):
    """Balanced Softmax CE(z + log π, y) (Ren et al., "Balanced Meta-Softmax for Long-Tailed Visual
    Recognition", NeurIPS 2020; jiawei-ren/BalancedMetaSoftmax)."""

    loss = "balanced_softmax"


@CENTRALIZED.register("bal_bce")
class BalBCE(CentralizedMethod):
    """Bal-BCE (Xu et al., "Learning Imbalanced Data with Vision Transformers", CVPR 2023; XuZhengzhuo/LiVT
    ``util/loss.py`` ``BCE_loss(type='Bal')``): C·mean BCE(z + log(π/(1−π)), t), label smoothing ε = 0.1.

    The linear head's bias starts at 0 (LiVT's ViT head, timm's initialisation; LiVT re-initialises only
    ``head.weight``), so class c starts at p = π_c. Optional Mixup/CutMix with soft targets through the loss
    (:func:`fedlt.losses.mixup.mixup_cutmix_batch`, timm's ``Mixup`` in batch mode): LiVT's recipe uses
    ``mixup_alpha 0.8, cutmix_alpha 1.0`` (util/trainer.py) and its ``main_finetune.py`` builds Bal-BCE only
    when Mixup/CutMix is on (its shipped ``script/finetune.py`` sets both to 0 with ``loss='Bal_BCE'``, which
    that branch refuses); off (α = 0) by default here, the plain label-smoothed Bal-BCE.
    """

    class Options(CentralizedOptions):
        smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing ε of the BCE targets")
        mixup_alpha: float = Field(0.0, ge=0, description="Mixup α with soft targets (LiVT: 0.8; 0: off)")
        cutmix_alpha: float = Field(0.0, ge=0, description="CutMix α with soft targets (LiVT: 1.0; 0: off)")
        mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed")
        switch_prob: float = Field(0.5, ge=0, le=1, description="probability of CutMix when both α > 0")

    loss = "bal_bce"

    def build_model(self, exp: Experiment) -> nn.Module:
        model = model_for(self.cfg, exp)
        head = getattr(model, "classifier", None)
        if isinstance(head, nn.Linear) and head.bias is not None:
            nn.init.zeros_(head.bias)
        return model

    def loss_options(self, epoch: int) -> dict[str, Any]:
        return {"smoothing": self.opts.smoothing}

    def objective(self, epoch: int) -> Objective:
        o = self.opts
        if o.mixup_alpha <= 0 and o.cutmix_alpha <= 0:
            return super().objective(epoch)
        loss = LOSSES.get(self.loss)(self.class_counts, **self.loss_options(epoch))

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            xm, t, _ = mixup_cutmix_batch(x, y, self.num_classes, self.rng, o.mixup_alpha, o.cutmix_alpha,
                                          o.mix_prob, o.switch_prob, o.smoothing)
            return loss(model(xm), t)
        return objective


@CENTRALIZED.register("posthoc_la")
class PosthocLA(CentralizedMethod):
    """Plain CE training, then post-hoc logit adjustment at test: argmax (z − τ·log π), τ = 1 (Menon et al.,
    ICLR 2021, the post-hoc variant; google-research/google-research ``logit_adjustment``)."""

    class Options(CentralizedOptions):
        tau: float = Field(1.0, ge=0, description="adjustment strength τ")

    def transform_logits(self, logits: torch.Tensor) -> torch.Tensor:
        return posthoc_adjust(logits, self.log_pi, self.opts.tau)


def mixup_objective(method: CentralizedMethod, alpha: float,
                    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], experts: bool = False) -> Objective:
    """λ·loss(out, y_a) + (1 − λ)·loss(out, y_b) with out = model(x̃) (or ``model.expert_logits(x̃)``),
    x̃ = λ·x + (1 − λ)·x[perm], λ ~ Beta(α, α) from the method's rng (α = 0: no mixup)."""
    def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        xm, ya, yb, lam = mixup_batch(x, y, alpha, method.rng)
        out = model.expert_logits(xm) if experts else model(xm)
        return loss_fn(out, ya) if lam == 1.0 else lam * loss_fn(out, ya) + (1 - lam) * loss_fn(out, yb)
    return objective


@CENTRALIZED.register("mixup")
class Mixup(CentralizedMethod):
    """Mixup (Zhang et al., "mixup: Beyond Empirical Risk Minimization", ICLR 2018;
    facebookresearch/mixup-cifar10): CE on x̃ = λx + (1−λ)x', λ ~ Beta(α, α), α = 1 (MiSLAS's CIFAR stage 1)."""

    class Options(CentralizedOptions):
        mixup_alpha: float = Field(1.0, ge=0, description="λ ~ Beta(α, α); 0: no mixup")

    def objective(self, epoch: int) -> Objective:
        return mixup_objective(self, self.opts.mixup_alpha, cross_entropy_loss)
