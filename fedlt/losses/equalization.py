"""EQL: the equalization loss (Tan et al., "Equalization Loss for Long-Tailed Object Recognition", CVPR 2020) in
its sigmoid form (``eql``; follows tztztztztz/eql.detectron2 ``projects/EQL/eql/fast_rcnn.py``
``EQLFastRCNNOutputs.eql_loss``) and its softmax form for image classification (``seql``, below).

Per-class sigmoid BCE, with the negative (discouraging) gradients of the rare classes switched off:

    w_ic = 1 − E(i) · T_λ(f_c) · (1 − y_ic),   L = Σ_{i,c} w_ic · BCE(z_ic, y_ic) / B

f_c = n_c / N is the class frequency (the official code uses LVIS's image-count frequency), T_λ(f) = 1 when
f < λ (a tail class), else 0. E(i) (``exclude_func``) is 1 for a foreground proposal and 0 for the background;
classification has no background class, so E ≡ 1 here. Predict argmax z (the official ``predict_probs`` is
sigmoid(z), the same order). The official head (``EQLFastRCNNOutputLayers``) starts the classifier at
weight ~ N(0, 0.01²) and bias −log((1 − p)/p), p = 0.001 (``PRIOR_PROB``): :func:`eql_bias_init`.
λ = 1.77e-3 is the official value (``cfg.MODEL.ROI_HEADS.LAMBDA = 0.00177`` in ``projects/EQL/eql/cfg.py`` and
``configs/Base-EQL-RCNN-FPN.yaml``; the paper prints 1.76e-3); on 10 classes no frequency falls below it, so a
CIFAR-10 / Fashion-MNIST run needs its own λ (see configs/centralized/cifar_lt_eql.yaml).
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
from fedlt.train import at_least_float32

EQL_LAMBDA = 1.77e-3  # the official LVIS threshold (projects/EQL/eql/cfg.py: cfg.MODEL.ROI_HEADS.LAMBDA = 0.00177)
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


SEQL_LAMBDA = 5e-3  # softmax EQL's tail threshold on n_c/N (BagofTricks-LT's LOSS.SEQL.LAMBDA default)
SEQL_GAMMA = 0.9  # probability that a tail negative is dropped from the denominator (LOSS.SEQL.GAMMA)


def seql_weights(targets: torch.Tensor, num_classes: int, frequencies: torch.Tensor, lam: float, gamma: float,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """w_ic = 1 − β_ic·T_λ(f_c)·(1 − y_ic), (B, C), with β_ic ~ Bernoulli(γ) drawn per sample and class (on the
    CPU from ``generator``): a tail negative leaves the softmax denominator with probability γ."""
    y = F.one_hot(targets, num_classes).float()
    beta = (torch.rand(y.shape, generator=generator) < gamma).float().to(y.device)
    tail = (frequencies.to(y.device) < lam).float()
    return 1 - beta * tail[None, :] * (1 - y)


def softmax_equalization_loss(logits: torch.Tensor, targets: torch.Tensor, counts, lam: float = SEQL_LAMBDA,
                              gamma: float = SEQL_GAMMA, generator: torch.Generator | None = None) -> torch.Tensor:
    """Softmax EQL (the paper's image-classification form, its Eq. 7-8):

        p̃_y = exp(z_y) / Σ_k w_k exp(z_k),   L = −log p̃_y = logsumexp_k(z_k + log w_k) − z_y,

    batch mean, with w from :func:`seql_weights` (w_y = 1, so the sum is never empty). The official detection
    repository has no classification form; this follows the transcription in zhangyongshun/BagofTricks-LT
    ``lib/loss/loss_impl/equalization_loss.py`` (same w and β), computed as a log-sum-exp: that code takes exp(z)
    without subtracting the maximum, which overflows to inf/nan for logits above ~88 in float32 — a defect not
    copied."""
    z = at_least_float32(logits)
    w = seql_weights(targets, z.shape[1], class_frequencies(counts), lam, gamma, generator).to(z.dtype)
    lse = torch.logsumexp(z + torch.log(w), dim=1)  # log 0 = −inf drops a term
    return (lse - z.gather(1, targets[:, None]).squeeze(1)).mean()


class SEQLOptions(Options):
    lam: float = Field(SEQL_LAMBDA, ge=0, le=1, description="tail threshold λ on n_c/N (BagofTricks-LT 5e-3)")
    drop_prob: float = Field(SEQL_GAMMA, ge=0, le=1, description="the paper's γ: probability that a tail "
                             "negative leaves the softmax denominator (BagofTricks-LT 0.9)")
    seed: int = Field(0, ge=0, description="seed of the β draws (the centralized method sets it per epoch from "
                      "the run's seed)")


def make_softmax_equalization_loss(class_counts: torch.Tensor, lam: float = SEQL_LAMBDA,
                                   drop_prob: float = SEQL_GAMMA, seed: int = 0) -> Loss:
    """Softmax EQL with the frequencies of ``class_counts``; its β draws come from a generator seeded with
    ``seed`` (one per built loss: a centralized epoch, a client's round)."""
    return partial(softmax_equalization_loss, counts=class_counts, lam=lam, gamma=drop_prob,
                   generator=torch.Generator().manual_seed(seed))


class EQLOptions(Options):
    lam: float = Field(EQL_LAMBDA, ge=0, le=1, description="tail threshold λ: classes with n_c/N < λ get no "
                       "negative gradients (official LVIS value 1.77e-3)")


def make_equalization_loss(class_counts: torch.Tensor, lam: float = EQL_LAMBDA) -> Loss:
    """EQL with the frequencies of ``class_counts`` and threshold λ."""
    return partial(equalization_loss, counts=class_counts, lam=lam)


LOSSES.register("eql", make_equalization_loss, options=EQLOptions)
LOSSES.register("seql", make_softmax_equalization_loss, options=SEQLOptions)
