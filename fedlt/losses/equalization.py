"""EQL: the equalization loss in its classification (sigmoid) form (Tan et al., "Equalization Loss for Long-Tailed
Object Recognition", CVPR 2020; follows tztztztztz/eql.detectron2 ``projects/EQL/eql/fast_rcnn.py``
``EQLFastRCNNOutputs.eql_loss``).

Per-class sigmoid BCE, with the negative (discouraging) gradients of the rare classes switched off:

    w_ic = 1 − E(i) · T_λ(f_c) · (1 − y_ic),   L = Σ_{i,c} w_ic · BCE(z_ic, y_ic) / B

f_c = n_c / N is the class frequency (the official code uses LVIS's image-count frequency), T_λ(f) = 1 when
f < λ (a tail class), else 0. E(i) (``exclude_func``) is 1 for a foreground proposal and 0 for the background;
classification has no background class, so E ≡ 1 here. Predict argmax z (the official ``predict_probs`` is
sigmoid(z), the same order). The official head (``EQLFastRCNNOutputLayers``) starts the classifier at
weight ~ N(0, 0.01²) and bias −log((1 − p)/p), p = 0.001 (``PRIOR_PROB``): :func:`eql_bias_init`.
λ = 1.76e-3 is the official LVIS value (``cfg.MODEL.ROI_HEADS.LAMBDA``); on 10 classes no frequency falls below
it, so a CIFAR-10 / Fashion-MNIST run needs its own λ (see configs/centralized/cifar10_lt_eql.yaml).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.losses.base import Loss
from fedlt.options import Options
from fedlt.registry import LOSSES

EQL_LAMBDA = 1.76e-3  # the official LVIS threshold (cfg.MODEL.ROI_HEADS.LAMBDA = 0.00177)
EQL_PRIOR_PROB = 1e-3  # the official head's initial sigmoid probability (cfg.MODEL.ROI_HEADS.PRIOR_PROB)


def class_frequencies(counts) -> torch.Tensor:
    """f_c = n_c / Σ n (the official code's ``image_count_frequency``, with per-sample counts)."""
    n = torch.as_tensor(counts, dtype=torch.float64)
    return (n / n.sum().clamp_min(1)).float()


def eql_weights(targets: torch.Tensor, num_classes: int, frequencies: torch.Tensor, lam: float) -> torch.Tensor:
    """w_ic = 1 − T_λ(f_c)·(1 − y_ic), (B, C): 0 on the negative terms of the tail classes (f_c < λ), else 1."""
    y = F.one_hot(targets, num_classes).float()
    tail = (frequencies.to(y.device) < lam).float()
    return 1 - tail[None, :] * (1 - y)


def equalization_loss(logits: torch.Tensor, targets: torch.Tensor, counts, lam: float = EQL_LAMBDA) -> torch.Tensor:
    """L = Σ_{i,c} w_ic·BCE_with_logits(z_ic, y_ic) / B (summed over classes, averaged over the batch)."""
    z = logits.float()
    y = F.one_hot(targets, z.shape[1]).float()
    w = eql_weights(targets, z.shape[1], class_frequencies(counts), lam)
    return (F.binary_cross_entropy_with_logits(z, y, reduction="none") * w).sum() / z.shape[0]


def eql_bias_init(prior_prob: float = EQL_PRIOR_PROB) -> float:
    """b = −log((1 − p)/p): every sigmoid starts at p (the official ``cls_score`` bias)."""
    return -math.log((1 - prior_prob) / prior_prob)


class EQLOptions(Options):
    lam: float = Field(EQL_LAMBDA, ge=0, le=1, description="tail threshold λ: classes with n_c/N < λ get no "
                       "negative gradients (official LVIS value 1.76e-3)")


def make_equalization_loss(class_counts: torch.Tensor, lam: float = EQL_LAMBDA) -> Loss:
    """EQL with the frequencies of ``class_counts`` and threshold λ."""
    return partial(equalization_loss, counts=class_counts, lam=lam)


LOSSES.register("eql", make_equalization_loss, options=EQLOptions)
