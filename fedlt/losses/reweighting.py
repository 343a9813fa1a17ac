"""Cross-entropy, focal loss and class re-weighting (inverse frequency, class-balanced effective number).

Focal loss: Lin et al., "Focal Loss for Dense Object Detection", ICCV 2017 (softmax form as in
kaidic/LDAM-DRW ``losses.py`` ``FocalLoss``). Class-balanced loss: Cui et al., "Class-Balanced Loss Based on
Effective Number of Samples", CVPR 2019 (richardaecn/class-balanced-loss).

Mean convention of the weighted losses: **PyTorch weighted mean**, L = Σ_i w_{y_i}·ℓ_i / Σ_i w_{y_i}, which is
what ``F.cross_entropy(weight=w)`` computes and what LDAM-DRW's DRW stage uses; except the class-balanced
loss, which by default takes the batch mean (1/B)·Σ_i w_{y_i}·ℓ_i of its official code (richardaecn
``src/cifar_main.py``: ``tf.losses.softmax_cross_entropy(weights=w_y)``, whose default reduction
SUM_BY_NONZERO_WEIGHTS divides by the B non-zero weights). The two differ by the batch's mean weight, on a
long-tailed batch about 0.2 (a 4–6× smaller effective lr for the batch mean); ``reduction="weighted_mean"``
gives the class-balanced weights under LDAM-DRW's convention (its ``train_rule=Reweight``).
"""

from __future__ import annotations

from functools import partial
from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.losses.base import Loss
from fedlt.options import Options
from fedlt.registry import LOSSES


def cross_entropy_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """L = −log softmax(z)_y, averaged over the batch (ERM, the reference of every long-tail method)."""
    return F.cross_entropy(logits.float(), targets)


def focal_loss(logits: torch.Tensor, targets: torch.Tensor, gamma: float = 1.0,
               weight: torch.Tensor | None = None) -> torch.Tensor:
    """Focal loss (Lin et al., ICCV 2017) on the softmax, as in LDAM-DRW's ``FocalLoss``.

    ℓ_i = (1 − p_{y_i})^γ · CE_i with p_y = exp(−CE_i) (CE_i weighted by w_{y_i} when ``weight`` is given);
    L = (1/B)·Σ_i ℓ_i. γ = 1 by default (LDAM's code); γ = 0 is plain CE.
    """
    ce = F.cross_entropy(logits.float(), targets, weight=weight, reduction="none")
    p = torch.exp(-ce)
    return ((1 - p) ** gamma * ce).mean()


def class_weights(counts, beta: float | None = None) -> torch.Tensor:
    """Per-class weights normalised to Σ_c w_c = C.

    ``beta=None`` (or 1): inverse frequency, w_c ∝ 1/n_c. Otherwise the class-balanced weights of Cui et al.
    (CVPR 2019): w_c ∝ (1 − β) / (1 − β^{n_c}) = 1 / E_c, the inverse effective number of samples;
    β = 0 gives uniform weights.
    """
    n = torch.as_tensor(counts, dtype=torch.float64).clamp_min(1)
    if beta is None or beta >= 1:
        w = 1.0 / n
    else:
        w = (1.0 - beta) / (1.0 - torch.pow(torch.tensor(beta, dtype=torch.float64), n))
    return (w / w.sum() * len(n)).float()


def weighted_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, weights: torch.Tensor,
                           reduction: str = "weighted_mean") -> torch.Tensor:
    """L = Σ_i w_{y_i}·CE_i / Σ_i w_{y_i} (``weighted_mean``, PyTorch's) or (1/B)·Σ_i w_{y_i}·CE_i (``mean``);
    see the module docstring."""
    weights = weights.to(logits.device)
    if reduction == "mean":
        return (weights[targets] * F.cross_entropy(logits.float(), targets, reduction="none")).mean()
    if reduction != "weighted_mean":
        raise ValueError(f"unknown reduction {reduction!r}")
    return F.cross_entropy(logits.float(), targets, weight=weights)


def reweighted_loss(logits: torch.Tensor, targets: torch.Tensor, counts) -> torch.Tensor:
    """Inverse-frequency re-weighted CE: w_c ∝ 1/n_c normalised to Σ w = C, PyTorch weighted mean."""
    return weighted_cross_entropy(logits, targets, class_weights(counts))


def class_balanced_loss(logits: torch.Tensor, targets: torch.Tensor, counts, beta: float = 0.9999,
                        reduction: str = "mean") -> torch.Tensor:
    """Class-Balanced CE (Cui et al., CVPR 2019; richardaecn ``src/cifar_main.py``, softmax loss): w_c =
    (1 − β)/(1 − β^{n_c}) normalised to Σ w = C; L = (1/B)·Σ_i w_{y_i}·CE_i (``mean``, the official) or the
    PyTorch weighted mean (``weighted_mean``). β = 0.9999 is the script default."""
    return weighted_cross_entropy(logits, targets, class_weights(counts, beta), reduction)


# ---------------------------------------------------------------------------- registered factories


def make_cross_entropy_loss(class_counts: torch.Tensor) -> Loss:
    """Plain CE (the counts are not used)."""
    return cross_entropy_loss


class FocalOptions(Options):
    gamma: float = Field(1.0, ge=0, description="focusing parameter γ (0: plain CE)")


def make_focal_loss(class_counts: torch.Tensor, gamma: float = 1.0) -> Loss:
    """Focal loss with focusing parameter γ (the counts are not used)."""
    return partial(focal_loss, gamma=gamma)


def make_reweighted_loss(class_counts: torch.Tensor) -> Loss:
    """Inverse-frequency re-weighted CE on ``class_counts`` (absent classes count as 1)."""
    return partial(weighted_cross_entropy, weights=class_weights(class_counts))


class ClassBalancedOptions(Options):
    beta: float = Field(0.9999, ge=0, lt=1, description="β of the effective number (1 − β^n)/(1 − β)")
    reduction: Literal["mean", "weighted_mean"] = Field(
        "mean", description="mean: (1/B)·Σ w_y·CE, the official TF loss; weighted_mean: Σ w_y·CE / Σ w_y, "
                            "PyTorch's and LDAM-DRW's")


def make_class_balanced_loss(class_counts: torch.Tensor, beta: float = 0.9999, reduction: str = "mean") -> Loss:
    """Class-balanced CE on ``class_counts`` with the effective-number β."""
    return partial(weighted_cross_entropy, weights=class_weights(class_counts, beta), reduction=reduction)


LOSSES.register("ce", make_cross_entropy_loss)
LOSSES.register("focal", make_focal_loss, options=FocalOptions)
LOSSES.register("reweight", make_reweighted_loss)
LOSSES.register("cb", make_class_balanced_loss, options=ClassBalancedOptions)
