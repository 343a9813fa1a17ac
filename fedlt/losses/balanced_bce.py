"""Bal-BCE: balanced binary cross-entropy of LiVT (Xu et al., "Learning Imbalanced Data with Vision
Transformers", CVPR 2023; follows XuZhengzhuo/LiVT ``Bal_BCE_loss``)."""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from pydantic import Field

from fedlt.losses.base import Loss
from fedlt.options import Options
from fedlt.registry import LOSSES

PRIOR_EPS = 1e-12  # π is clamped to [ε, 1 − ε] so that a class absent from the counts keeps a finite shift


def smoothed_one_hot(targets: torch.Tensor, num_classes: int, smoothing: float = 0.1) -> torch.Tensor:
    """timm's convention: off-target ε/C, on-target 1 − ε + ε/C (rows sum to 1)."""
    off = smoothing / num_classes
    return F.one_hot(targets, num_classes).float() * (1 - smoothing) + off


def bal_bce_loss(logits: torch.Tensor, targets: torch.Tensor, counts, smoothing: float = 0.1) -> torch.Tensor:
    """L = C · mean_{i,c} BCE_with_logits(z_ic + log(π_c/(1−π_c)), t_ic) — the one-vs-rest BCE summed over
    classes and averaged over the batch, with π_c = n_c/N.

    ``targets`` are labels (B,), turned into label-smoothed one-hot targets t (ε = 0.1), or soft targets
    (B, C) used as they are (LiVT's Mixup/CutMix targets, :func:`fedlt.losses.mixup.mixup_cutmix_batch`,
    already smoothed). Predict argmax z (no shift). π is clamped to [1e-12, 1 − 1e-12] (a client's absent
    class). With zero logits the loss starts at p_c = π_c (LiVT's head bias is 0): the shift is the whole
    prior, so the model's own bias must not hold another one (−log(C − 1) would count it twice).
    """
    n = torch.as_tensor(counts, dtype=torch.float64)
    pi = (n / n.sum()).clamp(PRIOR_EPS, 1 - PRIOR_EPS)
    shift = (torch.log(pi) - torch.log1p(-pi)).float().to(logits.device)
    if targets.dim() == 2:
        t = targets.float().to(logits.device)
    else:
        t = smoothed_one_hot(targets, logits.shape[1], smoothing).to(logits.device)
    return logits.shape[1] * F.binary_cross_entropy_with_logits(logits.float() + shift, t)


def sigmoid_bias_init(num_classes: int) -> float:
    """b = −log(C − 1): every sigmoid starts at p = 1/C (the focal-loss initialisation of a sigmoid head).

    Not for Bal-BCE: its prior shift already starts class c at p = π_c, and LiVT leaves the head bias at 0."""
    return -math.log(num_classes - 1)


class BalBCEOptions(Options):
    smoothing: float = Field(0.1, ge=0, lt=1, description="label smoothing ε of the BCE targets")


def make_bal_bce_loss(class_counts: torch.Tensor, smoothing: float = 0.1) -> Loss:
    """Bal-BCE with the prior of ``class_counts`` and label smoothing ε (of label targets; soft targets are
    used as given)."""
    return partial(bal_bce_loss, counts=class_counts, smoothing=smoothing)


LOSSES.register("bal_bce", make_bal_bce_loss, options=BalBCEOptions)
