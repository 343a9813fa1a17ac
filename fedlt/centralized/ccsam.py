"""CC-SAM as a two-stage method (Zhou et al., "Class-Conditional Sharpness-Aware Minimization for Deep
Long-Tailed Recognition", CVPR 2023; follows zzpustc/CC-SAM ``train_cifar.py`` (``train``, ``train_sample`` and
the epoch loop of ``__main__``), ``utils/utils.py`` (``pre_compute_class_ratio``, ``lr_reset``,
``freeze_backbone``), ``utils/lr_scheduler.py`` (``adjust_learning_rate``), constants of ``configs/Cifar10.json``
and ``configs/Cifar100.json``).

Stage 1 (``centralized.epochs``, the official ``stage`` = 200): cross-entropy with the class-conditional SAM of the
classifier switched on (:mod:`fedlt.sharpness`, ``centralized.sam=cc_sam``, the official ``train``).

Stage 2 (``stage2_epochs``, the official ``max_epoch − stage`` = 30; ``train_sample`` with ``sampler: "Decoup"``):
the backbone frozen (its BatchNorm in train mode, as the official ``model.train()``: statistics follow the
stage-2 batches), the stage-1 classifier kept and re-trained on class-balanced batches with a fresh SGD (the
official ``lr_reset``) at a constant lr 0.01 (``adjust_learning_rate`` on CIFAR: 0.1 × lr; its ×0.1 after stage-2
epoch 30 is never reached). Per batch, with h_i the frozen features and f the classifier:

1. ℓ_i = CE(f(h_i), y_i); for each class c of the batch, G_c = ∂/∂h [mean_{i: y_i = c} ℓ_i] (zero outside class c);
2. feature noise n_i = a · w_{y_i} · G_{c,i} / ‖G_c‖ (Frobenius norm over the batch; a = ``adver_reg`` = 1), a
   step up the class's loss, with the class weight w_c = log(n_max/n_c + 0.01) / ``div`` (div = 2) from the
   TRAINING counts n_c: ≈ 0 for the head class, largest for the tail;
3. L = α · mean_i w_{y_i} · CE(f(h_i + n_i), y_i) + (1 − α) · mean_i ℓ_i, with α = min((e + 1)/E, ``up_limit``)
   at stage-2 epoch e of E (up_limit 1.0 on CIFAR-10, 0.3 on CIFAR-100).

The noise is a constant (``torch.autograd.grad`` without ``create_graph``); only the classifier trains.
Computed once for the batch: ℓ_i depends on h_i alone, so the per-sample gradients of Σ_i ℓ_i give every G_c
(rows of class c, scaled by 1/B_c, which the normalisation cancels), and one forward of f(h + n) gives every
class's perturbed loss (the official loop calls the classifier once per class and keeps that class's rows):
the same numbers for any head that treats samples independently (linear, cosine).

Not copied: (a) the official stage 2 starts from the stage-1 checkpoint with the best accuracy on the balanced
test set (its ``val`` split is CIFAR's test set): model selection on the test set; here from the last stage-1
model. (b) A class whose feature gradient is exactly zero makes the official G_c/‖G_c‖ = 0/0 (NaN weights);
here its noise is zero. (c) The official class-aware sampler cycles through a shuffled class list and through
each class's shuffled samples; fedlt's ``class_balanced`` sampler (:mod:`fedlt.samplers`) draws both uniformly
with replacement: the same class-balanced distribution, an epoch of as many samples as the training set.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import Field
from torch import nn

from fedlt.centralized.decoupled import DecoupledMethod
from fedlt.config import Config
from fedlt.errors import FedLTError
from fedlt.registry import CENTRALIZED
from fedlt.train import Augment, Objective, TensorData

CC_SAM_UP_LIMIT = 1.0  # configs/Cifar10.json "up_limit" (Cifar100.json: 0.3)
CC_SAM_DIV = 2.0  # configs/Cifar*.json "div"
CC_SAM_ADVER_REG = 1.0  # configs/Cifar*.json "adver_reg"
CC_SAM_STAGE2_EPOCHS = 30  # configs/Cifar*.json "max_epoch" 230 − "stage" 200
CC_SAM_STAGE2_LR = 0.01  # utils/lr_scheduler.py adjust_learning_rate on CIFAR: 0.1 × "lr" 0.1


def cc_sam_class_weights(class_counts: torch.Tensor, div: float = CC_SAM_DIV) -> torch.Tensor:
    """w_c = log(n_max / n_c + 0.01) / div (``pre_compute_class_ratio``); a class without samples gets 0."""
    n = torch.as_tensor(class_counts, dtype=torch.float64)
    w = torch.log(n.max() / n.clamp_min(1) + 0.01) / div
    return torch.where(n > 0, w, torch.zeros_like(w)).float()


def cc_sam_feature_noise(head: nn.Module, h: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor,
                         adver_reg: float = CC_SAM_ADVER_REG) -> torch.Tensor:
    """n_i = a · w_{y_i} · G_{c,i}/‖G_c‖ (step 2 of the module docstring), a constant of ``h``'s shape."""
    h = h.detach().requires_grad_(True)
    per_sample = F.cross_entropy(head(h).float(), y, reduction="sum")
    g = torch.autograd.grad(per_sample, h)[0].float()  # row i: ∂ℓ_i/∂h_i
    num_classes = len(class_weights)
    sq = torch.zeros(num_classes, device=h.device).index_add_(0, y, g.pow(2).sum(1))
    norm = sq.sqrt()[y]
    scale = adver_reg * class_weights.to(h.device)[y] / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return (g * torch.where(norm > 0, scale, torch.zeros_like(scale))[:, None]).to(h.dtype)


def cc_sam_stage2_loss(head: nn.Module, h: torch.Tensor, y: torch.Tensor, class_weights: torch.Tensor,
                       alpha: float, adver_reg: float = CC_SAM_ADVER_REG) -> torch.Tensor:
    """α · mean_i w_{y_i} CE(head(h_i + n_i), y_i) + (1 − α) · mean_i CE(head(h_i), y_i) (step 3)."""
    h = h.detach()
    noise = cc_sam_feature_noise(head, h, y, class_weights, adver_reg)
    plain = F.cross_entropy(head(h).float(), y)
    w = class_weights.to(h.device)[y]
    flat = (w * F.cross_entropy(head(h + noise).float(), y, reduction="none")).mean()
    return alpha * flat + (1 - alpha) * plain


def cc_sam_alpha(epoch: int, stage2_epochs: int, up_limit: float = CC_SAM_UP_LIMIT) -> float:
    """α = min((e + 1)/E, up_limit) at stage-2 epoch e (0-based) of E (``train_sample``)."""
    return min((epoch + 1) / max(stage2_epochs, 1), up_limit)


@CENTRALIZED.register("cc_sam")
class CCSAM(DecoupledMethod):
    """CC-SAM (the module docstring): stage 1 CE with ``sam=cc_sam``, stage 2 the official classifier
    re-training with class-conditional feature noise on the frozen backbone."""

    class Options(DecoupledMethod.Options):
        sam: Literal["none", "cc_sam"] = Field("cc_sam", description="stage 1's sharpness-aware classifier "
                                               "(cc_sam is this method's stage 1; none is refused)")
        stage2_epochs: int = Field(CC_SAM_STAGE2_EPOCHS, ge=0, description="classifier epochs with feature noise "
                                   "(official max_epoch − stage = 30)")
        stage2_lr: float | None = Field(CC_SAM_STAGE2_LR, gt=0, description="stage-2 lr, constant (official CIFAR: "
                                        "0.1 × lr = 0.01; None: stage 1's lr)")
        up_limit: float = Field(CC_SAM_UP_LIMIT, ge=0, le=1, description="cap of the weight α of the noisy loss "
                                "(official CIFAR-10 1.0, CIFAR-100 0.3)")
        div: float = Field(CC_SAM_DIV, gt=0, description="class weight w_c = log(n_max/n_c + 0.01) / div")
        adver_reg: float = Field(CC_SAM_ADVER_REG, ge=0, description="scale a of the feature noise")

    default_stage2_schedule = "constant"
    shift_bn = True  # the official train_sample runs model.train(): the frozen backbone's BatchNorm follows
    samples_per_class = 1  # train_cifar.py builds ClassAwareSampler(train_dataset): num_samples_cls=1

    def __init__(self, cfg: Config, train_counts: np.ndarray) -> None:
        super().__init__(cfg, train_counts)
        self.class_weights = cc_sam_class_weights(self.class_counts, self.opts.div)

    @classmethod
    def check_config(cls, cfg: Config) -> None:
        super().check_config(cfg)
        if cfg.centralized.sam != "cc_sam":
            raise FedLTError("centralized.method=cc_sam trains stage 1 with centralized.sam=cc_sam (got "
                             f"{cfg.centralized.sam!r}); for a plain-CE stage 1 use another decoupled method")

    def stage2_classifier(self, head: nn.Module) -> nn.Module:
        return head  # the stage-1 classifier, re-trained (official freeze_backbone)

    def stage2_augment(self, data: TensorData) -> Augment:
        return self.augment(data)  # the official stage 2 reads the same training set, with its transform

    def stage2_objective(self, epoch: int) -> Objective:
        alpha = cc_sam_alpha(epoch, self.stage2_epochs(), self.opts.up_limit)

        def objective(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return cc_sam_stage2_loss(model.classifier, model.features(x), y, self.class_weights, alpha,
                                      self.opts.adver_reg)

        return objective
